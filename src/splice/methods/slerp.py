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

from collections.abc import Sequence

import torch

from . import _reduce
from ._geometry import arc_coefficients, work_dtype
from .registry import FRACTION, Param, merge_method

DOT_THRESHOLD = 0.9995  # above this |cos| the pair counts as parallel
NORM_EPS = 1e-8  # a vector with a norm at or below this is not rescaled


def slerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between whole tensors ``v0`` and ``v1``."""
    dtype = work_dtype(v0)
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    t = float(t)
    if a.numel() == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)

    norm_a = _reduce.norm(a)
    norm_b = _reduce.norm(b)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, torch.ones_like(norm_b))
    cos = (_reduce.dot(a, b) / (norm_a * norm_b)).clamp(-1.0, 1.0)
    c0, c1 = arc_coefficients(t, cos, cos.abs() > DOT_THRESHOLD)

    out = a * c0.item()
    out.add_(b, alpha=c1.item())
    return out.reshape(v0.shape).to(v0.dtype)


@merge_method(
    "slerp",
    params=(Param("t", range=FRACTION, help="interpolation factor: 0 = base model, 1 = the other model"),),
    base="required",
    summary="spherical interpolation between the base model and one other model",
    paper="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH)",
    min_models=1,
    max_models=1,
)
def slerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    t: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    return slerp_pair(t, base, tensors[0])
