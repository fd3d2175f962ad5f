"""Arcee Fusion: keep the other model's change only where it matters most (mergekit 0.1.5 semantics).

With a = base, b = the other model, for every row (the last axis) of the tensor:

    p   = softmax(b) + 1e-8,  q = softmax(a) + 1e-8
    kl  = sum p * log(p / q)                   (one number per row)
    s   = |b - a| * kl                         (importance of each element)

The threshold is ``median(s) + 1.5 * (Q3(s) - Q1(s))`` (the usual outlier
fence), each quantile taken as mergekit does: the element at position
``floor(q * (n - 1))`` of the sorted scores (no interpolation). The output is
``a + (b - a) * [s >= threshold]``: only the outlying changes are fused in.

Above ``QUANTILE_SAMPLE`` elements mergekit 0.1.5 estimates the quantiles on
that many scores drawn with replacement by an unseeded ``torch.randint``;
splice draws the same kind of sample from the engine's seeded generator, so a
recipe and seed give the same bytes every run (mergekit's result changes from
run to run there). Smaller tensors (all of them in a tiny model) are exact and
need no randomness.

Base required, exactly one other model, no parameters (as in mergekit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _reduce
from ._geometry import work_dtype
from .registry import merge_method

SOFTMAX_EPS = 1e-8  # added to both softmaxes before the log ratio (mergekit's value)
FENCE = 1.5  # threshold = median + FENCE * IQR
# Quantiles of larger tensors are estimated on this many scores drawn with replacement (mergekit's size).
QUANTILE_SAMPLE = 1_000_000


def _quantile_sample(flat: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    n = flat.numel()
    if n <= QUANTILE_SAMPLE:
        return flat
    device = generator.device if generator is not None else flat.device
    idx = torch.randint(n, (QUANTILE_SAMPLE,), generator=generator, device=device)
    return flat[idx.to(flat.device)]


def _sorted_at(values: torch.Tensor, q_num: int, q_den: int) -> torch.Tensor:
    """The element at position floor(q * (n - 1)) of ``values`` sorted ascending, q = q_num / q_den."""
    k = (q_num * (values.numel() - 1)) // q_den  # exact in integers (mergekit's float32 product is exact up to its sample size)
    return torch.kthvalue(values, k + 1).values


def importance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|b - a| times the KL divergence of softmax(b) from softmax(a) along the last axis."""
    p = torch.softmax(b, dim=-1).add_(SOFTMAX_EPS)
    q = torch.softmax(a, dim=-1).add_(SOFTMAX_EPS)
    kl = _reduce.sum_last(p * torch.log(p / q))
    return (b - a).abs_().mul_(kl.unsqueeze(-1))


def fusion_threshold(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """median + 1.5 * IQR of ``scores`` (mergekit's approximate quantiles)."""
    sample = _quantile_sample(scores.reshape(-1), generator)
    median = _sorted_at(sample, 1, 2)
    q1, q3 = _sorted_at(sample, 1, 4), _sorted_at(sample, 3, 4)
    return median + FENCE * (q3 - q1)


@merge_method(
    "arcee_fusion",
    params=(),
    base="required",
    randomized=True,  # only tensors above QUANTILE_SAMPLE elements draw from the generator
    summary="fuse in the changes whose importance (size of the change times its row's softmax KL) is an outlier",
    paper="Arcee AI 2025, Arcee Fusion (mergekit; https://arcee.ai)",
    min_models=1,
    max_models=1,
)
def arcee_fusion(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    dtype = work_dtype(base)
    a = base.to(dtype)
    b = tensors[0].to(dtype)
    scores = importance(a, b)
    keep = scores >= fusion_threshold(scores, generator)
    del scores
    return (b - a).mul_(keep).add_(a)
