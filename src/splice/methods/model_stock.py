"""Model Stock: average the fine-tuned models, then pull the average back toward
the base by an amount set by how aligned the fine-tuning offsets are.

With base w0 and N >= 2 fine-tuned models w_i, offsets d_i = w_i - w0 and
cos_theta the mean over all pairs i < j of

    cos(d_i, d_j) = clamp(d_i . d_j / max(|d_i| |d_j|, 1e-6), -1, 1),

    t   = N cos_theta / (1 + (N - 1) cos_theta)
    out = t * mean_i(w_i) + (1 - t) * w0

(equation 3 of the paper). Where 1 + (N - 1) cos_theta is ~0 (|.| < 1e-6) t
is 0 and the base is kept, as in mergekit: that divisor comes from the offsets'
geometry (no finite estimate exists there), not from a sum of user weights. By default the whole tensor is one vector; with
filter_wise true every row (vectors along the last axis) gets its own
cos_theta and t (a 1-D tensor is then a single row).

Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned
models" (arXiv:2403.19522). Parameter names, defaults and behaviour follow
mergekit's `model_stock`: base required, at least two other models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _reduce
from ._geometry import work_dtype
from .registry import Param, merge_method

NORM_PRODUCT_EPS = 1e-6  # |d_i||d_j| is clamped to at least this
SINGULAR_EPS = 1e-6  # |1 + (N-1) cos| below this keeps the base


@merge_method(
    "model_stock",
    params=(Param("filter_wise", default=False, kind="bool", help="one interpolation ratio per row instead of per tensor"),),
    base="required",
    summary="average of fine-tuned models pulled toward the base by their offsets' mutual angle",
    paper="Jang, Yun & Han 2024, Model Stock: All we need is just a few fine-tuned models (arXiv:2403.19522)",
    min_models=2,
    max_models=None,
)
def model_stock(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    filter_wise: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    dtype = work_dtype(base)
    shape = base.shape

    def as_rows(x: torch.Tensor) -> torch.Tensor:
        """Vectors along the last axis: rows (filter_wise) or the whole tensor."""
        if not filter_wise:
            return x.reshape(-1)
        return x.reshape(1, -1) if x.dim() <= 1 else x

    w0 = as_rows(base.to(dtype))
    offsets = [as_rows(t.to(dtype)) - w0 for t in tensors]
    norms = [_reduce.norm_last(d) for d in offsets]

    n = len(offsets)
    cos_sum = torch.zeros_like(norms[0])
    for i in range(n):
        for j in range(i + 1, n):
            dot = _reduce.sum_last(offsets[i] * offsets[j])
            cos_sum += (dot / (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_EPS)).clamp(-1.0, 1.0)
    cos = (cos_sum / (n * (n - 1) // 2)).unsqueeze(-1)

    denom = 1 + (n - 1) * cos
    singular = denom.abs() < SINGULAR_EPS
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))

    # t * mean(w_i) + (1 - t) * w0  ==  w0 + t * mean(d_i)
    mean_offset = sum(offsets) / n
    return (w0 + t * mean_offset).reshape(shape).to(base.dtype)
