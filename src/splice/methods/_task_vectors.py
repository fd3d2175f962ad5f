"""The generalized task-arithmetic pipeline behind task_arithmetic, TIES, DARE,
Breadcrumbs and DELLA (mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge``).

For one parameter, with base ``b`` and fine-tunes ``t_i`` (weights ``w_i``):

1. task vectors ``d_i = t_i - b``;
2. optional sparsification of each ``d_i`` on its own (magnitude, random,
   breadcrumbs, della), with mergekit's L1 ``rescale``;
3. weighting ``d_i <- w_i * d_i``;
4. either a plain sum ``m = sum_i d_i`` with divisor ``sum_i w_i`` (replaced by 1
   when its magnitude is below 1e-8), or a TIES sign consensus (``_consensus``)
   whose divisor is the sum of the agreeing models' weights (0 replaced by 1);
5. ``m /= divisor`` if ``normalize``; ``m *= lambda``; result ``b + m``.

Deltas are processed one model at a time into running sums, so memory stays at
a few tensors whatever the number of models.  mergekit applies the same steps
to every tensor, 1-D or not, embeddings included (it refuses mismatched shapes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _chunked
from ._consensus import SignConsensus
from ._sparsify import SORT_LIMIT, magnitude_
from .registry import Param

Sparsifier = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def per_model(values: Any, n: int, name: str) -> list:
    """A per-model parameter as a list of ``n`` values (a scalar applies to every model)."""
    if isinstance(values, (list, tuple)):
        if len(values) != n:
            raise ValueError(f"parameter {name!r} has {len(values)} values for {n} models")
        return list(values)
    return [values] * n


def check_inputs(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, method: str) -> None:
    if base is None:
        raise ValueError(f"{method} needs a base model")
    for t in tensors:
        if t.shape != base.shape:
            raise ValueError(f"{method}: tensor shape {tuple(t.shape)} differs from the base's {tuple(base.shape)}")


def merge_task_vectors(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    sparsify: Sparsifier | None = None,
    trim_density: Sequence[float] | None = None,
    consensus: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Steps 1-5 above.

    ``sparsify(i, delta, scratch)`` sparsifies model i's ``delta`` and returns
    the tensor holding the result: ``delta`` or ``scratch`` (same shape and
    dtype, free working space).  Both buffers are reused from model to model:
    fresh large tensors cost page faults.  ``trim_density`` (instead of
    ``sparsify``) is TIES's magnitude trim without rescale, per model.

    Inputs may be bfloat16 or float16; the arithmetic is float32 (float64 if
    the base is float64) and so is the result.  Large CPU tensors without a
    ``sparsify`` callback take the chunked path (``_chunked``), which gives the
    same bits faster and with less memory.
    """
    cdt = torch.float64 if base.dtype == torch.float64 else torch.float32
    if not tensors:
        return base.to(cdt, copy=True)
    weights = [float(w) for w in weight]
    if sparsify is None and base.device.type == "cpu" and SORT_LIMIT < base.numel() < 2**31:
        trims = None
        if trim_density is not None:
            trims = [_chunked.magnitude_trim(t, base, float(d), cdt) for t, d in zip(tensors, trim_density)]
        return _chunked.merge_chunked(
            tensors, base, weights=weights, trims=trims, consensus=consensus, normalize=normalize, lambda_=lambda_, cdt=cdt
        )
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
    if consensus:
        merged = acc.result(divisor=normalize)
    else:
        merged = acc
        if normalize:
            total = torch.tensor(weights, dtype=base.dtype).sum()
            if total.abs() >= 1e-8:
                merged.div_(total.item())
    if lambda_ != 1:
        merged.mul_(lambda_)
    return merged.add_(base)


def gta_params(*, normalize: bool, rescale: bool, extra: Sequence[Param] = ()) -> tuple[Param, ...]:
    """The parameters mergekit 0.1.5 gives every generalized task-arithmetic method."""
    return (
        Param("weight", per_model=True, help="scale of each model's task vector"),
        Param("density", default=1.0, per_model=True, help="fraction of each task vector kept by sparsification"),
        *extra,
        Param("normalize", default=normalize, help="divide by the sum of weights (of agreeing models under TIES)"),
        Param("rescale", default=rescale, help="rescale each sparsified task vector to its original L1 norm"),
        Param("lambda", default=1.0, help="scale of the merged task vector"),
        Param("int8_mask", default=False, help="accepted for mergekit compatibility (memory option; no effect here)"),
    )


GAMMA = Param("gamma", default=0.01, per_model=True, help="fraction of largest-magnitude outliers dropped")
EPSILON = Param("epsilon", default=0.15, per_model=True, help="spread of keep probabilities around density, by magnitude rank")
