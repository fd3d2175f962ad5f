"""DARE (linear): randomly drop task-vector entries, rescale, add the weighted sum."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._sparsify import random_
from ._task_vectors import check_inputs, gta_params, merge_task_vectors, per_model
from .registry import merge_method


@merge_method(
    "dare_linear",
    params=gta_params(normalize=False, rescale=True),
    base="required",
    randomized=True,
    summary="keep each task-vector entry with probability density, rescale to the original L1 norm, add the weighted sum",
    paper="Yu et al. 2024, Language Models are Super Mario (DARE) (arXiv:2311.03099)",
)
def dare_linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float] | float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    check_inputs(tensors, base, "dare_linear")
    n = len(tensors)
    dens = per_model(density, n, "density")
    return merge_task_vectors(
        tensors,
        base,
        weight=per_model(weight, n, "weight"),
        sparsify=lambda i, d, s: random_(d, float(dens[i]), rescale, generator, scratch=s),
        normalize=normalize,
        lambda_=lambda_,
    )
