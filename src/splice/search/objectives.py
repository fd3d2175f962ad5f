"""Objectives: what a trial's per-domain losses are worth, with splice eval's normalized score.

``normalized_d`` is the share of expert d's gain over the base that the candidate
keeps on domain d (:func:`splice.eval.normalized_scores`). The objectives are

- ``mean``: the mean of ``normalized_d`` over the expert domains (maximized);
- ``worst``: the smallest ``normalized_d`` (maximized);
- ``forgetting``: the relative loss change on the general domain (minimized);
- ``loss``: the mean held-out loss over every domain (minimized; needs no experts: a drop space's objective);
- ``<domain>``: one expert domain's ``normalized_d`` (maximized).

Torch-free.
"""

from __future__ import annotations

import math

from ..eval.scores import normalized_scores
from .spec import OBJECTIVES

CANDIDATE = "<candidate>"


def scores_of(losses: dict[str, float], references: dict[str, dict[str, float]], experts: list[str], general: str | None) -> dict:
    """splice eval's scores of one candidate against the references (``"base"`` and each expert domain's model).

    Args:
        losses: the candidate's loss per domain.
        references: loss per domain of ``"base"`` and of each expert (keyed by its domain).
        experts: the expert domains; general: the general domain or None.

    Returns:
        ``{"per_domain", "normalized", "min_normalized", "forgetting"?}``.
    """
    table = {CANDIDATE: losses, **{f"expert:{d}" if d != "base" else "base": v for d, v in references.items()}}
    return normalized_scores(table, "base", {d: f"expert:{d}" for d in experts}, general)[CANDIDATE]


def objective_values(scores: dict, objectives: list[str], losses: dict[str, float] | None = None) -> list[float] | None:
    """The objectives' values (None when one is undefined: an expert no better than the base, a non-finite loss)."""
    out = []
    for name in objectives:
        if name == "loss":
            v = sum(losses.values()) / len(losses) if losses else None
        elif name == "mean":
            v = scores.get("normalized")
        elif name == "worst":
            v = scores.get("min_normalized")
        elif name == "forgetting":
            v = scores.get("forgetting")
        else:
            v = scores.get("per_domain", {}).get(name)
        if v is None or not math.isfinite(v):
            return None
        out.append(float(v))
    return out


def better(a: list[float], b: list[float] | None, objectives: list[str]) -> bool:
    """Whether ``a`` beats ``b`` on the first objective (the one ``best.yaml`` follows)."""
    if b is None:
        return True
    return a[0] > b[0] if OBJECTIVES.get(objectives[0], True) else a[0] < b[0]


def dominates(a: list[float], b: list[float], directions: list[bool]) -> bool:
    """Pareto dominance: ``a`` at least as good on every objective and better on one."""
    ge = [(x >= y) if up else (x <= y) for x, y, up in zip(a, b, directions)]
    gt = [(x > y) if up else (x < y) for x, y, up in zip(a, b, directions)]
    return all(ge) and any(gt)


def pareto_front(points: list[tuple[int, list[float]]], directions: list[bool]) -> list[int]:
    """The ids of the non-dominated points (``(id, values)`` pairs), in the order given."""
    return [i for i, v in points if not any(dominates(w, v, directions) for j, w in points if j != i)]
