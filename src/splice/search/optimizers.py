"""Search optimizers, one registry: ``OPTIMIZERS.get("cmaes")``; a wrong name gets a did-you-mean.

An optimizer proposes candidates one at a time and learns their values::

    opt = OPTIMIZERS.get("tpe").make(space, directions, seed)
    params = opt.ask()           # gene name -> value (see splice.search.space)
    opt.tell(params, values)     # one value per objective, or None for a failed trial

Given the same space, directions, seed and history of asks and tells, ``ask`` proposes the
same candidates: that is how a study resumes (it replays its asks and tells through a fresh
optimizer). Several candidates may be out at once (``--workers``): ``tell`` names the candidate
by its params, in any order. ``ask`` may return None, "nothing to propose until a result comes
back" (the default optimizer between its method sweep and CMA-ES); it then changes no state.

- ``random``: uniform over every gene (the baseline; needs nothing but the standard library);
- ``tpe``, ``cmaes``, ``nsga2``: optuna's samplers (the ``search`` extra: optuna and cmaes);
- ``evopress``: a drop space's evolutionary search (``splice.search.evopress``);
- ``default``: a drop space: evopress; else a sweep of the space's methods, each at its hand-tuned values (equal weights,
  density 0.5), then CMA-ES (the ``cmaes`` package) over the best method's numbers, started at
  that method's hand-tuned point; with several objectives, optuna's TPE after the sweep.
  On the tiny zoo the method mattered more than per-layer knobs, hence the sweep first.

Imports neither torch nor optuna until an optimizer is made.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SpliceError
from ..registry import Registry

NSGA2_POPULATION = 16  # candidates per NSGA-II generation: small, so a budget of ~100 sees several generations
DEFAULT_SIGMA = 0.2  # CMA-ES step size of the default optimizer, as a share of each gene's range
FAILED_VALUE = 1e9  # what a failed trial counts as for CMA-ES (minimized): worse than any real score


class SearchError(SpliceError):
    """A search that cannot go on as asked: a missing optional package, a study that does not replay."""


@dataclass(frozen=True)
class Optimizer:
    name: str
    summary: str
    make: Callable[..., Any]  # (space, directions, seed) -> an object with ask() and tell(params, values)
    multi_objective: bool = True
    spaces: tuple[str, ...] = ("merge",)  # the kinds of space it searches: "merge" (space.methods...), "drop" (space.drop)

    def problem(self, space_spec) -> str | None:
        """Why this optimizer cannot search a spec's space (a ``SpaceSpec``), or None."""
        kind = "drop" if space_spec.drop is not None else "merge"
        if kind in self.spaces:
            return None
        if kind == "drop":
            return f"optimizer {self.name!r} searches merge parameters; a drop space is searched by evopress (the default) or random"
        return f"optimizer {self.name!r} searches a drop space (space.drop); merge parameters are searched by {', '.join(MERGE_OPTIMIZERS)}"


OPTIMIZERS: Registry[Optimizer] = Registry("search optimizer")


def _optuna():
    try:
        import optuna
    except ImportError:
        raise SearchError("this optimizer needs optuna: install splice's search extra (pip install 'splice[search]')") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def suggest_random(rng: random.Random) -> Callable:
    def suggest(g) -> Any:
        if g.kind == "categorical":
            return rng.choice(list(g.choices))
        if g.kind == "int":
            return rng.randint(int(g.low), int(g.high))
        return rng.uniform(g.low, g.high)

    return suggest


def params_key(params: dict) -> str:
    """A candidate's identity: its params as canonical JSON."""
    return json.dumps(params, sort_keys=True)


def _take(out: list[tuple[str, Any]], params: dict) -> Any:
    """The state kept for the first outstanding candidate with these params, removed from ``out``."""
    key = params_key(params)
    for i, (k, v) in enumerate(out):
        if k == key:
            del out[i]
            return v
    raise SearchError(f"a result came back for a candidate the optimizer has not asked for (or was told already): {key[:80]}")


class RandomSearch:
    """Every gene uniform in its range, from one seeded generator."""

    def __init__(self, space, directions: list[bool], seed: int):
        self.space = space
        self.suggest = suggest_random(random.Random(seed))

    def ask(self) -> dict:
        return self.space.propose(self.suggest)

    def tell(self, params: dict, values: list[float] | None) -> None:
        pass


class OptunaSearch:
    """An optuna study in memory, asked and told one trial at a time."""

    def __init__(self, space, directions: list[bool], sampler):
        optuna = _optuna()
        self.space = space
        self.optuna = optuna
        self.study = optuna.create_study(directions=["maximize" if up else "minimize" for up in directions], sampler=sampler)
        self.trial = None
        self.out: list[tuple[str, Any]] = []  # (params key, optuna trial) of every candidate asked and not yet told
        self.method: str | None = None  # fixes the method gene (the default optimizer's second phase)

    def _suggest(self, g) -> Any:
        if g.kind == "categorical":
            return self.trial.suggest_categorical(g.name, list(g.choices))
        if g.kind == "int":
            return self.trial.suggest_int(g.name, int(g.low), int(g.high))
        return self.trial.suggest_float(g.name, g.low, g.high)

    def ask(self) -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's experimental and independent-sampling notes
            self.trial = self.study.ask()
            params = self.space.propose(self._suggest, method=self.method)
        self.out.append((params_key(params), self.trial))
        self.trial = None
        return params

    def tell(self, params: dict, values: list[float] | None) -> None:
        trial = _take(self.out, params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if values is None:
                self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(trial, values)


def _tpe(space, directions, seed):
    optuna = _optuna()
    return OptunaSearch(space, directions, optuna.samplers.TPESampler(seed=seed))


def _cmaes(space, directions, seed):
    optuna = _optuna()
    if len(directions) > 1:
        raise SearchError("optimizer 'cmaes' follows one objective; for several use nsga2 or tpe")
    try:
        import cmaes  # noqa: F401  (optuna's CMA-ES sampler runs on it)
    except ImportError:
        raise SearchError(
            "optimizer 'cmaes' needs the cmaes package: install splice's search extra (pip install 'splice[search]')"
        ) from None
    return OptunaSearch(space, directions, optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False))


def _nsga2(space, directions, seed):
    optuna = _optuna()
    return OptunaSearch(space, directions, optuna.samplers.NSGAIISampler(seed=seed, population_size=NSGA2_POPULATION))


class WarmStartSearch:
    """The default: sweep every method at its hand-tuned point, then search the best method's numbers.

    One objective: CMA-ES from the ``cmaes`` package, its mean at the best method's hand-tuned
    point, step ``DEFAULT_SIGMA`` of each range, over genes scaled to [0, 1]. Several: optuna's TPE
    with the method fixed.
    """

    def __init__(self, space, directions: list[bool], seed: int):
        self.space = space
        self.directions = directions
        self.seed = seed
        self.sweep = [space.start(m) for m in space.methods]
        self.asked = 0
        self.results: list[tuple[dict, list[float] | None]] = []
        self.inner = None
        self.cma = None
        self.generation: list[tuple[Any, float]] = []
        self.out: list[tuple[str, Any]] = []  # CMA-ES candidates asked and not yet told

    def _best_method(self) -> str:
        ok = [(p, v) for p, v in self.results if v is not None]
        if not ok:
            return self.space.method_of(self.sweep[0])
        up = self.directions[0]
        best = max(ok, key=lambda pv: pv[1][0] if up else -pv[1][0])
        return self.space.method_of(best[0])

    def _start_phase_two(self) -> None:
        method = self._best_method()
        self.method = method
        self.genes = self.space.genes(method)
        if len(self.directions) > 1 or not self.genes:
            optuna = _optuna()
            self.inner = OptunaSearch(self.space, self.directions, optuna.samplers.TPESampler(seed=self.seed))
            self.inner.method = method
            return
        try:
            import numpy as np
            from cmaes import CMA
        except ImportError:
            raise SearchError(
                "the default optimizer needs the cmaes package: install splice's search extra (pip install 'splice[search]')"
            ) from None
        start = self.space.start(method)
        mean = np.array([(start[g.name] - g.low) / (g.high - g.low) for g in self.genes], dtype=float)
        bounds = np.array([[0.0, 1.0]] * len(self.genes))
        # cmaes needs two dimensions at least; one gene gets a dummy second coordinate
        if len(self.genes) == 1:
            mean = np.append(mean, 0.5)
            bounds = np.array([[0.0, 1.0]] * 2)
        self.cma = CMA(mean=mean, sigma=DEFAULT_SIGMA, bounds=bounds, seed=self.seed)

    def ask(self) -> dict:
        if self.asked < len(self.sweep):
            self.asked += 1
            return dict(self.sweep[self.asked - 1])
        if self.inner is None and self.cma is None:
            if len(self.results) < len(self.sweep):
                return None  # phase two starts from the sweep's best: wait for the sweep's results
            self._start_phase_two()
        self.asked += 1
        if self.inner is not None:
            return self.inner.ask()
        x = self.cma.ask()
        values = {}
        for g, u in zip(self.genes, x):
            v = g.low + float(u) * (g.high - g.low)
            values[g.name] = int(round(v)) if g.kind == "int" else min(max(v, g.low), g.high)
        params = self.space.propose(lambda g: values[g.name], method=self.method)
        self.out.append((params_key(params), x))
        return params

    def tell(self, params: dict, values: list[float] | None) -> None:
        if self.inner is None and self.cma is None:
            self.results.append((params, values))
            return
        if self.inner is not None:
            self.inner.tell(params, values)
            return
        if values is None or not math.isfinite(values[0]):
            loss = FAILED_VALUE
        else:
            loss = -values[0] if self.directions[0] else values[0]
        self.generation.append((_take(self.out, params), loss))
        if len(self.generation) == self.cma.population_size:
            self.cma.tell(self.generation)
            self.generation = []


def _default(space, directions, seed):
    if space.kind == "drop":
        from .evopress import EvoPress

        return EvoPress(space, directions, seed)
    return WarmStartSearch(space, directions, seed)


def _evopress(space, directions, seed):
    from .evopress import EvoPress

    if len(directions) > 1:
        raise SearchError("optimizer 'evopress' follows one objective")
    return EvoPress(space, directions, seed)


MERGE_OPTIMIZERS = ("default", "random", "tpe", "cmaes", "nsga2")
OPTIMIZERS.add(
    "default",
    Optimizer(
        "default",
        "sweep the methods at hand-tuned values, then CMA-ES on the best one; a drop space: evopress",
        _default,
        spaces=("merge", "drop"),
    ),
)
OPTIMIZERS.add("random", Optimizer("random", "uniform random search (the baseline)", RandomSearch, spaces=("merge", "drop")))
OPTIMIZERS.add("tpe", Optimizer("tpe", "optuna's tree-structured Parzen estimator", _tpe))
OPTIMIZERS.add("cmaes", Optimizer("cmaes", "optuna's CMA-ES (one objective)", _cmaes, multi_objective=False))
OPTIMIZERS.add("nsga2", Optimizer("nsga2", "optuna's NSGA-II (Pareto front of several objectives)", _nsga2))
OPTIMIZERS.add(
    "evopress",
    Optimizer(
        "evopress",
        "EvoPress: evolve the drop set from splice skip's planners, level-switch mutation, screen then re-score",
        _evopress,
        multi_objective=False,
        spaces=("drop",),
    ),
)
