"""TIES: trim each task vector to its largest magnitudes, elect signs, merge the agreeing."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._sparsify import magnitude_
from ._task_vectors import check_inputs, gta_params, merge_task_vectors, per_model
from .registry import merge_method


@merge_method(
    "ties",
    params=gta_params(normalize=True, rescale=False),
    base="required",
    native_dtype=True,
    summary="trim task vectors to the top-density magnitudes, elect a sign per element, average the agreeing ones",
    paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models (arXiv:2306.01708)",
)
def ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float] | float = 1.0,
    normalize: bool = True,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    check_inputs(tensors, base, "ties")
    n = len(tensors)
    dens = per_model(density, n, "density")
    return merge_task_vectors(
        tensors,
        base,
        weight=per_model(weight, n, "weight"),
        sparsify=(lambda i, d, s: magnitude_(d, float(dens[i]), True, scratch=s)) if rescale else None,
        trim_density=None if rescale else dens,
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )
