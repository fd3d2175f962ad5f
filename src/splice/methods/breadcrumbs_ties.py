"""Model Breadcrumbs with TIES sign election."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._sparsify import breadcrumbs_
from ._task_vectors import GAMMA, check_inputs, gta_params, merge_task_vectors, per_model
from .registry import merge_method


@merge_method(
    "breadcrumbs_ties",
    params=gta_params(normalize=False, rescale=False, extra=(GAMMA,)),
    base="required",
    summary="Breadcrumbs outlier-and-small-magnitude drop, then TIES sign consensus",
    paper="Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795)",
)
def breadcrumbs_ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float] | float = 1.0,
    gamma: Sequence[float] | float = 0.01,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    check_inputs(tensors, base, "breadcrumbs_ties")
    n = len(tensors)
    dens, gam = per_model(density, n, "density"), per_model(gamma, n, "gamma")
    return merge_task_vectors(
        tensors,
        base,
        weight=per_model(weight, n, "weight"),
        sparsify=lambda i, d, s: breadcrumbs_(d, float(dens[i]), float(gam[i]), rescale, scratch=s),
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )
