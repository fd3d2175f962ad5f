"""Sparsifying one task vector (delta): magnitude, random (DARE), breadcrumbs, DELLA.

Behaviour follows mergekit 0.1.5 (``mergekit/sparsify.py``); the code is ours and
is written for speed on large tensors:

- Magnitude thresholds come from ``torch.kthvalue`` (linear-time selection), not
  a full sort, followed by an exact fix-up so that exactly as many elements are
  kept as a sort would keep.  **Tie rule**: among elements whose magnitude equals
  the threshold, the ones with the lowest flat index win a place in a "largest k"
  selection, and lose it at the low end of an ascending window, i.e. the order of a
  *stable* sort in mergekit's direction.  (mergekit's own ``argsort`` is unstable
  on CPU for more than a few elements, so its choice among exact ties is
  arbitrary; on real data exact ties of non-zero magnitudes at the threshold are
  rare and swap values of equal size.)  Ties among exact zeros are not resolved
  at all where the mask only multiplies the delta: a zero stays zero either way.
- Every ``*_`` function takes a delta the caller owns, may overwrite it and an
  optional ``scratch`` tensor of the same shape, and returns the tensor that
  holds the result (one of the two).
- ``rescale=True`` is mergekit 0.1.5's L1 rescale: the kept part is scaled so
  that its L1 norm equals the L1 norm of the whole delta (skipped when either
  norm is below 1e-7).  For DARE this is the paper's 1/density in expectation.
"""

from __future__ import annotations

import math

import torch

_RESCALE_EPS = 1e-7


# --------------------------------------------------------------------------- selection


_SAMPLE = 1 << 15  # sample size for bracketing the k-th value
_SPREAD = 5.0  # bracket half-width, in binomial standard deviations


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a flat tensor, as a 0-d tensor; exact.

    Large tensors: the order statistics of a fixed-seed random sample bracket
    the answer (5 standard deviations either side), two comparisons count what
    lies below the bracket and pick out the few entries inside it, and
    ``torch.kthvalue`` finishes on those.  If the bracket misses (chance below
    1e-6) the whole tensor goes to ``torch.kthvalue``.  The sample only decides
    speed, never the result, and uses its own generator (no caller randomness).
    """
    n = values.numel()
    if n <= 8 * _SAMPLE:
        return torch.kthvalue(values, k).values
    g = torch.Generator(device=values.device).manual_seed(0x5EED)
    idx = torch.randint(0, n, (_SAMPLE,), generator=g, device=values.device)
    sample = torch.sort(values[idx]).values
    q = (k - 0.5) / n
    spread = _SPREAD * math.sqrt(_SAMPLE * q * (1 - q)) + 2
    lo_i, hi_i = math.floor(q * _SAMPLE - spread), math.ceil(q * _SAMPLE + spread)
    inside = values >= sample[lo_i] if lo_i >= 0 else None
    below = n - int(torch.count_nonzero(inside)) if inside is not None else 0
    if below >= k:
        return torch.kthvalue(values, k).values
    if hi_i < _SAMPLE:
        upper = values <= sample[hi_i]
        inside = upper if inside is None else inside.logical_and_(upper)
        del upper
    if inside is None:
        return torch.kthvalue(values, k).values
    if below + int(torch.count_nonzero(inside)) < k:
        return torch.kthvalue(values, k).values
    return torch.kthvalue(values[inside], k - below).values


def topk_mask(scores: torch.Tensor, k: int, *, zero_ties_free: bool = False) -> torch.Tensor:
    """Boolean mask (shape of ``scores``) of the ``k`` largest entries.

    Exactly ``k`` entries are set, as ``argsort(descending)[:k]`` with a stable
    sort would pick: ties at the threshold go to the lowest flat indices.
    With ``zero_ties_free``, ties are left unresolved when the threshold is 0
    (the caller only uses the mask to zero out entries that are 0 anyway), and
    the mask is then simply ``scores > 0``.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    t = kth_smallest(flat, n - k + 1)
    if zero_ties_free and float(t) == 0.0:
        return scores > 0
    keep = flat >= t
    extra = int(torch.count_nonzero(keep)) - k
    if extra > 0:  # ties at the threshold: drop the highest-index ones
        tied = torch.nonzero(flat == t).squeeze(1)
        keep[tied[tied.numel() - extra :]] = False
    return keep.reshape(scores.shape)


def rank_window_mask(values: torch.Tensor, start: int, stop: int, *, zero_ties_free: bool = False) -> torch.Tensor:
    """Boolean mask of the entries whose ascending rank lies in ``[start, stop)``.

    Ranks are those of a stable ascending sort (ties ordered by flat index), as
    ``sort(values).indices[start:stop]`` would select.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    start, stop = max(0, start), min(n, stop)
    if stop <= start:
        return torch.zeros_like(values, dtype=torch.bool)
    if start == 0 and stop == n:
        return torch.ones_like(values, dtype=torch.bool)
    lo = kth_smallest(flat, start + 1) if start > 0 else None  # value at rank start
    hi = kth_smallest(flat, stop) if stop < n else None  # value at rank stop - 1
    if lo is not None and hi is not None:
        keep = (flat >= lo).logical_and_(flat <= hi)
    elif lo is not None:
        keep = flat >= lo
    else:
        keep = flat <= hi
    if int(torch.count_nonzero(keep)) != stop - start:
        if lo is not None and not (zero_ties_free and float(lo) == 0.0):
            below = int(torch.count_nonzero(flat < lo))
            surplus = start - below  # the first `surplus` ties at lo rank below start
            if surplus > 0:
                tied = torch.nonzero(flat == lo).squeeze(1)
                keep[tied[:surplus]] = False
        if hi is not None and not (zero_ties_free and float(hi) == 0.0):
            upto = int(torch.count_nonzero(flat <= hi))
            surplus = upto - stop  # the last `surplus` ties at hi rank at or above stop
            if surplus > 0:
                tied = torch.nonzero(flat == hi).squeeze(1)
                keep[tied[tied.numel() - surplus :]] = False
    return keep.reshape(values.shape)


# --------------------------------------------------------------------------- sparsifiers


def _l1(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, 1)


def _rescale_(masked: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
    """Scale ``masked`` in place so its L1 norm is ``before`` (mergekit's ``rescale``)."""
    if before is None:
        return masked
    after = _l1(masked)
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return masked
    return masked.mul_(before / after)


def _magnitudes(delta: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    return delta.abs() if scratch is None else torch.abs(delta, out=scratch)


def _shrink(x: torch.Tensor, below: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``x`` where ``|x| > below`` else 0, in one pass (``below`` a 0-d tensor of x's dtype)."""
    lambd = float(below)
    if out is None:
        return torch.nn.functional.hardshrink(x, lambd)
    return torch.ops.aten.hardshrink.out(x, lambd, out=out)


def magnitude_(
    delta: torch.Tensor, density: float, rescale: bool = False, *, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """TIES trim: keep the ``max(1, int(density * numel))`` largest magnitudes.

    Returns the trimmed delta: ``delta`` itself, or ``scratch`` (a working
    tensor like ``delta``, optional) holding the result.
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_()
    n = delta.numel()
    k = max(1, int(density * n))
    before = _l1(delta) if rescale else None
    mag = _magnitudes(delta, scratch).reshape(-1)
    t = kth_smallest(mag, n - k + 1) if k < n else mag.min()
    if float(t) == 0.0:  # every non-zero entry is kept; dropping zeros changes nothing
        return delta
    at_or_above = int(torch.count_nonzero(mag >= t))
    if at_or_above == k:  # no tie straddles the threshold: keep |x| >= t
        out = _shrink(delta, torch.nextafter(t, torch.zeros_like(t)), scratch)
    else:  # keep |x| > t, then the lowest-index entries equal to t
        tied = torch.nonzero(mag == t).squeeze(1)
        tied = tied[: k - (at_or_above - tied.numel())]
        flat_delta = delta.reshape(-1)
        kept_ties = flat_delta[tied]
        out = _shrink(delta, t, scratch)
        out.reshape(-1)[tied] = kept_ties
    return _rescale_(out, before)


def breadcrumbs_(
    delta: torch.Tensor, density: float, gamma: float, rescale: bool = False, *, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``int(gamma*n)`` largest magnitudes and the smallest.

    ``int(density*n)`` elements are kept: in ascending magnitude order the window
    starting after ``n - int(density*n) - int(gamma*n)`` smallest (at least 0).
    When density and gamma leave no room, fewer outliers are dropped.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    if target <= 0:
        return delta.zero_()
    before = _l1(delta) if rescale else None
    keep = rank_window_mask(_magnitudes(delta, scratch), n_bot, n_bot + target, zero_ties_free=True)
    delta.masked_fill_(keep.logical_not_(), 0)
    return _rescale_(delta, before)


def _uniform(like: torch.Tensor, generator: torch.Generator | None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """U[0, 1) draws shaped like ``like``: the same stream as ``torch.rand(like.shape, generator=...)``."""
    out = torch.empty_like(like) if scratch is None else scratch
    return out.uniform_(0, 1, generator=generator)


def random_(
    delta: torch.Tensor,
    density: float,
    rescale: bool,
    generator: torch.Generator | None,
    *,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """DARE: keep each element independently with probability ``density``.

    One uniform draw per element, the stream of ``torch.rand(delta.shape,
    generator=...)``; the element is kept iff ``u < density``.
    """
    if density >= 1:
        return delta
    before = _l1(delta) if rescale else None
    if density <= 0:
        delta.zero_()
    else:
        u = _uniform(delta, generator, scratch)
        # ceil(density - u) is exactly 1 where u < density and 0 (or -0) elsewhere:
        # a float mask without a boolean round trip.
        delta.mul_(torch.sub(density, u, out=u).ceil_())
    return _rescale_(delta, before)


def _sort_key(x: torch.Tensor) -> torch.Tensor:
    """Non-negative floats sort like their bit patterns read as signed integers (faster)."""
    if x.dtype == torch.float32:
        return x.view(torch.int32)
    if x.dtype == torch.float64:
        return x.view(torch.int64)
    return x


def della_(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: bool,
    generator: torch.Generator | None,
    *,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """DELLA MagPrune: keep probabilities rise linearly with magnitude rank within a row.

    Along dim 1 (a 1-D tensor is one row), the element of ascending rank r
    (0-based, n per row) is kept with probability
    ``density - epsilon + 2 * epsilon * r / (n - 1)``; rows of one element use
    ``density``.  ``density +- epsilon`` must lie strictly inside (0, 1).
    """
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della: epsilon must keep density +- epsilon inside (0, 1) (density={density}, epsilon={epsilon})"
        )
    before = _l1(delta) if rescale else None
    rows = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    ncols = rows.shape[1]
    # Draw the keep decisions in sorted order (probability depends on rank only),
    # then scatter them back to the elements' own positions.
    mags = _magnitudes(delta, scratch).reshape(rows.shape)
    order = torch.argsort(_sort_key(mags), dim=1, stable=True)
    shape = [1] * rows.dim()
    shape[1] = ncols
    if ncols > 1:
        ramp = torch.arange(ncols, device=delta.device, dtype=delta.dtype).div_(ncols - 1)
        probs = ramp.mul_(2 * epsilon).add_(density - epsilon).reshape(shape)
    else:
        probs = torch.full(shape, density, device=delta.device, dtype=delta.dtype)
    drop_sorted = _uniform(mags, generator, mags) >= probs
    drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
    del order, drop_sorted, mags
    rows.masked_fill_(drop, 0)
    return _rescale_(delta, before)
