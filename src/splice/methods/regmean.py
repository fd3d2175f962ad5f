"""RegMean: merge each Linear layer so that it best reproduces every model's outputs on its own inputs.

Jin et al. 2023 (Dataless Knowledge Fusion by Merging Weights of Language Models) solve,
for each Linear weight (torch layout ``W_i``: [out, in]), the least-squares problem
``min_W sum_i |X_i W^T - X_i W_i^T|^2`` over each model's calibration inputs ``X_i``,
whose solution needs only the input Gram matrices ``G_i = X_i^T X_i`` ([in, in])::

    W^T = (sum_i G_i')^-1  sum_i G_i' W_i^T
    G_i' = alpha * G_i + (1 - alpha) * diag(G_i)      (off-diagonal entries scaled by alpha)

- ``weight`` scales each model's Gram (``w_i G_i'``); with the default 1 it is the paper's
  formula. Identical Grams give the weighted average (``linear``), whatever the weights.
- With a base, the solve runs on task vectors: ``W = B + solve(W_i - B)``, the same
  formula (the base cancels) with less rounding, since task vectors are small.
- Embedding rows are averaged weighted by how often each model saw each token
  (``statistics`` 1-D: per-row token counts); rows no model saw fall back.
- Tensors without statistics (norms, biases, an untied head not measured) and rows no
  model saw take ``FALLBACK_METHOD`` (``linear`` with the same weights).

The solve runs in float64: Cholesky of ``sum_i w_i G_i'``, and, when that fails (a Gram of
fewer tokens than inputs, or ``alpha`` = 1 on a low-rank input), again with
``JITTER`` times the mean diagonal added, growing by ``JITTER_GROWTH`` up to
``JITTER_TRIES`` times; still failing, or an all-zero Gram, is a ``ValueError``.

``statistics`` is not a recipe parameter: the engine loads it, per model and per tensor,
from the calibration files a recipe names (``calibration:``; see ``splice.calibration``),
already divided by the tokens measured, so files of different token budgets count alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._statistics import data_free_fallback, merged_dtype
from .linear import linear
from .registry import FRACTION, NON_NEGATIVE, Param, merge_method

# The data-free method for tensors (and embedding rows) without statistics.
FALLBACK_METHOD = "linear"
# Jitter added to the diagonal when Cholesky fails, as a share of the mean diagonal: larger
# makes a near-singular system solvable sooner but biases the solution toward a
# column-weighted average.
JITTER = 1e-6
JITTER_GROWTH = 100.0
JITTER_TRIES = 3
# A factorisation whose smallest squared pivot is below this share of the mean diagonal counts
# as failed: rounding lets Cholesky "succeed" on a rank-deficient Gram (fewer tokens than
# inputs) with pivots near 1e-8, and the solve would then amplify rounding noise.
PIVOT_FLOOR = 1e-12


def scaled_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * G + (1 - alpha) * diag(G)``: the off-diagonal entries of ``gram`` scaled by ``alpha``."""
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def cholesky_with_jitter(a: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of ``a`` ([n, n], float64), adding diagonal jitter if it is needed."""
    scale = float(a.diagonal().mean()) if a.numel() else 0.0
    if not scale > 0:
        raise ValueError("singular system: the statistics of every model are zero for this tensor (no input reached it)")

    def factor_of(m: torch.Tensor) -> torch.Tensor | None:
        factor, info = torch.linalg.cholesky_ex(m)
        ok = int(info) == 0 and float(factor.diagonal().min()) ** 2 >= PIVOT_FLOOR * scale
        return factor if ok else None

    factor = factor_of(a)
    jitter = JITTER
    for _ in range(JITTER_TRIES):
        if factor is not None:
            return factor
        factor = factor_of(a + torch.eye(a.shape[0], dtype=a.dtype, device=a.device) * (jitter * scale))
        jitter *= JITTER_GROWTH
    if factor is not None:
        return factor
    raise ValueError(
        f"singular system: the summed statistics are not positive definite even with {jitter / JITTER_GROWTH:g} x the mean "
        "diagonal added; calibrate on more tokens or lower alpha"
    )


def solve_linear(tensors: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], weight: Sequence[float], alpha: float) -> torch.Tensor:
    """``(sum_i w_i G_i')^-1 sum_i w_i G_i' W_i^T``, transposed back to [out, in], in float64."""
    total = None
    rhs = None
    for t, g, w in zip(tensors, grams, weight):
        gi = scaled_gram(g.to(torch.float64), alpha) * float(w)
        part = gi @ t.to(torch.float64).T  # [in, out]
        total = gi if total is None else total.add_(gi)
        rhs = part if rhs is None else rhs.add_(part)
    factor = cholesky_with_jitter(total)
    return torch.cholesky_solve(rhs, factor).T


def rows_by_counts(tensors: Sequence[torch.Tensor], counts: Sequence[torch.Tensor], weight: Sequence[float]) -> torch.Tensor:
    """Each row the count-weighted average of the models' rows; rows no model saw take the fallback."""
    num = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    den = torch.zeros(tensors[0].shape[0], dtype=torch.float64, device=tensors[0].device)
    for t, c, w in zip(tensors, counts, weight):
        c = c.to(torch.float64) * float(w)
        num.add_(t.to(torch.float64) * c.unsqueeze(1))
        den.add_(c)
    seen = den > 0
    out = linear([t.to(torch.float64) for t in tensors], weight=weight)
    out[seen] = num[seen] / den[seen].unsqueeze(1)
    return out


@merge_method(
    "regmean",
    params=(
        Param("weight", default=1.0, per_model=True, range=NON_NEGATIVE, help="scale of each model's statistics"),
        Param(
            "alpha",
            default=0.9,
            range=FRACTION,
            help="scale of the Grams' off-diagonal entries (0: per-input-column weighted average; 1: the plain solve)",
        ),
        Param(
            "sequential",
            default=False,
            kind="bool",
            help="RegMean++: measure each layer's Grams on the already merged layers below it (needs the calibration text)",
        ),
    ),
    base="optional",
    statistics="inputs",
    summary="per Linear, the weights that best reproduce each model's outputs on its calibration inputs (needs `calibration:`)",
    paper="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (arXiv:2212.09849)",
)
def regmean(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weight: Sequence[float],
    alpha: float = 0.9,
    sequential: bool = False,
    statistics: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """RegMean of one parameter.

    Args:
        tensors: the models' tensors (base excluded), same shape.
        base: the base's tensor, or None; with a base the solve runs on task vectors.
        weight: per model, the scale of its statistics (and its weight in the fallback).
        alpha: the scale of the Grams' off-diagonal entries, in [0, 1].
        sequential: RegMean++; changes which statistics the engine hands in (``splice.calibration.sequential``),
            not the formula.
        statistics: per model, the input Gram ([in, in]) of this Linear weight, or the token
            counts ([rows]) of this embedding, or None (then every model must be None).

    Returns:
        The merged tensor (float32 unless the inputs are float64).
    """
    fallback = data_free_fallback(tensors, weight, statistics)
    if fallback is not None:
        return fallback
    deltas = [t.to(torch.float64) - base.to(torch.float64) for t in tensors] if base is not None else tensors
    first = statistics[0]
    shape = tuple(tensors[0].shape)
    if first.dim() == 2 and len(shape) == 2 and tuple(first.shape) == (shape[1], shape[1]):
        if any(tuple(s.shape) != tuple(first.shape) for s in statistics):
            raise ValueError(f"Gram shapes differ between models {sorted({tuple(s.shape) for s in statistics})}")
        out = solve_linear(deltas, statistics, weight, float(alpha))
    elif first.dim() == 1 and len(shape) == 2 and first.shape[0] == shape[0]:
        if any(tuple(s.shape) != tuple(first.shape) for s in statistics):
            raise ValueError(f"token-count shapes differ between models {sorted({tuple(s.shape) for s in statistics})}")
        out = rows_by_counts(deltas, statistics, weight)
    else:
        raise ValueError(f"statistics of shape {list(first.shape)} do not fit a tensor of shape {list(shape)}")
    if base is not None:
        out = out.add_(base.to(torch.float64))
    return out.to(merged_dtype(tensors))
