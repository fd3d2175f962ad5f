"""Task arithmetic: add the weighted sum of the task vectors to the base."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._task_vectors import check_inputs, gta_params, merge_task_vectors, per_model
from .registry import merge_method


@merge_method(
    "task_arithmetic",
    params=gta_params(normalize=False, rescale=False),
    base="required",
    native_dtype=True,
    summary="base + lambda * sum_i weight_i * (model_i - base); density and rescale are accepted but unused",
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089)",
)
def task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float] | float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    check_inputs(tensors, base, "task_arithmetic")
    return merge_task_vectors(tensors, base, weight=per_model(weight, len(tensors), "weight"), normalize=normalize, lambda_=lambda_)
