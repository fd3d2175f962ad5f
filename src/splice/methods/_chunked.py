"""Task arithmetic and TIES on large CPU tensors, one cache-sized chunk at a time.

The whole-tensor pipeline in ``task_arithmetic`` makes about twenty passes over
tensor-sized float32 buffers per model.  On a CPU those passes are cheap only
while the data stays in cache; on a 40M-element embedding each pass goes to
main memory, and every fresh tensor-sized buffer costs page faults (large
allocations are mmap'd and returned at once, see ``engine``).  Here the only
step that needs the whole tensor, finding each model's magnitude threshold,
reads the inputs chunk by chunk and keeps just the few entries near the
threshold; everything after it (delta, trim, weight, sign election, divisor,
lambda, base) is elementwise and runs chunk by chunk in buffers that stay in
L2.

Inputs may be in their stored dtype (bfloat16, float16): each chunk is upcast
as it is read, so a job never holds float32 copies of its inputs.  Every
element sees exactly the float32 operations of the whole-tensor path, in the
same order, so the result is bit-identical to it (tests check this).

Used for CPU tensors above ``SORT_LIMIT`` elements when the sparsifier is a
plain magnitude trim (TIES) or none (task arithmetic) and ``rescale`` is off,
and, with the kernels, for DARE (``Drop``: its counter-based mask is recomputed
per block from the element index, so no mask is stored; with ``rescale`` one
extra pass per model takes the L1 norms, in ``SUM_BLOCK`` partials as the
whole-tensor path does).

With numba (``_kernels``) each chunk is one fused loop.  Without it the chunks run
as torch calls, which is still clearly faster than the whole-tensor path at one
torch thread per job (the engine's default): TIES on one 4096x4096 bfloat16
tensor, 3 models, density 0.5, medians of A/B-interleaved rounds on a 2-core
machine loaded by other work (``benchmarks/chunked_fallback.py``): 0.40 s chunked
vs 1.18 s whole-tensor (7 rounds), 0.78 vs 2.03 s (9 rounds), 1.18 vs 3.16 s
(5 rounds, heavier load).  With 2 torch threads on that loaded machine the
chunked path was slower and erratic (6.7 vs 2.4 s): its many small calls each
pay a thread hand-off; not re-measured on an idle machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from . import _kernels, _reduce
from ._consensus import SignConsensus
from ._sizes import DELLA_BLOCK, RESCALE_CHUNK, SUM_BLOCK, TORCH_CHUNK
from ._sparsify import (
    _SAMPLE,
    Bracket,
    DropKey,
    _sort_key,
    bracket,
    check_della,
    dare_threshold,
    della_probs,
    rescale_factor,
    sample_bounds,
)


class Trim(NamedTuple):
    """One model's magnitude trim: keep ``|x| > threshold``, and ``|x| == threshold`` before ``cutoff``.

    The kept entries tied at the threshold are the lowest flat indices among
    the tied (``magnitude_``'s tie rule), so one position bound describes them.
    """

    threshold: float | None  # None: keep everything; inf: keep nothing
    cutoff: int = 0  # entries equal to the threshold at flat positions < cutoff are kept


class Drop(NamedTuple):
    """One model's DARE drop (``_sparsify.random_``): its density, key and whether the kept part is L1-rescaled."""

    density: float
    key: DropKey
    rescale: bool


def _spans(n: int):
    for a in range(0, n, TORCH_CHUNK):
        yield a, min(n, a + TORCH_CHUNK)


def _magnitude_bracket(t: torch.Tensor, base: torch.Tensor, k: int, cdt: torch.dtype) -> Bracket:
    """``_sparsify.bracket(|t - base|, k)`` without materializing ``|t - base|``.

    Same sample, same bounds, same answer; the counting and the gathering of
    the candidates inside the bracket run chunk by chunk.  When the bracket
    misses (chance below 1e-6) the magnitudes are materialized once.
    """
    tf, bf = t.reshape(-1), base.reshape(-1)
    n = tf.numel()
    sample, lo_i, hi_i = sample_bounds(n, k, lambda picks: (tf[picks].to(cdt) - bf[picks].to(cdt)).abs_(), t.device)
    if lo_i < 0 or hi_i >= _SAMPLE:  # the bracket touches an end: rare for a trim density
        return bracket((tf.to(cdt) - bf.to(cdt)).abs_(), k)
    below, idx, vals = _scan(tf, bf, sample[lo_i].item(), sample[hi_i].item(), n, cdt)
    if below >= k or below + idx.numel() < k:  # the sample missed: materialize once
        return bracket((tf.to(cdt) - bf.to(cdt)).abs_(), k)
    return Bracket(torch.kthvalue(vals, k - below).values, below, idx, vals)


def _scan(tf, bf, lo_f, hi_f, n, cdt):
    """Count ``|tf - bf| < lo``, gather positions and values in [lo, hi]; torch and numpy."""
    below = 0
    index, values = [], []
    buf = torch.empty(TORCH_CHUNK, dtype=cdt, device=tf.device)
    mask, upper = np.empty(TORCH_CHUNK, dtype=bool), np.empty(TORCH_CHUNK, dtype=bool)
    for a, b in _spans(n):
        # upcast before subtracting: bf16 - bf16 would round the difference to bf16
        m = buf[: b - a].copy_(bf[a:b])
        m = torch.sub(tf[a:b], m, out=m).abs_()
        # comparisons in numpy (same memory): torch's bool-producing kernels are ~8x slower here
        mn, bm, um = m.numpy(), mask[: b - a], upper[: b - a]
        below += int(np.count_nonzero(np.less(mn, lo_f, out=bm)))
        np.logical_and(np.greater_equal(mn, lo_f, out=bm), np.less_equal(mn, hi_f, out=um), out=bm)
        pos = np.flatnonzero(bm)
        if pos.size:
            values.append(torch.from_numpy(mn[pos]))
            index.append(torch.from_numpy(pos).add_(a))
    idx = torch.cat(index) if index else torch.empty(0, dtype=torch.long)
    vals = torch.cat(values) if values else torch.empty(0, dtype=cdt)
    return below, idx, vals


def bit_views(tensors):
    """Raw-bit numpy views for the kernels (uint16 of bf16 or uint32 of float32) and the shift to float32.

    Mixed or other dtypes (float16) are upcast to float32 first.
    """
    dts = {t.dtype for t in tensors}
    if dts == {torch.bfloat16}:
        return [t.reshape(-1).view(torch.int16).numpy().view(np.uint16) for t in tensors], 16
    ts = [t if t.dtype == torch.float32 else t.to(torch.float32) for t in tensors]
    return [t.reshape(-1).view(torch.int32).numpy().view(np.uint32) for t in ts], 0


def magnitude_trim(t: torch.Tensor, base: torch.Tensor, density: float, cdt: torch.dtype) -> Trim:
    """The trim ``_sparsify.magnitude_`` applies to ``t - base``, found chunk by chunk.

    Same count, same tie rule (lowest flat indices among magnitudes equal to
    the threshold), same result.
    """
    n = t.numel()
    if density >= 1:
        return Trim(None)
    if density <= 0:
        return Trim(math.inf)
    k = max(1, int(density * n))
    if k >= n:
        return Trim(None)
    if _kernels.AVAILABLE and cdt == torch.float32:
        # radix select over the raw bits: the k-th largest magnitude, its rank, its ties
        (x, b), shift = bit_views([t.contiguous(), base.contiguous()])
        bits, below, equal = _kernels.select(x, b, shift, n - k + 1)
        v = float(np.array([bits], dtype=np.uint32).view(np.float32)[0])
        return _trim_at(v, int(below), int(equal), n, k, lambda j: int(_kernels.nth_equal(x, b, shift, np.uint32(bits), j)))
    sel = _magnitude_bracket(t, base, n - k + 1, cdt)
    v = sel.value
    tied = sel.positions_equal(v) if float(v) != 0.0 else None
    return _trim_at(float(v), sel.count_below(v), 0 if tied is None else tied.numel(), n, k, lambda j: int(tied[j - 1]))


def _trim_at(v: float, below: int, equal: int, n: int, k: int, nth_equal) -> Trim:
    """The trim keeping the k largest of n magnitudes, the k-th being ``v``.

    ``below``/``equal``: how many magnitudes are smaller than / equal to v;
    ``nth_equal(j)``: flat position of the j-th (1-based) entry equal to v.
    """
    if v == 0.0:  # every non-zero entry is kept; dropping zeros changes nothing
        return Trim(None)
    at_or_above = n - below
    if at_or_above == k:  # every entry equal to v is kept
        return Trim(v, n)
    keep = k - (at_or_above - equal)  # how many of the tied are kept (the first ones)
    return Trim(v, nth_equal(keep) + 1 if keep > 0 else 0)


def merge_chunked(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weights: Sequence[float],
    trims: Sequence[Trim] | None,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    cdt: torch.dtype,
    count_cancelled: bool = False,
    drops: Sequence[Drop] | None = None,
    windows: Sequence[Crumbs | None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Steps 1-5 of ``task_arithmetic.merge_task_vectors`` chunk by chunk.

    ``drops`` (DARE) or ``windows`` (Breadcrumbs; None for an untouched model),
    one per model instead of ``trims``, need the kernels (``_kernels.AVAILABLE``)
    and float32 arithmetic; the caller checks.

    Returns:
        A new ``cdt`` tensor, and (with ``count_cancelled``, or on the kernel
        path always) how many elements had a zero divisor but a non-zero sum
        under sign consensus with ``normalize``.  Plain sums divide by the
        weights' sum unconditionally: the caller refuses a zero sum.
    """
    if drops is not None or windows is not None or (_kernels.AVAILABLE and cdt == torch.float32):
        return _merge_kernel(tensors, base, weights, trims, consensus, normalize, lambda_, drops, windows)
    n = base.numel()
    out = torch.empty(base.shape, dtype=cdt, device=base.device)
    of, bf = out.reshape(-1), base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    dev = base.device

    def buf() -> torch.Tensor:
        return torch.empty(TORCH_CHUNK, dtype=cdt, device=dev)

    b32, delta, kept, side = buf(), buf(), buf(), buf()
    votes, pos, neg = buf(), buf(), buf()
    pos_w, neg_w = (buf(), buf()) if normalize else (None, None)
    total = float(torch.tensor(list(weights), dtype=cdt).sum()) if (normalize and not consensus) else None
    cancelled = 0
    for a, b in _spans(n):
        m = b - a
        bc = b32[:m].copy_(bf[a:b])
        acc = votes[:m].zero_()
        if consensus:
            p, ng = pos[:m].zero_(), neg[:m].zero_()
            if normalize:
                pw, nw = pos_w[:m].zero_(), neg_w[:m].zero_()
        for i, tf in enumerate(flats):
            d = torch.sub(tf[a:b], bc, out=delta[:m])
            trim = trims[i] if trims is not None else None
            if trim is not None and trim.threshold is not None:
                if math.isinf(trim.threshold):
                    d = d.zero_()
                else:
                    k = torch.ops.aten.hardshrink.out(d, trim.threshold, out=kept[:m])
                    if trim.cutoff > a:  # entries equal to the threshold before the cutoff stay
                        seg = d.numpy()[: min(m, trim.cutoff - a)]
                        eq = np.flatnonzero(np.abs(seg) == np.float32(trim.threshold))
                        k.numpy()[eq] = seg[eq]
                    d = k
            d.mul_(weights[i])
            if consensus:
                acc.add_(d)
                s = torch.clamp(d, min=0, out=side[:m])
                p.add_(s)
                if normalize:
                    pw.add_(s.sign_(), alpha=weights[i])
                d.clamp_(max=0)
                ng.add_(d)
                if normalize:
                    nw.sub_(d.sign_(), alpha=weights[i])
            else:
                acc.add_(d)
        if consensus:
            # where(votes >= 0, pos, neg) without bool tensors (slow kernels here), same bits:
            # e = 1 where votes >= 0 (-0 included) else 0; pos*1 + neg*0 == pos and pos*0 + neg*1 == neg
            # (pos >= +0 and neg <= +0 are never -0, and both are finite where the result is).
            e = torch.sign(acc, out=acc).add_(1).clamp_(max=1)
            ne = side[:m].copy_(e).neg_().add_(1)
            merged = p.mul_(e).add_(ng.mul_(ne))
            if normalize:
                div = pw.mul_(e).add_(nw.mul_(ne))
                zero = torch.abs(div, out=ng).sign_().neg_().add_(1)  # 1 where the divisor is 0
                if count_cancelled:
                    cancelled += int(torch.count_nonzero(torch.mul(zero, merged, out=kept[:m])))
                merged.div_(div.add_(zero))
        else:
            merged = acc
            if normalize:
                merged.div_(total)
        if lambda_ != 1:
            merged.mul_(lambda_)
        torch.add(merged, bc, out=of[a:b])
    return out, cancelled


class Window(NamedTuple):
    """One model's Breadcrumbs window: keep ``lo <= |x| <= hi``, minus the ties at either bound beyond the window.

    Entries equal to ``lo`` at flat positions below ``lo_cut``, and equal to
    ``hi`` at positions from ``hi_cut`` on, are dropped (``_sparsify.breadcrumbs_``'s
    tie rule: a stable ascending order, ties by flat index).
    """

    lo: float
    lo_cut: int
    hi: float
    hi_cut: int


def breadcrumbs_window(t: torch.Tensor, base: torch.Tensor, density: float, gamma: float) -> Window | None:
    """The window ``_sparsify.breadcrumbs_`` keeps of ``t - base`` (float32, kernels), or None: keep nothing.

    Both bounds come from one two-rank radix select (``_kernels.select2``); the
    tie cutoffs from ``nth_equal`` when ties straddle a bound.
    """
    n = t.numel()
    target, n_top = int(density * n), int(gamma * n)
    start = max(0, n - target - n_top)
    stop = start + target
    if target <= 0:
        return None
    (x, b), shift = bit_views([t.contiguous(), base.contiguous()])
    k_lo = start + 1 if start > 0 else 1
    k_hi = stop if stop < n else n
    sel = _kernels.select2(x, b, shift, k_lo, k_hi)

    def value(bits) -> float:
        return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])

    lo, lo_cut = 0.0, 0
    if start > 0:
        bits, below, _ = (int(v) for v in sel[0])
        if value(bits) != 0.0:
            lo = value(bits)
            surplus = start - below  # entries equal to lo that fall below the window: the lowest positions
            if surplus > 0:
                lo_cut = int(_kernels.nth_equal(x, b, shift, np.uint32(bits), surplus)) + 1
    hi, hi_cut = math.inf, n
    if stop < n:
        bits, below, equal = (int(v) for v in sel[1])
        hi = value(bits)
        surplus = below + equal - stop  # entries equal to hi beyond the window: the highest positions
        if hi != 0.0 and surplus > 0:
            hi_cut = int(_kernels.nth_equal(x, b, shift, np.uint32(bits), equal - surplus + 1))
    return Window(lo, lo_cut, hi, hi_cut)


class Crumbs(NamedTuple):
    """One model's Breadcrumbs trim for ``merge_chunked``: its window (None: nothing kept) and whether it is L1-rescaled."""

    window: Window | None
    rescale: bool


class _Params(NamedTuple):
    """The kernels' per-model trim parameters (see ``_kernels._trim_one``)."""

    mode: np.ndarray
    fpar: np.ndarray
    ipar: np.ndarray
    keys: np.ndarray
    scale: np.ndarray

    @classmethod
    def empty(cls, k: int) -> _Params:
        return cls(
            np.full(k, _kernels.KEEP_ALL, dtype=np.int8),
            np.zeros((k, 2), dtype=np.float32),
            np.zeros((k, 2), dtype=np.int64),
            np.zeros((k, 2), dtype=np.uint32),
            np.ones(k, dtype=np.float32),
        )

    def row(self, i: int) -> tuple:
        return (self.mode[i], self.fpar[i, 0], self.fpar[i, 1], self.ipar[i, 0], self.ipar[i, 1], self.keys[i, 0], self.keys[i, 1])


def _l1_scale(fill, n: int) -> float:
    """The L1 rescale factor (``_sparsify.rescale_factor``) of one model's trimmed delta; 1.0 when it is skipped.

    ``fill(a, m, d, kept)`` writes the delta over ``[a, a+m)`` and its trimmed
    part into float32 numpy arrays (a kernel).  They are made ``RESCALE_CHUNK``
    elements at a time and their L1 norms taken as the same per-block partials
    as ``_reduce.norm`` (the chunks start at multiples of ``SUM_BLOCK``), so the
    factor has the whole-tensor path's bits.
    """
    d = torch.empty(min(n, RESCALE_CHUNK), dtype=torch.float32)
    kept = torch.empty_like(d)
    before, after = [], []
    for a in range(0, n, RESCALE_CHUNK):
        m = min(RESCALE_CHUNK, n - a)
        fill(a, m, d.numpy(), kept.numpy())
        before += _reduce.l1_partials(d[:m])
        after += _reduce.l1_partials(kept[:m])
    q = rescale_factor(_reduce.scalar(math.fsum(before), d), _reduce.scalar(math.fsum(after), d))
    return 1.0 if q is None else float(q)


def _merge_kernel(tensors, base, weights, trims, consensus, normalize, lambda_, drops=None, windows=None) -> tuple[torch.Tensor, int]:
    """``merge_chunked`` with the fused kernel: one pass over the inputs for all models (plus one per rescaled model)."""
    k = len(tensors)
    n = base.numel()
    views, shift = bit_views([t.contiguous() for t in (*tensors, base)])
    p = _Params.empty(k)
    rescaled = []
    for i, tr in enumerate(trims or []):
        if tr is None or tr.threshold is None:
            continue
        if math.isinf(tr.threshold):
            p.mode[i] = _kernels.DROP_ALL
        else:
            p.mode[i], p.fpar[i, 0], p.ipar[i, 0] = _kernels.THRESHOLD, tr.threshold, tr.cutoff
    for i, dr in enumerate(drops or []):
        if dr.density >= 1:
            continue
        if dr.density <= 0:  # random_ zeroes the delta (the rescale then finds nothing kept)
            p.mode[i] = _kernels.DROP_ALL
            continue
        p.mode[i], p.keys[i], p.ipar[i, 0] = _kernels.RANDOM, dr.key, dare_threshold(dr.density)
        if dr.rescale:
            rescaled.append(i)
    for i, cr in enumerate(windows or []):
        if cr is None:  # density 1: untouched
            continue
        if cr.window is None:
            p.mode[i] = _kernels.DROP_ALL
            continue
        wd = cr.window
        p.mode[i], p.fpar[i], p.ipar[i] = _kernels.WINDOW, (wd.lo, wd.hi), (wd.lo_cut, wd.hi_cut)
        if cr.rescale:
            rescaled.append(i)
    for i in rescaled:
        trim = p.row(i)
        p.scale[i] = _l1_scale(lambda a, m, d, kept: _kernels.kept_block(views[i], views[k], shift, *trim, a, m, d, kept), n)
    return _run_gta(views, shift, base.shape, p, np.zeros((k, 0), dtype=np.uint8), weights, consensus, normalize, lambda_)


def _run_gta(views, shift, shape, p: _Params, masks, weights, consensus, normalize, lambda_) -> tuple[torch.Tensor, int]:
    """``_kernels.gta`` over the models' and base's bit views (``_bits``, base last): a new float32 tensor and the cancelled count."""
    k = len(views) - 1
    out = torch.empty(shape, dtype=torch.float32)
    w = np.asarray(weights, dtype=np.float32)
    total = np.float32(w.sum(dtype=np.float32)) if (normalize and not consensus) else np.float32(1)
    cancelled = _kernels.gta(
        tuple(views[:k]),
        views[k],
        shift,
        p.mode,
        p.fpar,
        p.ipar,
        p.keys,
        p.scale,
        masks,
        w,
        consensus,
        normalize,
        total,
        np.float32(lambda_),
        out.reshape(-1).numpy(),
    )
    return out, int(cancelled)


# --------------------------------------------------------------------------- DELLA by row blocks


class _L1Stream:
    """``_reduce.norm(x, 1)`` of a flat tensor fed in pieces of any length, with the whole tensor's bits.

    Elements are regrouped into the ``SUM_BLOCK`` rows ``_reduce`` reduces (a
    carry of fewer than ``SUM_BLOCK`` elements waits for the next piece), and
    the last partial is the ragged tail's, as in ``_reduce.l1_partials``.
    """

    def __init__(self, dtype: torch.dtype):
        self.parts: list[float] = []
        self.carry = torch.empty(0, dtype=dtype)

    def add(self, piece: torch.Tensor) -> None:
        flat = torch.cat([self.carry, piece.reshape(-1)]) if self.carry.numel() else piece.reshape(-1)
        whole = flat.numel() // SUM_BLOCK * SUM_BLOCK
        if whole:
            self.parts += torch.linalg.vector_norm(flat[:whole].view(-1, SUM_BLOCK), 1, dim=1).tolist()
        self.carry = flat[whole:].clone()

    def total(self) -> torch.Tensor:
        tail = float(torch.linalg.vector_norm(self.carry, 1, dim=0))
        return _reduce.scalar(math.fsum(self.parts + [tail]), self.carry)


def _row_spans(rows: int, cols: int):
    step = max(1, DELLA_BLOCK // max(1, cols))
    for r in range(0, rows, step):
        yield r, min(rows, r + step)


def _della_drop(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """``_sparsify.della_``'s drop mask for a block of whole rows, drawing its uniforms from ``generator``.

    Same sort key, same stable argsort per row, same probabilities, and the
    block's uniforms are the next ``delta.numel()`` draws of the stream (torch
    fills a CPU tensor serially), so concatenated blocks give the whole tensor's mask.
    """
    ncols = delta.shape[1]
    mags = torch.abs(delta)
    order = torch.argsort(_sort_key(mags), dim=1, stable=True)
    probs = della_probs(ncols, density, epsilon, delta.device, delta.dtype)
    drop_sorted = mags.uniform_(0, 1, generator=generator) >= probs
    return torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)


def della_chunked(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    della: Sequence[tuple[float, float]],
    rescale: bool,
    generator: torch.Generator,
    weights: Sequence[float],
    consensus: bool,
    normalize: bool,
    lambda_: float,
    cdt: torch.dtype,
    count_cancelled: bool = False,
) -> tuple[torch.Tensor, int]:
    """``task_arithmetic._merge_whole`` with ``_sparsify.della_`` on a 2-D tensor, one block of rows at a time.

    Pass 1 (model by model, in model order, as the whole-tensor path draws):
    each model's drop mask, packed to one bit per element, and the L1 norms of
    its delta before and after the drop.  Pass 2 (block by block): every
    model's dropped, rescaled, weighted delta and the sign election or sum, all
    elementwise, so each element sees the whole-tensor path's operations.
    Working memory: a few row blocks plus the packed masks (n/8 bytes per model).

    With the kernels and float32 arithmetic, pass 1 ranks each row with a radix
    sort (``_kernels.della_rows``; torch still draws the uniforms) and pass 2 is
    the fused ``_kernels.gta``: the same bits, several times faster.
    """
    if _kernels.AVAILABLE and cdt == torch.float32:
        return _della_kernel(tensors, base, della, rescale, generator, weights, consensus, normalize, lambda_)
    return _della_torch(tensors, base, della, rescale, generator, weights, consensus, normalize, lambda_, cdt, count_cancelled)


def _della_torch(tensors, base, della, rescale, generator, weights, consensus, normalize, lambda_, cdt, count_cancelled):
    """``della_chunked`` in torch calls (no numba, or float64)."""
    rows, cols = base.shape
    spans = list(_row_spans(rows, cols))
    masks: list[list[np.ndarray] | None] = []
    scale: list[torch.Tensor | None] = []
    for t, (dens, eps) in zip(tensors, della):
        if dens >= 1 or dens <= 0:  # della_ draws nothing: untouched, or zero
            masks.append(None)
            scale.append(None)
            continue
        check_della(dens, eps)
        packed = []
        before, after = (_L1Stream(cdt), _L1Stream(cdt)) if rescale else (None, None)
        for r0, r1 in spans:
            d = t[r0:r1].to(cdt) - base[r0:r1].to(cdt)
            drop = _della_drop(d, dens, eps, generator)
            packed.append(np.packbits(drop.numpy().reshape(-1)))
            if rescale:
                before.add(d)
                after.add(d.masked_fill_(drop, 0))
        masks.append(packed)
        scale.append(rescale_factor(before.total(), after.total()) if rescale else None)
    out = torch.empty(base.shape, dtype=cdt)
    total = torch.tensor(list(weights), dtype=cdt).sum().item() if (normalize and not consensus) else None
    cancelled = 0
    for s, (r0, r1) in enumerate(spans):
        b = base[r0:r1].to(cdt)
        acc = SignConsensus(b, track_weights=normalize) if consensus else torch.zeros_like(b)
        for i, t in enumerate(tensors):
            d = t[r0:r1].to(cdt) - b
            dens = della[i][0]
            if dens <= 0:
                d.zero_()
            elif masks[i] is not None:
                bits = np.unpackbits(masks[i][s], count=d.numel())
                d.masked_fill_(torch.from_numpy(bits).view(torch.bool).view(d.shape), 0)
                if scale[i] is not None:
                    d.mul_(scale[i])
            d.mul_(weights[i])
            if consensus:
                acc.add(d, weights[i])
            else:
                acc.add_(d)
        if consensus:
            merged = acc.result(divisor=normalize, count_cancelled=count_cancelled)
            cancelled += acc.cancelled
        else:
            merged = acc
            if normalize:
                merged.div_(total)
        if lambda_ != 1:
            merged.mul_(lambda_)
        torch.add(merged, b, out=out[r0:r1])
    return out, cancelled


def _della_kernel(tensors, base, della, rescale, generator, weights, consensus, normalize, lambda_) -> tuple[torch.Tensor, int]:
    """``della_chunked`` with the kernels: each model's drop bits row block by row block, then one fused merge pass."""
    rows, cols = base.shape
    n = base.numel()
    k = len(tensors)
    views, shift = bit_views([t.contiguous() for t in (*tensors, base)])
    spans = list(_row_spans(rows, cols))
    uniforms = torch.empty(max(r1 - r0 for r0, r1 in spans) * cols, dtype=torch.float32)
    masks = np.zeros((k, (n + 7) // 8), dtype=np.uint8)
    p = _Params.empty(k)
    for i, (dens, eps) in enumerate(della):
        if dens >= 1:  # della_ draws nothing: untouched, or zero
            continue
        if dens <= 0:
            p.mode[i] = _kernels.DROP_ALL
            continue
        check_della(dens, eps)
        probs = della_probs(cols, dens, eps, base.device, torch.float32).reshape(-1).numpy()
        for r0, r1 in spans:
            u = uniforms[: (r1 - r0) * cols].uniform_(0, 1, generator=generator)  # the stream della_ draws, in order
            _kernels.della_rows(views[i], views[k], shift, cols, r0, r1, u.numpy(), probs, masks[i])
        p.mode[i] = _kernels.MASKED
        if rescale:
            p.scale[i] = _l1_scale(lambda a, m, d, kept: _kernels.masked_block(views[i], views[k], shift, masks[i], a, m, d, kept), n)
    del uniforms
    return _run_gta(views, shift, base.shape, p, masks, weights, consensus, normalize, lambda_)
