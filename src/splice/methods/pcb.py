"""PCB-merging: Parameter Competition Balancing (Du et al., NeurIPS 2024).

mergekit 0.1.5 has no PCB; this follows the paper (arXiv:2410.02396, Sec. 3)
with the concrete choices of the authors' released implementation
(``pcb-merging.py``), applied per tensor like every method here.

For task vectors ``d_i = t_i - base`` of N models (each tensor flattened):

1. **Intra-balancing** (importance within a task):
   ``intra_i = exp(N * norm(|d_i|)**2)``, where ``norm`` is min-max scaling over
   the task's elements.  This is the paper's ``Softmax(N * Norm(d_i*d_i))`` up to
   a per-task constant, which step 4 cancels.
2. **Inter-balancing** (agreement across tasks):
   ``inter_i = tanh(d_i * sum_j d_j)``: positive where a task agrees with the
   others' combined direction, negative where it fights it.
3. Score ``b_i = intra_i * inter_i``.
4. **Drop and rescale**: with ``q_i`` the score at ascending rank
   ``int(n * (1 - density_i))`` of ``b_i`` (n elements), scores at or below
   ``q_i`` become 0 and the rest ``(b_i - q_i) / (max b_i - q_i)``, in (0, 1].
   So ``density`` is the fraction kept (the paper drops the ratio
   ``r = 1 - density``); the reference runs use 0.05-0.2.
5. Merge: ``m = sum_i weight_i * s_i * d_i / max(sum_i s_i, 1e-12)``,
   result ``base + lambda * m``.  ``weight_i`` are the per-task coefficients the
   paper tunes with evolutionary search (they scale a task's contribution,
   not its scores); ``lambda`` is the paper's global scale.

Deviations from the reference code: it scores the whole flattened model at
once (here: each tensor), and first clips ``|d_i|`` to its 0.01%..99.99%
quantiles, which the paper does not describe and which is left out here.
Guards: a task whose magnitudes (or scores above ``q_i``) are all equal gets
intra-importance 1 (or scale 0) instead of 0/0; ``density`` 0 drops a task.
The divisor ``sum_i s_i`` is a sum of scales in [0, 1], zero only where every
task dropped the element, where the sum is zero too: the base is kept there
(no division by a zero sum of weights; ``weight`` only scales the numerator).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._sparsify import kth_smallest
from .registry import FRACTION, Param, merge_method


def _scores(delta: torch.Tensor, combined: torch.Tensor, n_models: int, mag: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """b = exp(N * (norm(|d|)**2 - 1)) * tanh(d * sum_j d_j) into ``out``; ``mag`` is scratch.

    The constant factor e^-N (cancelled by the min-max in ``_balance_``) keeps exp finite.
    """
    torch.abs(delta, out=mag)
    lo, hi = torch.aminmax(mag)
    if hi > lo:
        mag.sub_(lo).div_(hi - lo).square_().sub_(1).mul_(n_models).exp_()
    else:
        mag.fill_(1.0)
    return torch.mul(delta, combined, out=out).tanh_().mul_(mag)


def _balance_(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Drop scores at or below the (1 - density) quantile, min-max the rest into (0, 1]; in place."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if density <= 0 or n == 0:
        return scores.zero_()
    rank = min(int(n * (1 - density)), n - 1) if density < 1 else 0
    q = kth_smallest(flat, rank + 1)
    top = flat.max()
    if not top > q:
        return scores.zero_()
    return scores.clamp_(min=q).sub_(q).div_(top - q)


@merge_method(
    "pcb",
    params=(
        Param("weight", default=1.0, per_model=True, help="coefficient of each task's balanced task vector"),
        Param(
            "density",
            default=0.2,
            per_model=True,
            range=FRACTION,
            help="fraction of each task's elements kept by PCB score (1 - drop ratio)",
        ),
        Param("lambda", default=1.0, help="scale of the merged task vector"),
    ),
    base="required",
    summary="score elements by magnitude within a task and agreement across tasks, drop low scores, merge score-weighted",
    paper="Du et al. 2024, Parameter Competition Balancing for Model Merging (arXiv:2410.02396)",
)
def pcb(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    lambda_: float = 1.0,
) -> torch.Tensor:
    if not tensors or base.numel() == 0:
        return base.clone()
    n_models = len(tensors)
    weights = [float(w) for w in weight]
    dens = [float(x) for x in density]

    combined = torch.zeros_like(base)
    tmp = torch.empty_like(base)
    for t in tensors:
        combined.add_(torch.sub(t, base, out=tmp))

    merged = torch.zeros_like(base)
    total = torch.zeros_like(base)
    delta, mag, score = tmp, torch.empty_like(base), torch.empty_like(base)
    for t, w, rho in zip(tensors, weights, dens):
        torch.sub(t, base, out=delta)
        scale = _balance_(_scores(delta, combined, n_models, mag, score), rho)
        total.add_(scale)
        merged.addcmul_(scale, delta, value=w)
    del delta, mag, score, tmp, combined
    merged.div_(total.clamp_(min=1e-12))
    if lambda_ != 1:
        merged.mul_(lambda_)
    return merged.add_(base)
