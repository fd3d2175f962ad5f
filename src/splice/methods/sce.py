"""SCE: Select, Calculate, Erase (FuseChat-2.0's merge; mergekit 0.1.5 semantics).

For task vectors ``d_i = t_i - base`` of K models:

1. **Select** (when ``select_topk < 1``): per element, the population variance
   of ``d_1..d_K``; keep the ``int(select_topk * count_nonzero(var))`` elements
   of highest variance (ties: lowest flat index) and zero the rest in every
   ``d_i``.  ``select_topk`` lies in (0, 1]: 0 would keep nothing (the base),
   which mergekit accepts and splice refuses as meaningless.
2. **Calculate**: model weights ``w_i = mean(d_i**2) / sum_j mean(d_j**2)``, or
   ``1/K`` each when that sum is below 1e-6 (as mergekit does; note that real
   fine-tune deltas are often that small, making the weights uniform).
3. **Erase**: TIES sign election on the (unweighted) ``d_i``; the merged delta is
   ``sum_i w_i d_i [agree] / max(sum_i w_i [agree], 1e-6)``.  The weights are
   never negative, so the divisor is small only where (almost) no model takes
   part, and there the sum is small too: the clamp keeps the base, as in
   mergekit, and is no division by a zero sum of weights.

No per-model ``weight``: mergekit's sce takes none.  Task vectors are
re-derived from the inputs in each pass (into reused buffers) instead of
stacking K of them; the variance is computed chunk by chunk.

Inputs come in their stored dtype (a native-dtype method) and are upcast to
float32 as they are read.  CPU tensors with the kernels (``_kernels``) take
streaming passes over the inputs instead of whole-tensor torch calls: the
variance (float64 Welford, torch's ``var``) into the output buffer, its
``k``-th largest by radix select (up to ``SORT_LIMIT`` elements by
``topk_mask``'s torch call), the kept set as one bit per element, then
per model the kept delta into the output buffer for its mean square (the
very ``_reduce.norm`` call, so the weights have the same bits), and one fused
pass for the erase.  Working memory: the output and n/8 bytes, against about
a dozen float32 tensors on the torch path; the same bits (tests compare).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import _kernels, _reduce
from ._chunked import bit_views
from ._consensus import SignConsensus
from ._sizes import VARIANCE_CHUNK
from ._sparsify import SORT_LIMIT, topk_mask
from .registry import Param, Range, merge_method


def _variance(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Population variance across models of the task vectors, chunk by chunk.

    Each chunk is exactly mergekit's ``torch.var(stack, dim=0, unbiased=False)``
    on that slice (so identical deltas give exactly 0 and the selected set is
    the same), without stacking K whole task vectors.
    """
    flat_base = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    var = torch.empty_like(flat_base)
    for lo in range(0, flat_base.numel(), VARIANCE_CHUNK):
        part = slice(lo, lo + VARIANCE_CHUNK)
        stacked = torch.stack([f[part] - flat_base[part] for f in flats])
        torch.var(stacked, dim=0, unbiased=False, out=var[part])
    return var.reshape(base.shape)


def _variance_mask(tensors: Sequence[torch.Tensor], base: torch.Tensor, select_topk: float) -> torch.Tensor:
    var = _variance(tensors, base)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    return topk_mask(var, k)


@merge_method(
    "sce",
    params=(
        Param(
            "select_topk",
            default=1.0,
            range=Range(0.0, 1.0, low_open=True),
            help="fraction of the non-zero-variance elements kept (highest variance across models)",
        ),
        Param("int8_mask", default=False, kind="bool", help="accepted for mergekit compatibility (memory option; no effect here)"),
    ),
    base="required",
    summary="keep high-variance elements, weight models by mean squared delta, TIES sign erase",
    paper="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE merging) (arXiv:2408.07990)",
    native_dtype=True,
)
def sce(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    cdt = torch.float64 if base.dtype == torch.float64 else torch.float32
    if not tensors:
        return base.to(cdt, copy=True)
    n = base.numel()
    if _kernels.AVAILABLE and cdt == torch.float32 and base.device.type == "cpu" and 0 < n < 2**31:
        out = _sce_kernel(tensors, base, float(select_topk))
        if out is not None:
            return out
    tensors = [t.to(cdt) for t in tensors]
    base = base.to(cdt)
    k_models = len(tensors)
    if select_topk >= 1:
        keep = None
    else:
        keep = _variance_mask(tensors, base, float(select_topk)).to(base.dtype)

    delta = torch.empty_like(base)

    def task_vector(t: torch.Tensor) -> torch.Tensor:
        torch.sub(t, base, out=delta)
        return delta if keep is None else delta.mul_(keep)

    # Calculate: mean squared (selected) delta per model.
    n = max(n, 1)
    energy = torch.stack([_reduce.norm(task_vector(t)).square() / n for t in tensors])
    weights = _weights(energy, k_models)

    # Erase: signs elected on the unweighted deltas; values and divisor weighted.
    acc = SignConsensus(base, track_weights=True)
    scaled = torch.empty_like(base)
    for t, w in zip(tensors, weights.tolist()):
        d = task_vector(t)
        acc.add(torch.mul(d, w, out=scaled), w, vote=d)
    del delta, scaled, keep
    return acc.result(divisor=True, min_divisor=1e-6).add_(base)


def _weights(energy: torch.Tensor, k_models: int) -> torch.Tensor:
    """The models' weights from their mean squared deltas (float32 0-d tensors, stacked): ``w_i = e_i / sum e``, or 1/K."""
    total = float(torch.sum(energy))
    return torch.full_like(energy, 1.0 / k_models) if abs(total) < 1e-6 else energy / total


def _sce_kernel(tensors: Sequence[torch.Tensor], base: torch.Tensor, select_topk: float) -> torch.Tensor | None:
    """``sce`` on a large CPU tensor with the kernels: float32 result, or None (non-finite variance or weights: the torch path decides)."""
    n = base.numel()
    views, shift = bit_views([t.contiguous() for t in (*tensors, base)])
    xs, b = tuple(views[:-1]), views[-1]
    out = torch.empty(base.shape, dtype=torch.float32)
    of = out.reshape(-1).numpy()
    masked = select_topk < 1
    keep = np.zeros((n + 7) // 8 if masked else 0, dtype=np.uint8)
    if masked:
        if _kernels.sce_variance(xs, b, shift, of):  # NaN variance: inputs that are not finite
            return None
        k = int(int(np.count_nonzero(of)) * select_topk)
        if n <= SORT_LIMIT:  # small: topk_mask's torch.topk (mergekit's call), packed
            keep = np.packbits(topk_mask(out, k).numpy().reshape(-1))
        elif k > 0:  # topk_mask's rule: the k largest variances, ties at the threshold to the lowest flat indices
            vb = of.view(np.uint32)
            zero = np.broadcast_to(np.uint32(0), (n,))  # the kernels select on |v - 0| = v (variances are >= +0)
            bits, below, equal = (int(v) for v in _kernels.select(vb, zero, 0, n - k + 1))
            kept_ties = k - (n - below - equal)
            cutoff = (
                n if kept_ties == equal else (int(_kernels.nth_equal(vb, zero, 0, np.uint32(bits), kept_ties)) + 1 if kept_ties > 0 else 0)
            )
            _kernels.sce_keep(of, np.array([bits], dtype=np.uint32).view(np.float32)[0], cutoff, keep)
    energy = []
    for x in xs:  # Calculate: mean squared (kept) delta per model, the whole-tensor norm of the same float32 values
        _kernels.sce_delta(x, b, shift, keep, masked, of)
        energy.append(_reduce.norm(out).square() / n)
    weights = _weights(torch.stack(energy), len(xs))
    if not bool(torch.isfinite(weights).all()):
        return None
    _kernels.sce_erase(xs, b, shift, keep, masked, np.asarray(weights.tolist(), dtype=np.float32), of)
    return out
