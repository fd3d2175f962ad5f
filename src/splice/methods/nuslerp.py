"""NuSLERP: SLERP between two models driven by per-model weights, optionally
on task vectors and optionally row by row.

With weights w0, w1 for the two models, t = w1 / (w0 + w1).  Weights that
sum to ~0 (|w0 + w1| < 1e-6) are an error: mergekit then silently takes
t = 0.5, an interpolation the weights did not ask for. Given vectors v0, v1 and unit vectors u_i = v_i / max(|v_i|, 1e-7),
theta = arccos(u0 . u1):

    nuslerp(t) = (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta)

falling back to (1 - t) v0 + t v1 where the vectors are exactly (anti)parallel.

- nuslerp_flatten (default true): the whole tensor is one vector.
- otherwise every row (last axis) is interpolated on its own; with
  nuslerp_row_wise true the vectors run along the first axis instead (columns
  of a 2-D weight).
- with a base model, v_i = model_i - base and the result is base + nuslerp(t).

mergekit's `nuslerp` (arcee-ai/mergekit), which has no paper; parameter names,
defaults and behaviour follow it: base optional, exactly two other models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _reduce
from ._geometry import arc_coefficients, work_dtype
from ._sizes import STREAM_CHUNK
from .registry import Param, merge_method

UNIT_EPS = 1e-7  # norms are clamped to at least this before dividing
WEIGHT_SUM_EPS = 1e-6  # |w0 + w1| below this counts as 0 (mergekit's threshold here)
PARALLEL_EPS = 1e-8  # sin(theta)^2 at or below PARALLEL_EPS^2 counts as parallel


def _flat_streamed(t: float, v0: torch.Tensor, v1: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """``nuslerp_pair(..., flatten=True)`` (of the task vectors, with ``base``) in three chunked passes.

    Norms, then the dot product of the unit vectors, then the combine, each
    ``STREAM_CHUNK`` elements at a time, upcasting the stored inputs chunk by
    chunk.  The norms are ``_reduce.norm_from_squares`` (exactly rounded partial
    sums); every other operation is ``nuslerp_pair``'s, element by element.
    """
    dtype = work_dtype(base if base is not None else v0)
    x0, x1 = v0.reshape(-1), v1.reshape(-1)
    xb = base.reshape(-1) if base is not None else None
    n = x0.numel()
    spans = [(s, min(n, s + STREAM_CHUNK)) for s in range(0, n, STREAM_CHUNK)]

    def pair(s: int, e: int):
        a, b = x0[s:e].to(dtype), x1[s:e].to(dtype)
        if xb is None:
            return a, b, None
        w = xb[s:e].to(dtype)
        return a - w, b - w, w

    aa, bb = [], []
    for s, e in spans:
        a, b, _ = pair(s, e)
        aa += _reduce.sum_partials(a * a)
        bb += _reduce.sum_partials(b * b)
    like = torch.empty(0, dtype=dtype, device=x0.device)
    na = _reduce.norm_from_squares(aa, like).reshape(1).clamp(min=UNIT_EPS)
    nb = _reduce.norm_from_squares(bb, like).reshape(1).clamp(min=UNIT_EPS)
    ab = []
    for s, e in spans:
        a, b, _ = pair(s, e)
        ab += _reduce.sum_partials((a / na) * (b / nb))
    cos = _reduce.scalar(math.fsum(ab), like).reshape(1).clamp(-1.0, 1.0)
    straight = (1 - cos * cos) <= PARALLEL_EPS**2
    c0, c1 = arc_coefficients(float(t), cos, straight)
    out = torch.empty(n, dtype=dtype, device=x0.device)
    for s, e in spans:
        a, b, w = pair(s, e)
        o = torch.mul(a, c0, out=out[s:e]).addcmul_(b, c1)
        if w is not None:
            torch.add(w, o, out=o)
    return out.reshape(v0.shape)


def nuslerp_pair(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    row_wise: bool = False,
    flatten: bool = True,
) -> torch.Tensor:
    """Interpolate ``v0`` -> ``v1`` on the sphere, per tensor or per row/column."""
    dtype = work_dtype(v0)
    a = v0.to(dtype)
    b = v1.to(dtype)
    transposed = False
    if flatten or a.dim() == 0:
        a = a.reshape(-1)
        b = b.reshape(-1)
    elif row_wise and a.dim() > 1:
        a = a.transpose(0, -1)
        b = b.transpose(0, -1)
        transposed = True

    na = _reduce.norm_last(a, keepdim=True).clamp(min=UNIT_EPS)
    nb = _reduce.norm_last(b, keepdim=True).clamp(min=UNIT_EPS)
    cos = _reduce.sum_last((a / na) * (b / nb), keepdim=True).clamp(-1.0, 1.0)
    straight = (1 - cos * cos) <= PARALLEL_EPS**2
    c0, c1 = arc_coefficients(float(t), cos, straight)

    out = a * c0
    out.addcmul_(b, c1)
    if transposed:
        out = out.transpose(0, -1)
    return out.reshape(v0.shape)  # the work dtype: float32 for stored bf16 (a native-dtype method)


@merge_method(
    "nuslerp",
    params=(
        Param("weight", per_model=True, help="relative weight of each of the two models"),
        Param("nuslerp_row_wise", default=False, kind="bool", help="interpolate column vectors (along the first axis)"),
        Param("nuslerp_flatten", default=True, kind="bool", help="treat the whole tensor as one vector"),
    ),
    base="optional",
    summary="SLERP of two models (or their task vectors) with weights, per tensor or per row",
    paper="mergekit NuSLERP (Goddard et al. 2024, arXiv:2403.13257)",
    min_models=2,
    max_models=2,
    native_dtype=True,
)
def nuslerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weight: Sequence[float],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    w0, w1 = (float(w) for w in weight)
    total = w0 + w1
    if abs(total) < WEIGHT_SUM_EPS:
        raise ValueError(f"nuslerp interpolates at t = w1 / (w0 + w1), and the weights {[w0, w1]} sum to 0; change the weights")
    t = w1 / total
    if nuslerp_flatten or tensors[0].dim() == 0:  # one vector: streamed, from the stored dtype
        return _flat_streamed(t, tensors[0], tensors[1], base)
    if base is None:
        return nuslerp_pair(t, tensors[0], tensors[1], row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    dtype = work_dtype(base)
    b = base.to(dtype)
    delta = nuslerp_pair(
        t,
        tensors[0].to(dtype) - b,
        tensors[1].to(dtype) - b,
        row_wise=nuslerp_row_wise,
        flatten=nuslerp_flatten,
    )
    return b + delta
