"""Scoring one candidate in a resident model: what a worker (or the study's own process) runs per task.

An ``Evaluator`` holds the resident model, the search windows (all of them, and with
multi-fidelity the few-token screen windows), the reference losses and the objectives.
``run(task)`` puts the candidate in the model (merged weights, or a set of bypassed
layers for a drop space), scores it and returns a plain dict (it crosses a process
boundary): losses, scores, objective values, seconds, or the error of a failed trial.

With a fidelity (``splice.search.fidelity``) a task at level ``screen`` is scored on the
screen windows; one with a ``promote`` threshold is re-scored on all the windows in the
same task when its screen value reaches it (the weights are already in the model: a
re-score costs the forward passes only).
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import SpliceError
from .objectives import objective_values, scores_of

MERGE_SEED = 0  # the seed random methods (DARE, DELLA) merge with: splice merge's default, so best.yaml gives the same weights


class Evaluator:
    """Scores candidates (see the module docstring).

    Args:
        resident: a ``ResidentModel``; windows: ``{"full": {domain: windows}, "screen": ... or None}``.
        refs: reference losses per domain (``"base"`` and each expert domain) on the full windows, and
            ``refs_screen`` on the screen windows; objectives, experts, general, directions: as in the spec.
        drop: True for a drop space (candidates bypass layers of the base instead of merging).
    """

    def __init__(self, resident, windows: dict, refs: dict, refs_screen: dict | None, objectives, experts, general, directions, drop=False):
        self.resident = resident
        self.windows = windows
        self.refs = {"full": refs, "screen": refs_screen}
        self.objectives = objectives
        self.experts = experts
        self.general = general
        self.directions = directions
        self.drop = drop
        if drop:
            resident.load_reference(resident.refs[0])

    @classmethod
    def from_setup(cls, resident, setup: dict) -> Evaluator:
        """An evaluator in a worker process around its own ``resident`` model, from the ``setup`` the study made (``setup_of``)."""
        keys = ("windows", "refs", "refs_screen", "objectives", "experts", "general", "directions", "drop")
        return cls(resident, *(setup[k] for k in keys))

    def setup_of(self) -> dict:
        """What a worker process needs besides its models to score as this evaluator does (windows, references, objectives)."""
        return {
            "windows": self.windows,
            "refs": self.refs["full"],
            "refs_screen": self.refs["screen"],
            "objectives": self.objectives,
            "experts": self.experts,
            "general": self.general,
            "directions": self.directions,
            "drop": self.drop,
        }

    def close(self) -> None:
        self.resident.close()

    def _score(self, level: str) -> dict:
        losses = self.resident.losses(self.windows[level], units=self._units)
        scores = scores_of(losses, self.refs[level], self.experts, self.general) if self.experts else {}
        values = objective_values(scores, self.objectives, losses)
        return {"losses": losses, "scores": scores, "values": values}

    def run(self, task) -> dict[str, Any]:
        t0 = time.perf_counter()
        out: dict[str, Any] = {"level": task.level}
        try:
            if self.drop:
                self._units = {(int(i), "layer") for i in task.params["drop"]}
            else:
                self._units = None
                self.resident.apply(task.recipe, seed=MERGE_SEED)
            level = "screen" if task.level == "screen" else "full"
            res = self._score(level)
            if (
                level == "screen"
                and task.promote is not None
                and res["values"] is not None
                and _reaches(res["values"][0], task.promote, self.directions[0])
            ):
                out["screen"] = {"values": res["values"], "losses": res["losses"]}
                res = self._score("full")
                out["level"] = "full"
            out.update(res)
            if res["values"] is None:
                out["failed"] = "an objective is undefined (a non-finite loss, or an expert no better than the base)"
        except SpliceError as e:  # a candidate the methods refuse (e.g. weights that normalize to 0): a failed trial, the study goes on
            out["failed"] = str(e)
        out["seconds"] = time.perf_counter() - t0
        return out

    _units = None


def _reaches(value: float, threshold: Any, up: bool) -> bool:
    if threshold is True:  # nothing to compare with yet: re-score
        return True
    return value >= threshold if up else value <= threshold


def references(resident, base: str, experts: dict[str, str], windows: dict, drop: bool = False) -> dict[str, dict[str, float]]:
    """Loss per domain of the base (``"base"``) and of each expert (by its domain)."""
    out = {}
    for name, ref in [("base", base), *experts.items()]:
        resident.load_reference(ref)
        out[name] = resident.losses(windows)
    if drop:
        resident.load_reference(base)
    return out
