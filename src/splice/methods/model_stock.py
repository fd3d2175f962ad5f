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

import math
from collections.abc import Sequence

import torch

from . import _reduce
from ._geometry import work_dtype
from ._sizes import STREAM_CHUNK
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
    native_dtype=True,
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
    n = len(tensors)
    rows = filter_wise and base.dim() >= 2 and math.prod(shape[:-1]) > 1
    # blocks along the first axis (rows: each row's sums stay whole) or flat chunks of the whole vector
    flat = [x.reshape(-1) for x in (base, *tensors)] if not rows else [base, *tensors]
    size = flat[0].shape[0]
    step = STREAM_CHUNK if not rows else max(1, STREAM_CHUNK // max(1, math.prod(shape[1:])))
    spans = [(s, min(size, s + step)) for s in range(0, size, step)]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]

    def offsets(s: int, e: int):
        w0 = flat[0][s:e].to(dtype)
        return w0, [x[s:e].to(dtype) - w0 for x in flat[1:]]

    if rows:  # per row, along the last axis: torch's row reductions, block by block (the same bits as whole)
        norms = [[] for _ in range(n)]
        dots = {p: [] for p in pairs}
        for s, e in spans:
            _, ds = offsets(s, e)
            for i, d in enumerate(ds):
                norms[i].append(torch.linalg.vector_norm(d, dim=-1))
            for i, j in pairs:
                dots[(i, j)].append((ds[i] * ds[j]).sum(dim=-1))
        norms = [torch.cat(v) for v in norms]
        dots = {p: torch.cat(v) for p, v in dots.items()}
    else:  # the whole tensor as one vector: streamed partial sums (``_reduce``), exactly rounded
        sq = [[] for _ in range(n)]
        pd = {p: [] for p in pairs}
        for s, e in spans:
            _, ds = offsets(s, e)
            for i, d in enumerate(ds):
                sq[i] += _reduce.sum_partials(d * d)
            for i, j in pairs:
                pd[(i, j)] += _reduce.sum_partials(ds[i] * ds[j])
        like = torch.empty(0, dtype=dtype, device=base.device)
        norms = [_reduce.norm_from_squares(v, like) for v in sq]
        dots = {p: _reduce.scalar(math.fsum(v), like) for p, v in pd.items()}
    cos_sum = torch.zeros_like(norms[0])
    for i, j in pairs:
        cos_sum += (dots[(i, j)] / (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_EPS)).clamp(-1.0, 1.0)
    cos = (cos_sum / (n * (n - 1) // 2)).unsqueeze(-1)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < SINGULAR_EPS
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
    # t * mean(w_i) + (1 - t) * w0  ==  w0 + t * mean(d_i), chunk by chunk
    out = torch.empty(flat[0].shape, dtype=dtype, device=base.device)
    for s, e in spans:
        w0, ds = offsets(s, e)
        tt = t if rows else t.reshape(())
        torch.add(w0, tt[s:e] * (sum(ds) / n) if rows else tt * (sum(ds) / n), out=out[s:e])
    return out.reshape(shape)
