"""DELLA: magnitude-ranked random drop (MagPrune), rescale, TIES sign election."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._sparsify import della_
from ._task_vectors import EPSILON, check_inputs, gta_params, merge_task_vectors, per_model
from .registry import merge_method


@merge_method(
    "della",
    params=gta_params(normalize=True, rescale=True, extra=(EPSILON,)),
    base="required",
    randomized=True,
    summary="drop task-vector entries with probability falling with their magnitude rank per row, L1 rescale, TIES consensus",
    paper="Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)",
)
def della(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float] | float = 1.0,
    epsilon: Sequence[float] | float = 0.15,
    normalize: bool = True,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    check_inputs(tensors, base, "della")
    n = len(tensors)
    dens, eps = per_model(density, n, "density"), per_model(epsilon, n, "epsilon")
    return merge_task_vectors(
        tensors,
        base,
        weight=per_model(weight, n, "weight"),
        sparsify=lambda i, d, s: della_(d, float(dens[i]), float(eps[i]), rescale, generator, scratch=s),
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )
