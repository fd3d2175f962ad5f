"""SCE: Select, Calculate, Erase (FuseChat-2.0's merge; mergekit 0.1.5 semantics).

For task vectors ``d_i = t_i - base`` of K models:

1. **Select** (when ``select_topk < 1``): per element, the population variance
   of ``d_1..d_K``; keep the ``int(select_topk * count_nonzero(var))`` elements
   of highest variance (ties: lowest flat index) and zero the rest in every
   ``d_i``.  ``select_topk <= 0`` keeps nothing.
2. **Calculate**: model weights ``w_i = mean(d_i**2) / sum_j mean(d_j**2)``, or
   ``1/K`` each when that sum is below 1e-6 (as mergekit does; note that real
   fine-tune deltas are often that small, making the weights uniform).
3. **Erase**: TIES sign election on the (unweighted) ``d_i``; the merged delta is
   ``sum_i w_i d_i [agree] / max(sum_i w_i [agree], 1e-6)``.

No per-model ``weight``: mergekit's sce takes none.  Tensors are re-derived
from the inputs in each pass instead of stacking K task vectors.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._consensus import SignConsensus
from ._sparsify import topk_mask
from ._task_vectors import check_inputs
from .registry import Param, merge_method


def _variance(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Population variance across models of the task vectors, by Welford's update.

    Same arithmetic as ``torch.var(stack, dim=0, unbiased=False)`` (which
    accumulates in float64 on CPU), so identical deltas give exactly 0 and the
    selected set matches mergekit's, without stacking K task vectors.
    """
    acc = torch.float64 if base.device.type == "cpu" else base.dtype
    mean = torch.zeros_like(base, dtype=acc)
    m2 = torch.zeros_like(base, dtype=acc)
    x = torch.empty_like(base, dtype=acc)
    step = torch.empty_like(base, dtype=acc)
    tv = torch.empty_like(base)
    for i, t in enumerate(tensors, start=1):
        x.copy_(torch.sub(t, base, out=tv))
        torch.sub(x, mean, out=step)
        mean.add_(step / i)
        m2.addcmul_(step, x.sub_(mean))
    return m2.div_(len(tensors)).to(base.dtype)


def _variance_mask(tensors: Sequence[torch.Tensor], base: torch.Tensor, select_topk: float) -> torch.Tensor:
    var = _variance(tensors, base)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    return topk_mask(var, k)


@merge_method(
    "sce",
    params=(
        Param("select_topk", default=1.0, help="fraction of the non-zero-variance elements kept (highest variance across models)"),
        Param("int8_mask", default=False, help="accepted for mergekit compatibility (memory option; no effect here)"),
    ),
    base="required",
    summary="keep high-variance elements, weight models by mean squared delta, TIES sign erase",
    paper="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE merging) (arXiv:2408.07990)",
)
def sce(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    check_inputs(tensors, base, "sce")
    if not tensors:
        return base.clone()
    k_models = len(tensors)
    if select_topk >= 1:
        mask = None
    elif select_topk <= 0:
        mask = torch.zeros_like(base, dtype=torch.bool)
    else:
        mask = _variance_mask(tensors, base, float(select_topk))

    def task_vector(t: torch.Tensor) -> torch.Tensor:
        d = torch.sub(t, base)
        return d.mul_(mask) if mask is not None else d

    # Calculate: mean squared (selected) delta per model.
    energy = torch.stack([torch.mean(torch.square(task_vector(t))) for t in tensors])
    total = float(torch.sum(energy))
    weights = torch.full_like(energy, 1.0 / k_models) if abs(total) < 1e-6 else energy / total

    # Erase: signs elected on the unweighted deltas; values and divisor weighted.
    acc = SignConsensus(base, track_weights=True)
    for t, w in zip(tensors, weights.tolist()):
        d = task_vector(t)
        acc.add(d * w, w, vote=d)
        del d
    return acc.result(divisor=True, min_divisor=1e-6).add_(base)
