"""Sparsifying one task vector (delta): magnitude, random (DARE), breadcrumbs, DELLA.

Behaviour follows mergekit 0.1.5 (``mergekit/sparsify.py``); the code is ours and
is written for speed on large tensors:

- Up to ``SORT_LIMIT`` (262,144) elements, which covers every 1-D tensor of
  a language model, selection uses the very sort call mergekit makes, so the
  kept set is mergekit's even among exactly tied magnitudes (same torch build
  and device).
- Larger tensors use linear-time selection (``bracket``: a sampled bracket,
  then ``torch.kthvalue`` on the few entries inside it) instead of a full
  sort, followed by an exact fix-up so that exactly as many elements are kept
  as mergekit keeps, and the mask is applied in one pass (``hardshrink``).
  **Tie rule** there: among elements whose magnitude equals the threshold,
  the lowest flat indices win a place in a "largest k" selection and lose it
  at the low end of an ascending window: the order of a *stable* sort in
  mergekit's direction.  mergekit's own sort is not stable, so its choice
  among exact ties is an artifact of the sort algorithm.  Such ties are common
  with bf16 checkpoints (deltas take few distinct values): on those, the kept
  set of a large tensor can differ from mergekit's in which of several
  equal-magnitude entries survive (same count, same magnitudes).  With
  distinct magnitudes it is identical.  Ties among exact zeros are not
  resolved where the mask only multiplies the delta: a zero stays zero either
  way.
- Every ``*_`` function takes a delta the caller owns, may overwrite it and an
  optional ``scratch`` tensor of the same shape, and returns the tensor that
  holds the result (one of the two).
- DARE's random stream is counter-based (``dare_ranks``): element j of model i
  is kept iff a hash of (j, model i's key) is below ``density * 2**24``, the
  key being two 32-bit integers drawn from the generator (seeded by ``--seed``
  and the tensor's name) for each model in model order.  The keep decision of
  an element depends on nothing but the seed, the tensor, the model and the
  element's index, so any chunking, thread or device gives the same mask.
  mergekit draws ``torch.bernoulli`` over the whole tensor from torch's global
  generator instead (unseeded): both keep each element independently with
  probability ``density``, neither reproduces the other's mask.
- ``rescale=True`` is mergekit 0.1.5's L1 rescale: the kept part is scaled so
  that its L1 norm equals the L1 norm of the whole delta (skipped when either
  norm is below 1e-7).  For DARE this is the paper's 1/density in expectation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _reduce
from ._sizes import TORCH_CHUNK

_RESCALE_EPS = 1e-7


# --------------------------------------------------------------------------- selection


_SAMPLE = 1 << 15  # sample size for bracketing the k-th value
SORT_LIMIT = 8 * _SAMPLE  # up to this many elements, select with mergekit's own sort call
_SPREAD = 5.0  # bracket half-width, in binomial standard deviations


class Bracket(NamedTuple):
    """The k-th smallest value of a flat tensor, and the entries around it.

    ``below`` entries are smaller than every candidate; the candidates are
    ``values`` (in flat order) at positions ``index`` (None: every position),
    and all remaining entries are larger than every candidate.  ``value`` is
    among the candidates.
    """

    value: torch.Tensor
    below: int
    index: torch.Tensor | None
    values: torch.Tensor

    def count_below(self, t: torch.Tensor) -> int:
        """How many entries of the whole tensor are < ``t`` (t among the candidates)."""
        return self.below + int(torch.count_nonzero(self.values < t))

    def positions_equal(self, t: torch.Tensor) -> torch.Tensor:
        """Flat positions, ascending, of the entries equal to ``t`` (t among the candidates)."""
        hits = torch.nonzero(self.values == t).squeeze(1)
        return hits if self.index is None else self.index[hits]


def _whole(values: torch.Tensor, k: int) -> Bracket:
    return Bracket(torch.kthvalue(values, k).values, 0, None, values)


def sample_bounds(n: int, k: int, gather, device) -> tuple[torch.Tensor, int, int]:
    """A fixed-seed sample of a flat tensor's n entries, sorted, and the sample ranks bracketing the k-th.

    ``gather(picks)`` returns the entries at the flat positions ``picks``.  The
    k-th smallest lies between ``sample[lo_i]`` and ``sample[hi_i]`` unless a
    5-sigma event happens; ``lo_i`` may be < 0 and ``hi_i`` >= the sample size
    (no bound on that side).
    """
    g = torch.Generator(device=device).manual_seed(0x5EED)
    picks = torch.randint(0, n, (_SAMPLE,), generator=g, device=device)
    sample = torch.sort(gather(picks)).values
    q = (k - 0.5) / n
    spread = _SPREAD * math.sqrt(_SAMPLE * q * (1 - q)) + 2
    return sample, math.floor(q * _SAMPLE - spread), math.ceil(q * _SAMPLE + spread)


def bracket(values: torch.Tensor, k: int) -> Bracket:
    """The k-th smallest entry (1-based) of a flat tensor, exactly, in linear time.

    Large tensors: the order statistics of a fixed-seed random sample bracket
    the answer (5 standard deviations either side), two comparisons count what
    lies below the bracket and pick out the few entries inside it, and
    ``torch.kthvalue`` finishes on those.  If the bracket misses (chance below
    1e-6) the whole tensor goes to ``torch.kthvalue``.  The sample only decides
    speed, never the result, and uses its own generator (no caller randomness).
    """
    n = values.numel()
    if n <= SORT_LIMIT:
        return _whole(values, k)
    sample, lo_i, hi_i = sample_bounds(n, k, lambda picks: values[picks], values.device)
    inside = values >= sample[lo_i] if lo_i >= 0 else None
    below = n - int(torch.count_nonzero(inside)) if inside is not None else 0
    if below >= k:
        return _whole(values, k)
    if hi_i < _SAMPLE:
        upper = values <= sample[hi_i]
        inside = upper if inside is None else inside.logical_and_(upper)
        del upper
    if inside is None:
        return _whole(values, k)
    index = torch.nonzero(inside).squeeze(1)
    del inside
    if below + index.numel() < k:
        return _whole(values, k)
    candidates = values[index]
    return Bracket(torch.kthvalue(candidates, k - below).values, below, index, candidates)


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a flat tensor, as a 0-d tensor (see ``bracket``)."""
    return bracket(values, k).value


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (shape of ``scores``) of the ``k`` largest entries.

    Exactly ``k`` entries are set.  Up to ``SORT_LIMIT`` elements they are
    ``torch.topk``'s (mergekit's sce call); above, ties at the threshold go to
    the lowest flat indices, as a stable descending sort would pick.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if n <= SORT_LIMIT:  # small: mergekit's exact call (sce's topk), ties included
        keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
        keep[torch.topk(flat, k, largest=True).indices] = True
        return keep.reshape(scores.shape)
    sel = bracket(flat, n - k + 1)
    keep = flat >= sel.value
    extra = n - sel.count_below(sel.value) - k
    if extra > 0:  # ties at the threshold: drop the highest-index ones
        tied = sel.positions_equal(sel.value)
        keep[tied[tied.numel() - extra :]] = False
    return keep.reshape(scores.shape)


# --------------------------------------------------------------------------- sparsifiers


def _l1(x: torch.Tensor) -> torch.Tensor:
    return _reduce.norm(x, 1)  # thread-count independent: rescaled deltas keep their bits whatever --threads


def rescale_factor(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor | None:
    """The factor mergekit's ``rescale`` multiplies the kept part by (0-d tensors in), None when it skips it."""
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return None
    return before / after


def _rescale_(masked: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
    """Scale ``masked`` in place so its L1 norm is ``before`` (mergekit's ``rescale``)."""
    if before is None:
        return masked
    q = rescale_factor(before, _l1(masked))
    return masked if q is None else masked.mul_(q)


def _magnitudes(delta: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    return delta.abs() if scratch is None else torch.abs(delta, out=scratch)


def _keep_only_(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Zero every entry of ``x`` except those at the given flat positions; in place."""
    flat = x.reshape(-1)
    kept = flat[positions]
    x.zero_()
    flat[positions] = kept
    return x


def _shrink(x: torch.Tensor, below: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``x`` where ``|x| > below`` else 0, in one pass (``below`` a 0-d tensor of x's dtype)."""
    lambd = float(below)
    if out is None:
        return torch.nn.functional.hardshrink(x, lambd)
    return torch.ops.aten.hardshrink.out(x, lambd, out=out)


def magnitude_(delta: torch.Tensor, density: float, rescale: bool = False, *, scratch: torch.Tensor | None = None) -> torch.Tensor:
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
    if k >= n:
        return delta
    if n <= SORT_LIMIT:  # small: mergekit's exact call, so even ties resolve as in mergekit
        return _rescale_(_keep_only_(delta, torch.argsort(mag, descending=True)[:k]), before)
    sel = bracket(mag, n - k + 1)  # the k-th largest magnitude
    t = sel.value
    if float(t) == 0.0:  # every non-zero entry is kept; dropping zeros changes nothing
        return delta
    at_or_above = n - sel.count_below(t)
    if at_or_above == k:  # no tie straddles the threshold: keep |x| >= t
        out = _shrink(delta, torch.nextafter(t, torch.zeros_like(t)), scratch)
    else:  # keep |x| > t, then the lowest-index entries equal to t
        tied = sel.positions_equal(t)
        tied = tied[: k - (at_or_above - tied.numel())]
        kept_ties = delta.reshape(-1)[tied]
        out = _shrink(delta, t, scratch)
        out.reshape(-1)[tied] = kept_ties
    return _rescale_(out, before)


def breadcrumbs_(
    delta: torch.Tensor, density: float, gamma: float, rescale: bool = False, *, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``int(gamma*n)`` largest magnitudes and the smallest.

    ``int(density*n)`` elements are kept: in ascending magnitude order (stable)
    the window of ranks ``[n_bot, n_bot + int(density*n))`` with
    ``n_bot = max(0, n - int(density*n) - int(gamma*n))``; when density and gamma
    leave no room, fewer outliers are dropped.  Returns ``delta`` or ``scratch``.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    start = max(0, n - target - n_top)
    stop = start + target
    if target <= 0:
        return delta.zero_()
    before = _l1(delta) if rescale else None
    mag = _magnitudes(delta, scratch).reshape(-1)
    if n <= SORT_LIMIT:  # small: mergekit's exact call, so even ties resolve as in mergekit
        return _rescale_(_keep_only_(delta, torch.sort(mag, descending=False).indices[start:stop]), before)
    lower = bracket(mag, start + 1) if start > 0 else None  # value at rank start
    upper = bracket(mag, stop) if stop < n else None  # value at rank stop - 1
    # Entries tied with a bound beyond the window (positions found before mag is overwritten).
    drop = []
    if lower is not None and float(lower.value) != 0.0:
        surplus = start - lower.count_below(lower.value)
        if surplus > 0:
            drop.append(lower.positions_equal(lower.value)[:surplus])
    if upper is not None and float(upper.value) != 0.0:
        tied = upper.positions_equal(upper.value)
        surplus = upper.count_below(upper.value) + tied.numel() - stop
        if surplus > 0:
            drop.append(tied[tied.numel() - surplus :])
    out, spare = delta, scratch
    if lower is not None and float(lower.value) != 0.0:  # keep |x| >= lower bound
        out, spare = _shrink(delta, torch.nextafter(lower.value, torch.zeros_like(lower.value)), scratch), delta
    if upper is not None:  # remove |x| > upper bound: x - shrink(x, bound)
        out.sub_(_shrink(out, upper.value, spare))
    flat = out.reshape(-1)
    for positions in drop:
        flat[positions] = 0
    return _rescale_(out, before)


def _uniform(like: torch.Tensor, generator: torch.Generator | None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """U[0, 1) draws shaped like ``like``: the same stream as ``torch.rand(like.shape, generator=...)``."""
    out = torch.empty_like(like) if scratch is None else scratch
    return out.uniform_(0, 1, generator=generator)


# DARE's stream: a 32-bit integer hash of (element index, model key) per element; its top
# DARE_BITS bits are the element's uniform draw u = rank / 2**DARE_BITS.
DARE_BITS = 24
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B  # the multipliers of a low-bias 32-bit integer mixer (xorshift-multiply)
_MASK32 = 0xFFFFFFFF


class DropKey(NamedTuple):
    """One model's DARE key: two 32-bit integers drawn from the generator."""

    a: int
    b: int


def dare_keys(generator: torch.Generator | None, count: int) -> list[DropKey]:
    """``count`` keys (one per model, in model order) from ``generator`` (None: torch's global one)."""
    dev = generator.device if generator is not None else torch.device("cpu")
    drawn = torch.randint(0, 1 << 32, (count, 2), generator=generator, device=dev, dtype=torch.int64).tolist()
    return [DropKey(int(a), int(b)) for a, b in drawn]


def dare_threshold(density: float) -> int:
    """The rank bound of ``density``: ``rank < threshold`` iff ``rank / 2**DARE_BITS < density`` (exact)."""
    return min(1 << DARE_BITS, math.ceil(density * (1 << DARE_BITS)))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32), without a product beyond 2**49 (no int64 overflow)."""
    return x.mul(c & 0xFFFF).add_(x.mul(c >> 16).bitwise_and_(0xFFFF).bitwise_left_shift_(16)).bitwise_and_(_MASK32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x.bitwise_xor_(x >> 16)
    x = _mul32(x, _MIX1)
    x = x.bitwise_xor_(x >> 15)
    x = _mul32(x, _MIX2)
    return x.bitwise_xor_(x >> 16)


def dare_ranks(key: DropKey, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The DARE ranks (int64 in [0, 2**DARE_BITS)) of flat elements ``start .. start+count-1`` under ``key``.

    ``h = mix(mix(j mod 2**32 xor key.a) xor (j >> 32) xor key.b)``, rank ``h >> 8``;
    ``mix`` is the xorshift-multiply mixer (16, ``_MIX1``, 15, ``_MIX2``, 16) on 32 bits.
    Plain int64 torch arithmetic: the same integers on every device.
    """
    j = torch.arange(start, start + count, dtype=torch.int64, device=device)
    h = _mix32((j & _MASK32).bitwise_xor_(key.a))
    h = _mix32(h.bitwise_xor_(j.bitwise_right_shift_(32)).bitwise_xor_(key.b))
    return h.bitwise_right_shift_(32 - DARE_BITS)


def random_(
    delta: torch.Tensor,
    density: float,
    rescale: bool,
    generator: torch.Generator | None = None,
    *,
    key: DropKey | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """DARE: keep each element independently with probability ``density``.

    Element j (flat index) is kept iff ``dare_ranks(key, j) < dare_threshold(density)``;
    dropped elements become +0.  ``key`` defaults to one drawn from ``generator``.
    The ranks are made ``TORCH_CHUNK`` elements at a time (any chunking gives
    the same ranks).  ``scratch`` is unused (the mask is applied in place).
    """
    if density >= 1:
        return delta
    before = _l1(delta) if rescale else None
    if density <= 0:
        delta.zero_()
    else:
        if key is None:
            key = dare_keys(generator, 1)[0]
        thr = dare_threshold(density)
        n = delta.numel()
        flat = delta.view(-1) if delta.is_contiguous() else None
        drop = None if flat is not None else torch.empty(n, dtype=torch.bool, device=delta.device)
        for a in range(0, n, TORCH_CHUNK):
            b = min(n, a + TORCH_CHUNK)
            chunk_drop = dare_ranks(key, a, b - a, delta.device) >= thr
            if flat is not None:
                flat[a:b].masked_fill_(chunk_drop, 0)
            else:
                drop[a:b] = chunk_drop
        if drop is not None:
            delta.masked_fill_(drop.view(delta.shape), 0)
    return _rescale_(delta, before)


def _sort_key(x: torch.Tensor) -> torch.Tensor:
    """Non-negative floats sort like their bit patterns read as signed integers (faster)."""
    if x.dtype == torch.float32:
        return x.view(torch.int32)
    if x.dtype == torch.float64:
        return x.view(torch.int64)
    return x


def check_della(density: float, epsilon: float) -> None:
    """Refuse an ``epsilon`` that puts a keep probability outside (0, 1)."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: epsilon must keep density +- epsilon inside (0, 1) (density={density}, epsilon={epsilon})")


def della_probs(ncols: int, density: float, epsilon: float, device, dtype) -> torch.Tensor:
    """Keep probability by ascending rank along a row of ``ncols``, shaped ``[1, ncols]`` (a row of one: density)."""
    if ncols > 1:
        ramp = torch.arange(ncols, device=device, dtype=dtype).div_(ncols - 1)
        return ramp.mul_(2 * epsilon).add_(density - epsilon).reshape(1, ncols)
    return torch.full((1, ncols), density, device=device, dtype=dtype)


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
    check_della(density, epsilon)
    before = _l1(delta) if rescale else None
    rows = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    ncols = rows.shape[1]
    # Draw the keep decisions in sorted order (probability depends on rank only),
    # then scatter them back to the elements' own positions.
    mags = _magnitudes(delta, scratch).reshape(rows.shape)
    order = torch.argsort(_sort_key(mags), dim=1, stable=True)
    shape = [1] * rows.dim()
    shape[1] = ncols
    probs = della_probs(ncols, density, epsilon, delta.device, delta.dtype).reshape(shape)
    drop_sorted = _uniform(mags, generator, mags) >= probs
    drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
    del order, drop_sorted, mags
    rows.masked_fill_(drop, 0)
    return _rescale_(delta, before)
