"""Skip plans: which layers (or MLP blocks) to drop, chosen by a registered planner.

A planner gets the model's cost model, the number of units to drop (or a target
speedup, turned into a count with the cost model) and, when it needs data,
hidden-state statistics from calibration text. It returns the units to drop
and the scores behind the choice.

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

from .model import HiddenStats, LayerCosts, SkipError

STRATEGIES: dict[str, Planner] = {}


@dataclass(frozen=True)
class Planner:
    name: str
    fn: Callable
    unit: str  # "layer" or "mlp"
    needs_data: bool
    summary: str
    paper: str


def planner(name: str, *, unit: str = "layer", needs_data: bool = True, summary: str = "", paper: str = ""):
    def deco(fn):
        if name in STRATEGIES:
            raise ValueError(f"skip strategy {name!r} registered twice")
        STRATEGIES[name] = Planner(name, fn, unit, needs_data, summary, paper)
        return fn

    return deco


def get_planner(name: str) -> Planner:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise SkipError(f"unknown skip strategy {name!r} (known: {', '.join(STRATEGIES)})") from None


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
            f"{self.model}: {self.strategy} plan, drop {len(dropped)} of {self.num_layers} {what}: {_ranges(dropped) or 'none'}",
        ]
        if self.drop_layers:
            lines.append(f"  kept layers ({len(self.kept_layers)}): {_ranges(self.kept_layers)}")
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


def _ranges(ix: list[int]) -> str:
    ix = sorted(ix)
    out, start = [], None
    for k, i in enumerate(ix):
        if start is None:
            start = i
        if k + 1 == len(ix) or ix[k + 1] != i + 1:
            out.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)


def _count(n: int) -> str:
    for unit, d in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= d:
            return f"{n / d:.1f}{unit}"
    return str(n)


# ------------------------------------------------------------------ how many units


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
    given = [x is not None for x in (drop, ratio, speedup)]
    if sum(given) != 1:
        raise SkipError("give exactly one of --drop N, --ratio F or --speedup X")
    n_units = costs.num_layers
    limit = n_units - 1 if max_units is None else max_units
    what = "MLP blocks" if unit == "mlp" else "layers"
    if drop is not None:
        if drop < 0:
            raise SkipError(f"--drop {drop}: must be >= 0")
        if drop > limit:
            raise SkipError(f"--drop {drop}: the model has {n_units} {what}; at most {limit} can be dropped")
        return drop
    if ratio is not None:
        if not 0 <= ratio < 1:
            raise SkipError(f"--ratio {ratio}: must be in [0, 1)")
        n = round(ratio * n_units)
        if n > limit:
            raise SkipError(f"--ratio {ratio}: {n} of {n_units} {what}; at most {limit} can be dropped")
        return n
    if not speedup >= 1:  # noqa: SIM300 - also catches NaN
        raise SkipError(f"--speedup {speedup}: must be at least 1")

    def predicted(n: int) -> float:
        return costs.speedup(layers=choose(n)) if unit == "layer" else costs.speedup(mlps=choose(n))

    for n in range(0, limit + 1):
        if predicted(n) >= speedup - 1e-9:
            return n
    raise SkipError(f"--speedup {speedup}: dropping {limit} of {n_units} {what} gives only {predicted(limit):.2f}x by the cost model")


# ------------------------------------------------------------------ planners


@planner(
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


@planner(
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


@planner(
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


@planner(
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
            f"ffn: cannot find the MLP output projection of layer {missing[0]} (looked for {', '.join(n + '.weight' for n in ('mlp.down_proj', 'mlp.c_proj'))}, ...)"
        )
    score = [1.0 - float(stats.mlp_cos[i]) for i in range(L)]
    order = sorted(range(L), key=lambda i: (score[i], i))
    n = count_for(costs, "mlp", lambda k: order[:k], drop=drop, ratio=ratio, speedup=speedup, max_units=L)
    return [], sorted(order[:n]), {f"mlp {i}": score[i] for i in range(L)}, "MLP influence (1 - cos before/after the block)"


# ------------------------------------------------------------------ entry point


def make_plan(
    costs: LayerCosts, strategy: str, stats: HiddenStats | None = None, *, model: str = "model", drop=None, ratio=None, speedup=None
) -> SkipPlan:
    """A :class:`SkipPlan` from a cost model and (for data-aware strategies) hidden-state statistics."""
    p = get_planner(strategy)
    if p.needs_data and stats is None:
        raise SkipError(f"strategy {strategy!r} needs calibration text: pass --calibration FILE")
    if stats is not None and stats.num_layers != costs.num_layers:
        raise SkipError(f"calibration statistics cover {stats.num_layers} layers, the model has {costs.num_layers}")
    layers, mlps, scores, score_name = p.fn(costs, stats, drop=drop, ratio=ratio, speedup=speedup)
    notes = []
    if speedup is not None:
        s = costs.speedup(layers, mlps)
        notes.append(f"target {speedup:.2f}x; the cost model predicts {s:.2f}x for this plan")
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
