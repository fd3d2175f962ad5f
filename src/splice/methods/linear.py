"""Linear: a weighted average of the models' tensors (model soups).

    out = sum_i w_i t_i / sum_i w_i     (normalize, the default)
    out = sum_i w_i t_i                 (normalize false)

Weights that sum to 0 (below ``WEIGHT_SUM_EPS`` in magnitude) with ``normalize``
are an error: mergekit 0.1.5 divides by the sum regardless (inf or NaN for an
exact 0), and splice used to skip the division and write the unnormalized sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .registry import Param, merge_method
from .task_arithmetic import WEIGHT_SUM_EPS


@merge_method(
    "linear",
    params=(
        Param("weight", per_model=True, help="weight of each model"),
        Param("normalize", default=True, kind="bool", help="divide by the sum of weights"),
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
        if abs(total) < WEIGHT_SUM_EPS:
            raise ValueError(
                f"normalize divides by the sum of the weights {[float(w) for w in weight]}, which is 0; "
                "set normalize: false or change the weights"
            )
        out.div_(total)
    return out
