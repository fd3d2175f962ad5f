"""SLERP: spherical linear interpolation between the base model and one other.

Both tensors are flattened to vectors v0 (base) and v1 (other). With
u_i = v_i / |v_i| (a zero vector is left as is) and theta = arccos(u0 . u1):

    slerp(t) = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1

When |u0 . u1| > 0.9995 the vectors are nearly (anti)parallel and the result
falls back to linear interpolation, (1 - t) v0 + t v1. t = 0 gives the base,
t = 1 the other model.  mergekit also accepts t outside [0, 1] (extrapolation
along the arc, away from both models); splice refuses it as a recipe error.
Note the unnormalised v0, v1 are combined, so norms interpolate too.

Shoemake 1985, "Animating rotation with quaternion curves" (SIGGRAPH '85);
mergekit's `slerp` (arcee-ai/mergekit), whose parameters and behaviour this
follows: base required, exactly one other model, global `t`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _reduce
from ._geometry import arc_coefficients, work_dtype
from ._sizes import STREAM_CHUNK
from .registry import FRACTION, Param, merge_method

DOT_THRESHOLD = 0.9995  # above this |cos| the pair counts as parallel
NORM_EPS = 1e-8  # a vector with a norm at or below this is not rescaled


def slerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between whole tensors ``v0`` and ``v1``, streamed in chunks.

    Pass 1 upcasts ``STREAM_CHUNK`` elements of each input at a time and keeps
    the partial sums of ``a*a``, ``b*b`` and ``a*b`` (``_reduce``'s per-block
    partials, so the dot product has ``_reduce.dot``'s bits and nothing depends
    on the chunk size or thread count); pass 2 writes ``c0*a + c1*b`` chunk by
    chunk.  Inputs may be bfloat16 or float16 as stored: no float32 copy of
    either is made.  Returns float32 (float64 for a float64 ``v0``).
    """
    dtype = work_dtype(v0)
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    t = float(t)
    n = a.numel()
    if n == 0:
        return ((1 - t) * a.to(dtype) + t * b.to(dtype)).reshape(v0.shape)
    aa, bb, ab = [], [], []
    for s in range(0, n, STREAM_CHUNK):
        ac, bc = a[s : s + STREAM_CHUNK].to(dtype), b[s : s + STREAM_CHUNK].to(dtype)
        aa += _reduce.sum_partials(ac * ac)
        bb += _reduce.sum_partials(bc * bc)
        ab += _reduce.sum_partials(ac * bc)
    like = torch.empty(0, dtype=dtype, device=a.device)
    norm_a = _reduce.norm_from_squares(aa, like)
    norm_b = _reduce.norm_from_squares(bb, like)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, torch.ones_like(norm_b))
    cos = (_reduce.scalar(math.fsum(ab), like) / (norm_a * norm_b)).clamp(-1.0, 1.0)
    c0, c1 = arc_coefficients(t, cos, cos.abs() > DOT_THRESHOLD)
    c0, c1 = c0.item(), c1.item()
    out = torch.empty(n, dtype=dtype, device=a.device)
    for s in range(0, n, STREAM_CHUNK):
        o = torch.mul(a[s : s + STREAM_CHUNK].to(dtype), c0, out=out[s : s + STREAM_CHUNK])
        o.add_(b[s : s + STREAM_CHUNK].to(dtype), alpha=c1)
    return out.reshape(v0.shape)


@merge_method(
    "slerp",
    params=(Param("t", range=FRACTION, help="interpolation factor: 0 = base model, 1 = the other model"),),
    base="required",
    summary="spherical interpolation between the base model and one other model",
    paper="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH)",
    min_models=1,
    max_models=1,
    native_dtype=True,
)
def slerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    t: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    return slerp_pair(t, base, tensors[0])
