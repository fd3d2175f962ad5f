"""Passthrough: copy one model's tensor unchanged, optionally scaled.

    out = x            (scale unset)
    out = scale * x    (scale set)

This is the method used with ``slices`` to stack layer ranges of models into a
deeper one (depth up-scaling, "frankenmerges"); ``scale`` is commonly set to 0
on a layer's output projections to make a copied layer start as an identity.

Kim et al. 2023, "SOLAR 10.7B: Scaling Large Language Models with Simple yet
Effective Depth Up-Scaling" (arXiv:2312.15166) for depth up-scaling; parameter
names and behaviour follow mergekit's `passthrough`: exactly one model, no
base, optional per-model `scale`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .registry import Param, merge_method


@merge_method(
    "passthrough",
    params=(Param("scale", default=None, per_model=True, optional=True, help="multiply the tensor by this (unset: copy as is)"),),
    base="none",
    summary="copy one model's tensor, optionally scaled (for layer stacking)",
    paper="Kim et al. 2023, SOLAR 10.7B: depth up-scaling (arXiv:2312.15166)",
    min_models=1,
    max_models=1,
)
def passthrough(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    scale: Sequence[float | None] = (None,),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    x, (factor,) = tensors[0], scale
    if factor is None:
        return x
    return x * float(factor)
