"""What every data-aware method checks first: the weights, and which models brought statistics."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .linear import linear


def merged_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype a data-aware method returns: float64 for float64 inputs, float32 otherwise (the engine casts on)."""
    return torch.float64 if tensors[0].dtype == torch.float64 else torch.float32


def data_free_fallback(tensors: Sequence[torch.Tensor], weight, statistics) -> torch.Tensor | None:
    """The weighted average (in ``merged_dtype``) when no model has statistics for this tensor; None when all have them.

    Raises ValueError when the weights sum to zero or only some models have statistics.
    """
    if sum(float(w) for w in weight) <= 0:
        raise ValueError(f"the weights {[float(w) for w in weight]} sum to 0; give at least one model a positive weight")
    have = [s is not None for s in statistics or ()]
    if not any(have):
        return linear(tensors, weight=weight).to(merged_dtype(tensors))
    if not all(have) or len(have) != len(tensors):
        raise ValueError("statistics are given for some models but not others")
    return None
