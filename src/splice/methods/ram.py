"""RAM and RAM+ (tensor-local): Reinforced Agent Merging (Yuan et al. 2026; mergekit 0.1.5 semantics).

For task vectors ``d_i = t_i - base`` of K models, an element *takes part* for
model i when ``|d_i| > epsilon``; ``c`` (per element) counts the models that
take part.

- **ram**: each element of the merged delta is the mean of the deltas that take
  part there: ``sum_i d_i [|d_i| > eps] / max(c, 1)``. An element only one model
  changed keeps that model's change in full (no dilution by the others' zeros);
  an element no model changed stays the base's.
- **ramplus_tl**: as ram, but a model's *unique* elements (c = 1) are scaled by
  ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)``, with
  ``rho_i = shared_i / max(unique_i, epsilon)`` the ratio of the model's
  elements that other models also change (c > 1) to those only it changes,
  counted over this tensor ("tensor-local"). A model that overlaps a lot with
  the others gets its distinctive changes amplified, by at most ``r * alpha``.

Task vectors are re-derived from the inputs in each pass (counts, then the
per-model ratios, then the sum) instead of stacking K of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .registry import NON_NEGATIVE, Param, merge_method

EPSILON = Param("epsilon", default=1e-5, range=NON_NEGATIVE, help="a delta counts as a change when its magnitude exceeds this")


def _takes_part(t: torch.Tensor, base: torch.Tensor, epsilon: float, delta: torch.Tensor) -> torch.Tensor:
    """``|t - base| > epsilon``; leaves ``t - base`` in ``delta``."""
    torch.sub(t, base, out=delta)
    return delta.abs() > epsilon


def _counts(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float, delta: torch.Tensor) -> torch.Tensor:
    """Per element, how many models change it by more than epsilon."""
    count = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for t in tensors:
        count += _takes_part(t, base, epsilon, delta)
    return count


def _merge(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float, unique_scale: list[float] | None) -> torch.Tensor:
    delta = torch.empty_like(base)
    count = _counts(tensors, base, epsilon, delta)
    unique = count == 1
    divisor = count.clamp_(min=1).to(base.dtype)  # where no model takes part every kept delta is 0 anyway
    if unique_scale is None:
        unique_scale = [1.0] * len(tensors)
    out = torch.zeros_like(base)
    for t, lam in zip(tensors, unique_scale):
        kept = delta.mul_(_takes_part(t, base, epsilon, delta))
        # unique elements: the delta times lambda_i (1 for ram); shared ones: the delta over the count
        out += torch.where(unique, kept * lam, kept / divisor)
    return out.add_(base)


def _unique_scales(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float, r: float, alpha: float) -> list[float]:
    """lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha) for each model."""
    delta = torch.empty_like(base)
    count = _counts(tensors, base, epsilon, delta)
    scales = []
    for t in tensors:
        part = _takes_part(t, base, epsilon, delta)
        shared = int(torch.count_nonzero(part & (count > 1)))
        unique = int(torch.count_nonzero(part & (count == 1)))
        rho = shared / max(unique, epsilon) if unique or epsilon else 0.0
        scales.append(1.0 + r * min(max(rho, 0.0), alpha))
    return scales


@merge_method(
    "ram",
    params=(EPSILON,),
    base="required",
    summary="per element, the mean of the deltas that change it (above epsilon); a change only one model makes is kept whole",
    paper="Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models (RAM) (arXiv:2601.13572)",
)
def ram(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    return _merge(tensors, base, float(epsilon), None)


@merge_method(
    "ramplus_tl",
    params=(
        Param("r", default=0.1, range=NON_NEGATIVE, help="how strongly a model's unique changes are amplified"),
        Param("alpha", default=0.2, range=NON_NEGATIVE, help="cap on the shared-to-unique ratio that drives the amplification"),
        EPSILON,
    ),
    base="required",
    summary="ram, with each model's unique changes scaled by 1 + r * min(shared/unique, alpha) over the tensor",
    paper="Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models (RAM+, tensor-local) (arXiv:2601.13572)",
)
def ramplus_tl(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    eps = float(epsilon)
    return _merge(tensors, base, eps, _unique_scales(tensors, base, eps, float(r), float(alpha)))
