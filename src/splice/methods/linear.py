"""Linear: a weighted average of the models' tensors (model soups)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .registry import Param, merge_method


@merge_method(
    "linear",
    params=(
        Param("weight", per_model=True, help="weight of each model"),
        Param("normalize", default=True, help="divide by the sum of weights"),
    ),
    base="none",
    summary="weighted average of the models",
    paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
)
def linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weight: Sequence[float],
    normalize: bool = True,
) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for w, t in zip(weight, tensors):
        out.add_(t, alpha=float(w))
    if normalize:
        total = float(sum(weight))
        if abs(total) > 1e-8:
            out.div_(total)
    return out
