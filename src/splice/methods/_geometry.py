"""Spherical-geometry helpers shared by slerp, nuslerp, multislerp and karcher.

Nothing here is a merge method (the leading underscore keeps the registry from
importing it as one). Every function works on any device and never modifies its
inputs.
"""

from __future__ import annotations

import torch


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision to compute in: float64 stays float64, all else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def arc_coefficients(t: float | torch.Tensor, cos: torch.Tensor, straight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (c0, c1) so that c0*v0 + c1*v1 walks the great circle.

    With theta = arccos(cos):  c0 = sin((1-t) theta) / sin theta,
    c1 = sin(t theta) / sin theta.  Where ``straight`` is True the pair is
    treated as (anti)parallel and the coefficients are the linear ones,
    c0 = 1 - t, c1 = t. ``cos`` must already be clamped to [-1, 1]. The
    masked-out branch is kept finite so no NaN appears anywhere.
    """
    theta = torch.acos(torch.where(straight, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    safe_sin = torch.where(straight, torch.ones_like(sin_theta), sin_theta)
    one_minus_t = 1 - t
    c0 = torch.where(straight, one_minus_t * torch.ones_like(cos), torch.sin(one_minus_t * theta) / safe_sin)
    c1 = torch.where(straight, t * torch.ones_like(cos), torch.sin(t * theta) / safe_sin)
    return c0, c1
