"""Fisher merging: each parameter entry averaged weighted by how much each model's loss depends on it.

Matena & Raffel 2022 (Merging Models with Fisher-Weighted Averaging) weight every entry of
every model by its diagonal Fisher information ``F_i`` (here the empirical Fisher of the
model's own calibration text: the mean over windows of the squared gradient of the
window's mean next-token loss; ``splice calibrate --fisher``)::

    out = sum_i w_i F_i' t_i / sum_i w_i F_i'        F_i' = F_i + floor

``floor`` is ``FISHER_FLOOR`` times the mean Fisher of this tensor over the models (the
paper adds a small constant so that entries no model's loss touches are averaged, not
divided by zero; relative here, since Fisher magnitudes vary by orders between models
and tensors). Entries where every weighted Fisher is still 0 take ``FALLBACK_METHOD``, as do
tensors without statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._statistics import data_free_fallback, merged_dtype
from .linear import linear
from .registry import NON_NEGATIVE, Param, merge_method

FALLBACK_METHOD = "linear"
# Added to every model's Fisher, as a share of the tensor's mean Fisher over the models: larger
# pulls weakly measured entries toward the plain average; 0 is the unregularised formula.
FISHER_FLOOR = 1e-6


@merge_method(
    "fisher",
    params=(Param("weight", default=1.0, per_model=True, range=NON_NEGATIVE, help="scale of each model's Fisher"),),
    base="none",
    statistics="fisher",
    summary="each entry averaged weighted by the models' diagonal Fisher on their calibration text (needs `calibration:`)",
    paper="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (arXiv:2111.09832)",
)
def fisher(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weight: Sequence[float],
    statistics: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Fisher-weighted average of one parameter.

    Args:
        tensors: the models' tensors, same shape.
        weight: per model, the scale of its Fisher (and its weight in the fallback).
        statistics: per model, the diagonal Fisher of this parameter (its shape), or None.

    Returns:
        The merged tensor (float32 unless the inputs are float64).
    """
    fallback = data_free_fallback(tensors, weight, statistics)
    if fallback is not None:
        return fallback
    if any(tuple(s.shape) != tuple(tensors[0].shape) for s in statistics):
        raise ValueError(
            f"Fisher shapes {sorted({tuple(s.shape) for s in statistics})} do not fit a tensor of shape {list(tensors[0].shape)}"
        )
    fs = [s.to(torch.float64) for s in statistics]
    floor = FISHER_FLOOR * float(sum(f.mean() for f in fs)) / len(fs)
    num = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    den = torch.zeros_like(num)
    for t, f, w in zip(tensors, fs, weight):
        fw = (f + floor) * float(w)
        num.add_(fw * t.to(torch.float64))
        den.add_(fw)
    out = linear([t.to(torch.float64) for t in tensors], weight=weight)
    seen = den > 0
    out[seen] = num[seen] / den[seen]
    return out.to(merged_dtype(tensors))
