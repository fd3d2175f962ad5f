"""Skip strategies and the plans they make: which layers (or MLP blocks) to drop. Torch-free.

A strategy gets the model's cost model, the number of units to drop (or a target
speedup, turned into a count with the cost model) and, when it needs data,
hidden-state statistics from calibration text. It returns the units to drop
and the scores behind the choice. Strategies live in the ``STRATEGIES``
registry; this module imports no torch, so ``splice --help`` reads their
summaries from it.

* ``balanced`` (Liu et al. 2024, Unified Layer Skipping): no data; the count
  comes from the target speedup, the dropped layers are spread evenly over the
  intermediate layers, first and last kept.
* ``block-influence`` (Men et al. 2024, ShortGPT): drop the layers with the
  lowest Block Influence, 1 - mean cos(stream before, stream after).
* ``angular`` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the
  Deeper Layers"): drop the contiguous block of n layers whose input and output
  are closest in mean angular distance arccos(cos)/pi.
* ``ffn`` (after FFN-SkipLLM, Jaiswal et al. 2024): drop only MLP blocks, the
  ones that change the residual stream least (1 - mean cos before/after the
  block); attention and its KV cache stay.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .. import architecture as arch
from ..errors import option
from ..registry import Registry, UnknownName
from .errors import SkipError, check_float, check_int
from .units import ranges

if TYPE_CHECKING:
    from .calibration import HiddenStats
    from .costs import LayerCosts


@dataclass(frozen=True)
class Strategy:
    """A registered skip strategy: ``choose(costs, stats, drop=, ratio=, speedup=)`` -> (layers, mlps, scores, score name)."""

    name: str
    choose: Callable
    unit: str  # "layer" or "mlp"
    needs_data: bool
    summary: str
    paper: str


class UnknownStrategy(UnknownName, SkipError):
    """A skip strategy name that is not registered (with the closest one suggested)."""


STRATEGIES: Registry[Strategy] = Registry("skip strategy", error=UnknownStrategy)


def skip_strategy(name: str, *, unit: str = "layer", needs_data: bool = True, summary: str = "", paper: str = ""):
    """Decorator: register ``choose`` as the skip strategy ``name``."""

    def deco(choose: Callable) -> Callable:
        STRATEGIES.add(name, Strategy(name, choose, unit, needs_data, summary, paper))
        return choose

    return deco


@dataclass
class SkipPlan:
    model: str
    strategy: str
    num_layers: int
    drop_layers: list[int]
    drop_mlp: list[int]
    scores: dict[str, float]  # what the planner ranked ("layer 3", "block 10-14", "mlp 5") -> score
    score_name: str
    params_total: int
    params_after: int
    compute_total: int  # parameters touched per token
    compute_after: int
    calibration_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def kept_layers(self) -> list[int]:
        drop = set(self.drop_layers)
        return [i for i in range(self.num_layers) if i not in drop]

    @property
    def predicted_speedup(self) -> float:
        return self.compute_total / self.compute_after if self.compute_after else math.inf

    @property
    def units(self) -> set[tuple[int, str]]:
        """The plan as a runtime skip set: (layer, "layer") and (layer, "mlp") units."""
        return {(i, "layer") for i in self.drop_layers} | {(i, "mlp") for i in self.drop_mlp}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kept_layers"] = self.kept_layers
        d["predicted_speedup"] = self.predicted_speedup
        return d

    def describe(self) -> str:
        what = "MLP blocks" if self.drop_mlp else "layers"
        dropped = self.drop_mlp or self.drop_layers
        lines = [
            f"{self.model}: {self.strategy} plan, drop {len(dropped)} of {self.num_layers} {what}: {ranges(dropped) or 'none'}",
        ]
        if self.drop_layers:
            lines.append(f"  kept layers ({len(self.kept_layers)}): {ranges(self.kept_layers)}")
        if self.scores:
            chosen = {_key(self, i) for i in dropped}
            lines.append(
                f"  {self.score_name}" + (f" (on {self.calibration_tokens} calibration tokens)" if self.calibration_tokens else "") + ":"
            )
            items = list(self.scores.items())
            for k in range(0, len(items), 6):
                lines.append("    " + "  ".join(f"{'*' if n in chosen else ' '}{n}={v:.4f}" for n, v in items[k : k + 6]))
        dp = 1 - self.params_after / self.params_total
        dc = 1 - self.compute_after / self.compute_total
        lines.append(
            f"  parameters {_count(self.params_total)} -> {_count(self.params_after)} (-{dp:.1%}); "
            f"per-token compute -{dc:.1%}; predicted decode speedup {self.predicted_speedup:.2f}x"
        )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _key(p: SkipPlan, i: int) -> str:
    if p.strategy == "angular":
        start = min(p.drop_layers) if p.drop_layers else 0
        return f"block {start}-{start + len(p.drop_layers) - 1}" if i == start else ""
    return f"mlp {i}" if p.drop_mlp else f"layer {i}"


def _count(n: int) -> str:
    for unit, d in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= d:
            return f"{n / d:.1f}{unit}"
    return str(n)


# ------------------------------------------------------------------ how many units


def check_count(drop: int | None, ratio: float | None, speedup: float | None) -> None:
    """Exactly one of ``drop`` (>= 0), ``ratio`` (in [0, 1)) or ``speedup`` (>= 1) given; else a ``SkipError``."""
    if sum(x is not None for x in (drop, ratio, speedup)) != 1:
        raise SkipError(f"give exactly one of {option('drop', 'N')}, {option('ratio', 'F')} or {option('speedup', 'X')}")
    if drop is not None:
        check_int("drop", drop, 0)
    elif ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:  # NaN fails too
            raise SkipError(f"{option('ratio', ratio)}: must be in [0, 1)")
    else:
        check_float("speedup", speedup, 1.0)


def count_for(
    costs: LayerCosts,
    unit: str,
    choose: Callable[[int], list[int]],
    *,
    drop: int | None,
    ratio: float | None,
    speedup: float | None,
    max_units: int | None = None,
) -> int:
    """The number of units to drop from exactly one of ``drop``, ``ratio`` (of the units) or ``speedup``.

    For ``speedup`` it is the smallest count whose choice (``choose(n)``) reaches
    the target by the cost model.
    """
    check_count(drop, ratio, speedup)
    n_units = costs.num_layers
    limit = n_units - 1 if max_units is None else max_units
    what = "MLP blocks" if unit == "mlp" else "layers"
    if drop is not None:
        if drop > limit:
            raise SkipError(f"{option('drop', drop)}: the model has {n_units} {what}; at most {limit} can be dropped")
        return drop
    if ratio is not None:
        n = round(ratio * n_units)
        if n > limit:
            raise SkipError(f"{option('ratio', ratio)}: {n} of {n_units} {what}; at most {limit} can be dropped")
        return n

    def predicted(n: int) -> float:
        return costs.speedup(layers=choose(n)) if unit == "layer" else costs.speedup(mlps=choose(n))

    for n in range(0, limit + 1):
        if predicted(n) >= speedup - 1e-9:
            return n
    raise SkipError(
        f"{option('speedup', speedup)}: dropping {limit} of {n_units} {what} gives only {predicted(limit):.2f}x by the cost model"
    )


# ------------------------------------------------------------------ planners


@skip_strategy(
    "balanced",
    needs_data=False,
    summary="spread the dropped layers evenly over the intermediate layers (no data)",
    paper="Liu et al. 2024, Unified Layer Skipping (arXiv:2404.06954)",
)
def plan_balanced(costs: LayerCosts, stats: HiddenStats | None, *, drop=None, ratio=None, speedup=None):
    L = costs.num_layers
    if L < 3:
        raise SkipError(f"balanced keeps the first and last layer; the model has only {L} layers")
    n = count_for(costs, "layer", lambda k: _spread(L, k), drop=drop, ratio=ratio, speedup=speedup, max_units=L - 2)
    return _spread(L, n), [], {}, ""


def _spread(L: int, n: int) -> list[int]:
    """``n`` layers spread evenly over layers 1..L-2: the centres of n equal bins."""
    if n == 0:
        return []
    width = (L - 2) / n
    return [1 + int((k + 0.5) * width) for k in range(n)]


@skip_strategy(
    "block-influence",
    summary="drop the layers whose output is most similar to their input",
    paper="Men et al. 2024, ShortGPT (arXiv:2403.03853)",
)
def plan_block_influence(costs: LayerCosts, stats: HiddenStats, *, drop=None, ratio=None, speedup=None):
    L = costs.num_layers
    bi = [1.0 - float(stats.cos[i, i + 1]) for i in range(L)]
    order = sorted(range(L), key=lambda i: (bi[i], i))
    n = count_for(costs, "layer", lambda k: order[:k], drop=drop, ratio=ratio, speedup=speedup)
    return sorted(order[:n]), [], {f"layer {i}": bi[i] for i in range(L)}, "block influence (1 - cos)"


@skip_strategy(
    "angular",
    summary="drop the contiguous block of layers with the smallest angular distance across it",
    paper="Gromov et al. 2024, The Unreasonable Ineffectiveness of the Deeper Layers (arXiv:2403.17887)",
)
def plan_angular(costs: LayerCosts, stats: HiddenStats, *, drop=None, ratio=None, speedup=None):
    L = costs.num_layers

    def distances(n: int) -> dict[int, float]:
        return {s: float(stats.angle[s, s + n]) / math.pi for s in range(0, L - n + 1)}

    def best_block(n: int) -> list[int]:
        if n == 0:
            return []
        d = distances(n)
        start = min(d, key=lambda s: (d[s], s))
        return list(range(start, start + n))

    n = count_for(costs, "layer", best_block, drop=drop, ratio=ratio, speedup=speedup)
    if n == 0:
        return [], [], {}, ""
    return (
        best_block(n),
        [],
        {f"block {s}-{s + n - 1}": v for s, v in distances(n).items()},
        f"angular distance across {n} layers (arccos/pi)",
    )


@skip_strategy(
    "ffn",
    unit="mlp",
    summary="drop only MLP blocks, those that change the residual stream least",
    paper="after Jaiswal et al. 2024, FFN-SkipLLM (arXiv:2404.03865)",
)
def plan_ffn(costs: LayerCosts, stats: HiddenStats, *, drop=None, ratio=None, speedup=None):
    L = costs.num_layers
    if any(math.isnan(float(v)) for v in stats.mlp_cos):
        raise SkipError("ffn: cannot find the norm before each MLP block in this architecture")
    missing = [i for i in range(L) if i not in costs.mlp_output]
    if missing:
        raise SkipError(
            f"ffn: cannot find the MLP output projection of layer {missing[0]} (looked for {', '.join(n + '.weight' for n in arch.MLP_OUTPUT_NAMES[:2])}, ...)"
        )
    score = [1.0 - float(stats.mlp_cos[i]) for i in range(L)]
    order = sorted(range(L), key=lambda i: (score[i], i))
    n = count_for(costs, "mlp", lambda k: order[:k], drop=drop, ratio=ratio, speedup=speedup, max_units=L)
    return [], sorted(order[:n]), {f"mlp {i}": score[i] for i in range(L)}, "MLP influence (1 - cos before/after the block)"


# ------------------------------------------------------------------ entry point


def make_plan(
    costs: LayerCosts, strategy: str, stats: HiddenStats | None = None, *, model: str = "model", drop=None, ratio=None, speedup=None
) -> SkipPlan:
    """A :class:`SkipPlan` from a cost model and (for data-aware strategies) hidden-state statistics.

    Args:
        costs: the model's cost model (``layer_costs``).
        strategy: a name in ``STRATEGIES``.
        stats: hidden-state statistics from calibration text (``hidden_stats``); needed by data-aware strategies.
        model: the model's reference, recorded in the plan.
        drop, ratio, speedup: exactly one: units to drop, a fraction of them, or a predicted decode speedup.

    Returns:
        The plan: what to drop, the scores behind the choice, parameter and compute before and after.
    """
    s = STRATEGIES.get(strategy)
    if s.needs_data and stats is None:
        raise SkipError(f"strategy {strategy!r} needs calibration text: pass {option('calibration', 'FILE')}")
    if stats is not None and stats.num_layers != costs.num_layers:
        raise SkipError(f"calibration statistics cover {stats.num_layers} layers, the model has {costs.num_layers}")
    layers, mlps, scores, score_name = s.choose(costs, stats, drop=drop, ratio=ratio, speedup=speedup)
    notes = []
    if speedup is not None:
        notes.append(f"target {speedup:.2f}x; the cost model predicts {costs.speedup(layers, mlps):.2f}x for this plan")
    return SkipPlan(
        model=model,
        strategy=strategy,
        num_layers=costs.num_layers,
        drop_layers=sorted(layers),
        drop_mlp=sorted(mlps),
        scores=scores,
        score_name=score_name,
        params_total=costs.total_params,
        params_after=costs.params_without(layers, mlps),
        compute_total=costs.compute_total,
        compute_after=costs.compute_without(layers, mlps),
        calibration_tokens=stats.tokens if stats is not None else 0,
        notes=notes,
    )
