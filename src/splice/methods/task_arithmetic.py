"""The task-arithmetic family: one function, eight methods, configured by a table.

task_arithmetic, TIES, DARE, Breadcrumbs and DELLA (and their linear / TIES
variants) are mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge``: the same
pipeline with two switches, the sparsification of each task vector and whether
signs are elected, plus the defaults of ``normalize`` and ``rescale``
(``FAMILY`` below).  For one parameter, with base ``b`` and fine-tunes ``t_i``
(weights ``w_i``):

1. task vectors ``d_i = t_i - b``;
2. optional sparsification of each ``d_i`` on its own (magnitude, random,
   breadcrumbs, della; ``_sparsify``), with mergekit's L1 ``rescale``;
3. weighting ``d_i <- w_i * d_i``;
4. either a plain sum ``m = sum_i d_i`` with divisor ``sum_i w_i``, or a TIES
   sign consensus (``_consensus``) whose divisor, per element, is the sum of
   the agreeing models' weights;
5. ``m /= divisor`` if ``normalize``; ``m *= lambda``; result ``b + m``.

**Divisions by a sum of weights** (``normalize``).  Plain sum: weights whose sum
is below ``WEIGHT_SUM_EPS`` in magnitude are an error (mergekit skips the
division there and writes the unnormalized sum as if it were a model).  Sign
consensus: an element where no model takes part has divisor 0 and keeps the
base, as in mergekit (meaningful: nothing to add); an element where models do
take part but their weights cancel (possible only with negative weights) is an
error, since mergekit's result there is a sum passed off as an average.

Deltas are processed one model at a time into running sums, so memory stays at
a few tensors whatever the number of models.  mergekit applies the same steps
to every tensor, 1-D or not, embeddings included (it refuses mismatched shapes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import _chunked, _kernels
from ._consensus import SignConsensus
from ._sparsify import SORT_LIMIT, breadcrumbs_, dare_keys, della_, magnitude_, random_
from .registry import FRACTION, MergeMethod, Param, Range, register

Sparsifier = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]

WEIGHT_SUM_EPS = 1e-8  # |sum of weights| below this counts as 0 (mergekit's threshold for the plain sum)


@dataclass(frozen=True)
class Variant:
    """One row of the family table: a method name and its two switches and two defaults."""

    name: str
    sparsification: str | None  # None, "magnitude", "random", "magnitude_outliers" or "della_magprune"
    consensus: bool  # TIES sign election
    normalize: bool  # default of ``normalize``
    rescale: bool  # default of ``rescale``
    summary: str
    paper: str


_DARE = "Yu et al. 2024, Language Models are Super Mario (DARE) (arXiv:2311.03099)"
_CRUMBS = "Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795)"
_DELLA = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"

# fmt: off
FAMILY = (
    Variant("task_arithmetic", None, False, False, False,
            "base + lambda * sum_i weight_i * (model_i - base); density and rescale are accepted but unused",
            "Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089)"),
    Variant("ties", "magnitude", True, True, False,
            "trim task vectors to the top-density magnitudes, elect a sign per element, average the agreeing ones",
            "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models (arXiv:2306.01708)"),
    Variant("dare_linear", "random", False, False, True,
            "keep each task-vector entry with probability density, rescale to the original L1 norm, add the weighted sum", _DARE),
    Variant("dare_ties", "random", True, False, True,
            "DARE random drop and L1 rescale of each task vector, then TIES sign consensus", _DARE),
    Variant("breadcrumbs", "magnitude_outliers", False, False, False,
            "drop the gamma largest and the smallest magnitudes (keeping density) of each task vector, add the weighted sum", _CRUMBS),
    Variant("breadcrumbs_ties", "magnitude_outliers", True, False, False,
            "Breadcrumbs outlier-and-small-magnitude drop, then TIES sign consensus", _CRUMBS),
    Variant("della", "della_magprune", True, True, True,
            "drop task-vector entries with probability falling with their magnitude rank per row, L1 rescale, TIES consensus", _DELLA),
    Variant("della_linear", "della_magprune", False, False, True,
            "DELLA MagPrune drop and L1 rescale of each task vector, then the weighted sum", _DELLA),
)
# fmt: on

GAMMA = Param("gamma", default=0.01, per_model=True, range=FRACTION, help="fraction of largest-magnitude outliers dropped")
EPSILON = Param(
    "epsilon",
    default=0.15,
    per_model=True,
    range=Range(0.0, 1.0, high_open=True),
    help="spread of keep probabilities around density, by magnitude rank (density +- epsilon must lie in (0, 1))",
)
EXTRA_PARAM = {"magnitude_outliers": GAMMA, "della_magprune": EPSILON}
RANDOMIZED = {"random", "della_magprune"}
# Whole-tensor magnitude trims, DARE drops and plain sums upcast chunk by chunk (``_chunked``):
# the engine can hand them the stored bf16/f16 tensors.
NATIVE_DTYPE = {None, "magnitude", "random", "magnitude_outliers", "della_magprune"}


def merge_task_vectors(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    sparsify: Sparsifier | None = None,
    trim_density: Sequence[float] | None = None,
    drops: Sequence[_chunked.Drop] | None = None,
    crumbs: Sequence[tuple[float, float]] | None = None,
    della: Sequence[tuple[float, float]] | None = None,
    rescale: bool = False,
    generator: torch.Generator | None = None,
    consensus: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Steps 1-5 of the module docstring.

    Args:
        tensors: the fine-tunes' tensors; base: the base's (same shape).
        weight: one weight per model.
        sparsify: ``sparsify(i, delta, scratch)`` sparsifies model i's ``delta``
            and returns the tensor holding the result: ``delta`` or ``scratch``
            (same shape and dtype, free working space).  Both buffers are reused
            from model to model: fresh large tensors cost page faults.
        trim_density: instead of ``sparsify``, TIES's magnitude trim without
            rescale, one density per model.
        drops: instead of ``sparsify``, DARE's random drop (``_sparsify.random_``),
            one per model: the fused kernels run it chunk by chunk.
        crumbs: instead of ``sparsify``, Breadcrumbs (``_sparsify.breadcrumbs_``),
            one (density, gamma) per model, L1-rescaled if ``rescale``: chunked
            through the kernels as well.
        della: instead of ``sparsify``, DELLA MagPrune (``_sparsify.della_``), one
            (density, epsilon) per model, L1-rescaled if ``rescale``, drawing from
            ``generator``: 2-D CPU tensors run by blocks of rows (``_chunked.della_chunked``; without
            the kernels only those above ``SORT_LIMIT`` elements).
        consensus: TIES sign election; normalize: divide by the weights; lambda_: scale.

    Returns:
        ``base + lambda * merged delta`` in float32 (float64 if the base is
        float64).  Inputs may be bfloat16 or float16; the arithmetic is float32.
        Large CPU tensors without a ``sparsify`` callback take the chunked path
        (``_chunked``), which gives the same bits faster and with less memory.

    Raises:
        ValueError: ``normalize`` would divide by weights that sum to 0 (see the module docstring).
    """
    cdt = torch.float64 if base.dtype == torch.float64 else torch.float32
    if not tensors:
        return base.to(cdt, copy=True)
    weights = [float(w) for w in weight]
    if normalize and not consensus and abs(float(torch.tensor(weights, dtype=cdt).sum())) < WEIGHT_SUM_EPS:
        raise ValueError(f"normalize divides by the sum of the weights {weights}, which is 0; set normalize: false or change the weights")
    # agreeing weights can cancel only when some weight is negative
    refuse_cancelled = normalize and consensus and min(weights) < 0
    large_cpu = base.device.type == "cpu" and SORT_LIMIT < base.numel() < 2**31
    fused = large_cpu and _kernels.AVAILABLE and cdt == torch.float32
    windows = None
    if drops is not None and not fused:
        # the same drop on the whole tensor (small tensors, no numba, float64, another device)
        whole, drops = drops, None
        sparsify = lambda i, d, s: random_(d, whole[i].density, whole[i].rescale, key=whole[i].key, scratch=s)  # noqa: E731
    if della is not None:
        # by rows: large 2-D CPU tensors, and with the kernels (faster than della_'s argsort) every 2-D CPU tensor
        by_rows = base.device.type == "cpu" and base.dim() == 2 and 0 < base.numel() < 2**31
        by_rows = by_rows and (large_cpu or (_kernels.AVAILABLE and cdt == torch.float32))
        if by_rows and generator is not None and generator.device.type == "cpu":
            merged, cancelled = _chunked.della_chunked(
                tensors,
                base,
                della=della,
                rescale=rescale,
                generator=generator,
                weights=weights,
                consensus=consensus,
                normalize=normalize,
                lambda_=lambda_,
                cdt=cdt,
                count_cancelled=refuse_cancelled,
            )
            _refuse_cancelled(refuse_cancelled, cancelled, weights)
            return merged
        sparsify = lambda i, d, s: della_(d, della[i][0], della[i][1], rescale, generator, scratch=s)  # noqa: E731
    if crumbs is not None and not fused:
        sparsify = lambda i, d, s: breadcrumbs_(d, crumbs[i][0], crumbs[i][1], rescale, scratch=s)  # noqa: E731
    elif crumbs is not None:
        windows = [
            None if dens >= 1 else _chunked.Crumbs(_chunked.breadcrumbs_window(t, base, dens, gamma), rescale)
            for t, (dens, gamma) in zip(tensors, crumbs)
        ]
    if sparsify is None and large_cpu:
        trims = None
        if trim_density is not None:
            trims = [_chunked.magnitude_trim(t, base, float(d), cdt) for t, d in zip(tensors, trim_density)]
        merged, cancelled = _chunked.merge_chunked(
            tensors,
            base,
            weights=weights,
            trims=trims,
            consensus=consensus,
            normalize=normalize,
            lambda_=lambda_,
            cdt=cdt,
            count_cancelled=refuse_cancelled,
            drops=drops,
            windows=windows,
        )
    else:
        merged, cancelled = _merge_whole(tensors, base, weights, sparsify, trim_density, consensus, normalize, lambda_, refuse_cancelled)
    _refuse_cancelled(refuse_cancelled, cancelled, weights)
    return merged


def _refuse_cancelled(refuse: bool, cancelled: int, weights: list[float]) -> None:
    if refuse and cancelled:
        raise ValueError(
            f"normalize divides each element by the weights of the models that agree on its sign, and the weights {weights} "
            f"cancel to 0 at {cancelled} element(s); set normalize: false or change the weights"
        )


def _merge_whole(
    tensors, base, weights, sparsify, trim_density, consensus, normalize, lambda_, count_cancelled
) -> tuple[torch.Tensor, int]:
    """The whole-tensor path of ``merge_task_vectors``: the result and its count of cancelled divisors."""
    cdt = torch.float64 if base.dtype == torch.float64 else torch.float32
    tensors = [t.to(cdt) for t in tensors]
    base = base.to(cdt)
    if trim_density is not None:
        dens = [float(d) for d in trim_density]
        sparsify = lambda i, d, s: magnitude_(d, dens[i], False, scratch=s)  # noqa: E731
    acc = SignConsensus(base, track_weights=normalize) if consensus else torch.zeros_like(base)
    delta = torch.empty_like(base)
    scratch = torch.empty_like(base) if sparsify is not None else None
    for i, t in enumerate(tensors):
        torch.sub(t, base, out=delta)
        if sparsify is not None:
            result = sparsify(i, delta, scratch)
            if result is scratch:  # the sparsifier wrote its result into the scratch buffer
                delta, scratch = scratch, delta
            elif result is not delta:
                delta.copy_(result)
        delta.mul_(weights[i])
        if consensus:
            acc.add(delta, weights[i])
        else:
            acc.add_(delta)
    del delta, scratch
    cancelled = 0
    if consensus:
        merged = acc.result(divisor=normalize, count_cancelled=count_cancelled)
        cancelled = acc.cancelled
    else:
        merged = acc
        if normalize:
            merged.div_(torch.tensor(weights, dtype=base.dtype).sum().item())
    if lambda_ != 1:
        merged.mul_(lambda_)
    return merged.add_(base), cancelled


def merge_family(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    sparsification: str | None,
    consensus: bool,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool,
    rescale: bool,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One member of the family, chosen by ``sparsification`` and ``consensus`` (a row of ``FAMILY``).

    Args:
        tensors, base: the fine-tunes' tensors and the base's.
        weight, density, gamma, epsilon: one value per model (gamma: breadcrumbs; epsilon: della).
        normalize, rescale, lambda_: as in mergekit; int8_mask: accepted, no effect (a memory option there).
        generator: the random stream of DARE and DELLA.

    Returns:
        The merged tensor (float32, or float64 for a float64 base).
    """
    dens = [float(d) for d in density]
    trim = drops = crumbs = della = None
    if sparsification == "random":  # one key per model, in model order, whatever the densities
        sparsify, drops = None, [_chunked.Drop(d, key, rescale) for d, key in zip(dens, dare_keys(generator, len(tensors)))]
    elif sparsification == "magnitude" and not rescale:
        sparsify, trim = None, dens  # a plain trim: the chunked fast path applies
    elif sparsification == "magnitude":
        sparsify = lambda i, d, s: magnitude_(d, dens[i], True, scratch=s)  # noqa: E731
    elif sparsification == "magnitude_outliers":
        sparsify, crumbs = None, [(d, float(g)) for d, g in zip(dens, gamma)]
    elif sparsification == "della_magprune":
        sparsify, della = None, [(d, float(e)) for d, e in zip(dens, epsilon)]
    else:
        sparsify = None
    return merge_task_vectors(
        tensors,
        base,
        weight=weight,
        sparsify=sparsify,
        trim_density=trim,
        drops=drops,
        crumbs=crumbs,
        della=della,
        rescale=rescale,
        generator=generator,
        consensus=consensus,
        normalize=normalize,
        lambda_=lambda_,
    )


def family_params(v: Variant) -> tuple[Param, ...]:
    """The parameters mergekit 0.1.5 gives a family member (gamma or epsilon by its sparsification)."""
    extra = (EXTRA_PARAM[v.sparsification],) if v.sparsification in EXTRA_PARAM else ()
    return (
        Param("weight", per_model=True, help="scale of each model's task vector"),
        Param("density", default=1.0, per_model=True, range=FRACTION, help="fraction of each task vector kept by sparsification"),
        *extra,
        Param("normalize", default=v.normalize, kind="bool", help="divide by the sum of weights (of agreeing models under TIES)"),
        Param("rescale", default=v.rescale, kind="bool", help="rescale each sparsified task vector to its original L1 norm"),
        Param("lambda", default=1.0, help="scale of the merged task vector"),
        Param("int8_mask", default=False, kind="bool", help="accepted for mergekit compatibility (memory option; no effect here)"),
    )


for _v in FAMILY:
    register(
        MergeMethod(
            name=_v.name,
            fn=functools.partial(merge_family, sparsification=_v.sparsification, consensus=_v.consensus),
            params=family_params(_v),
            base="required",
            randomized=_v.sparsification in RANDOMIZED,
            native_dtype=_v.sparsification in NATIVE_DTYPE,
            summary=_v.summary,
            paper=_v.paper,
        )
    )
del _v
