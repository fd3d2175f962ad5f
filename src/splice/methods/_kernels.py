"""Fused per-chunk loops for ``_chunked``, compiled with numba when it is installed.

Each kernel does in one pass over a chunk what the torch version in
``_chunked`` does in a dozen, with the same float32 operations in the same
order, so results are bit-identical (tests compare the two).  Kernels release
the GIL, so the engine's worker threads run them on every core at once.

``AVAILABLE`` is False when numba is missing; ``_chunked`` then runs its torch
code.  Compiled code is cached where numba finds a writable place (beside this
file, or the user's cache folder); when there is none (a read-only install and
no writable home), in a private folder under the temporary directory, or, if
that is not possible either, not at all (compiled again in each process), with
one warning line on stderr.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile

import numpy as np

from ._sizes import KERNEL_BLOCK, RANK_DIGIT_BITS

try:  # pragma: no cover - exercised by whichever path the environment has
    import numba

    AVAILABLE = True
except ImportError:  # pragma: no cover
    numba = None
    AVAILABLE = False

# Trim modes per model, and what each reads from the per-model parameters (``_trim_one``):
# THRESHOLD (TIES): f0 = threshold, i0 = tie cutoff; RANDOM (DARE): keys, i0 = rank bound;
# WINDOW (Breadcrumbs): f0/i0 = lower bound and its tie cutoff, f1/i1 = upper bound and its;
# MASKED (DELLA): the model's row of ``masks`` (``_della_rows``'s drop bits) says which entries go.
KEEP_ALL, THRESHOLD, DROP_ALL, RANDOM, WINDOW, MASKED = 0, 1, 2, 3, 4, 5


def _load_block(src, a, m, sh, dst):
    """Bits of ``src[a:a+m]`` (uint16 bf16 or uint32 float32) into ``dst`` as float32 bits.

    The element loop indexes the slice with the bare loop variable: an ``a + j``
    index carries a negative-index check that stops LLVM from vectorizing.
    """
    sa = src[a : a + m]
    for j in range(m):
        dst[j] = np.uint32(sa[j]) << sh


def _block_magnitudes(x, b, a, m, sh, xu, bu, mf):
    """``mf[:m] = |x - b|`` over ``[a, a+m)`` as float32 (``xu``/``bu``: float32-bit scratch)."""
    _load_block(x, a, m, sh, xu)
    _load_block(b, a, m, sh, bu)
    xf = xu.view(np.float32)
    bf = bu.view(np.float32)
    for j in range(m):
        mf[j] = abs(xf[j] - bf[j])


def _mix32(x):
    """``_sparsify._mix32`` on a uint32: the products are taken in uint64 and cut to 32 bits."""
    m32 = np.uint64(0xFFFFFFFF)
    x = x ^ (x >> np.uint32(16))
    x = np.uint32((np.uint64(x) * np.uint64(0x7FEB352D)) & m32)
    x = x ^ (x >> np.uint32(15))
    x = np.uint32((np.uint64(x) * np.uint64(0x846CA68B)) & m32)
    return x ^ (x >> np.uint32(16))


def _dare_rank(j, ka, kb):
    """``_sparsify.dare_ranks`` of flat index ``j`` (int64) under the key (ka, kb) (uint32s)."""
    lo = np.uint32(j & 0xFFFFFFFF)
    hi = np.uint32(j >> 32)
    h = _mix32(lo ^ ka)
    h = _mix32(h ^ hi ^ kb)
    return np.int64(h >> np.uint32(8))


def _trim_one(d, jg, md, f0, f1, i0, i1, k0, k1):
    """Model's trim of the delta ``d`` at flat position ``jg``: ``d`` or +0 (or ``d`` untouched for KEEP_ALL).

    THRESHOLD: drop ``|d| <= f0`` (torch's hardshrink) except ``|d| == f0`` before
    ``i0``.  RANDOM: keep where ``_dare_rank(jg, k0, k1) < i0``.  WINDOW: keep
    ``f0 <= |d| <= f1``, except ``|d| == f0`` before ``i0`` and ``|d| == f1`` from ``i1`` on.
    """
    zero = np.float32(0.0)
    if md == DROP_ALL:
        return zero
    if md == THRESHOLD:
        ad = abs(d)
        drop = (ad <= f0) & ~((ad == f0) & (jg < i0))
        return zero if drop else d
    if md == RANDOM:
        return d if _dare_rank(jg, k0, k1) < i0 else zero
    if md == WINDOW:
        ad = abs(d)
        keep = (ad >= f0) & ~((ad == f0) & (jg < i0)) & (ad <= f1) & ~((ad == f1) & (jg >= i1))
        return d if keep else zero
    return d


def _kept_block(x, b, shift, md, f0, f1, i0, i1, k0, k1, a, m, dout, kout):
    """Over ``[a, a+m)``: ``dout = x - b`` and ``kout`` = its trimmed part (``_trim_one``), float32."""
    sh = np.uint32(shift)
    xu = np.empty(m, np.uint32)
    bu = np.empty(m, np.uint32)
    _load_block(x, a, m, sh, xu)
    _load_block(b, a, m, sh, bu)
    xf = xu.view(np.float32)
    bf = bu.view(np.float32)
    for j in range(m):
        d = xf[j] - bf[j]
        dout[j] = d
        kout[j] = _trim_one(d, a + j, md, f0, f1, i0, i1, k0, k1)


def _bit(bits, f):
    """Whether flat position ``f`` is set in ``bits`` (``np.packbits`` order: the first position is a byte's top bit)."""
    return (bits[f >> 3] >> (7 - (f & 7))) & 1


def _unpack_block(bits, a, m, flags):
    """``flags[:m]`` = the bits of positions ``[a, a+m)`` as uint8 0 / 1; whole bytes eight at a time when ``a`` is a multiple of 8.

    The element loops that read ``flags`` then vectorize, which per-element bit
    extraction (``_bit``) keeps them from doing.
    """
    j = 0
    if (a & 7) == 0:
        base = a >> 3
        while j + 8 <= m:
            v = bits[base + (j >> 3)]
            for t in range(8):
                flags[j + t] = (v >> (7 - t)) & 1
            j += 8
    while j < m:
        flags[j] = _bit(bits, a + j)
        j += 1


def _della_rows(x, b, shift, cols, r0, r1, u, probs, bits):
    """DELLA's drop bits for rows ``r0 .. r1-1`` of ``|x - b|`` (flat, ``cols`` a row), set in ``bits``.

    ``_sparsify.della_``'s rule, row by row: the element of stable ascending
    magnitude rank ``s`` is dropped iff ``u[(row - r0) * cols + s] >= probs[s]``
    (``u``: the rows' uniforms in order, ``probs``: keep probability by rank).
    The stable order is an LSD radix sort of the magnitudes' float32 bits (which
    order like the values), over only the bits that vary within the row, in
    equal digits of at most ``RANK_DIGIT_BITS``: fine-tune deltas vary in about
    22 bits, two counting passes, where a comparison sort takes ``log2(cols)``
    (a torch argsort of int32 keys took about 5x as long).  Each entry moves as
    one uint64, the varying key bits above the column index.  Bits of dropped
    positions are set (``np.packbits`` order); the rest are left as they are
    (the caller passes zeros).
    """
    sh = np.uint32(shift)
    xu = np.empty(cols, np.uint32)
    bu = np.empty(cols, np.uint32)
    ka = np.empty(cols, np.uint32)
    mf = ka.view(np.float32)
    src = np.empty(cols, np.uint64)
    dst = np.empty(cols, np.uint64)
    hist = np.empty((3, 1 << RANK_DIGIT_BITS), np.int32)  # 32 varying bits at most: 3 digits
    index_bits = 1
    while (1 << index_bits) < cols:
        index_bits += 1
    index_mask = np.uint64((1 << index_bits) - 1)
    widths = np.zeros(3, np.int64)
    shifts = np.zeros(3, np.uint64)
    masks = np.zeros(3, np.uint64)
    for r in range(r0, r1):
        a = r * cols
        _block_magnitudes(x, b, a, cols, sh, xu, bu, mf)
        first = ka[0]
        varying = np.uint32(0)
        for j in range(cols):
            varying |= ka[j] ^ first
        lo = 0
        passes = 0
        if varying != 0:
            while not (varying >> np.uint32(lo)) & np.uint32(1):
                lo += 1
            hi = 31
            while not (varying >> np.uint32(hi)) & np.uint32(1):
                hi -= 1
            span = hi - lo + 1
            passes = (span + RANK_DIGIT_BITS - 1) // RANK_DIGIT_BITS
            at_bit = index_bits
            for p in range(passes):
                widths[p] = span // passes + (1 if p < span % passes else 0)
                shifts[p] = np.uint64(at_bit)
                masks[p] = np.uint64((1 << widths[p]) - 1)
                at_bit += widths[p]
                hist[p, : 1 << widths[p]] = 0
        ulo = np.uint32(lo)
        ib = np.uint64(index_bits)
        if passes == 3:  # every digit's histogram in the one pass that packs the entries
            for j in range(cols):
                v = (np.uint64(ka[j] >> ulo) << ib) | np.uint64(j)
                src[j] = v
                hist[0, (v >> shifts[0]) & masks[0]] += 1
                hist[1, (v >> shifts[1]) & masks[1]] += 1
                hist[2, (v >> shifts[2]) & masks[2]] += 1
        elif passes == 2:
            for j in range(cols):
                v = (np.uint64(ka[j] >> ulo) << ib) | np.uint64(j)
                src[j] = v
                hist[0, (v >> shifts[0]) & masks[0]] += 1
                hist[1, (v >> shifts[1]) & masks[1]] += 1
        else:
            for j in range(cols):
                v = (np.uint64(ka[j] >> ulo) << ib) | np.uint64(j)
                src[j] = v
                if passes == 1:
                    hist[0, (v >> shifts[0]) & masks[0]] += 1
        for p in range(passes):
            h = hist[p]
            start = 0
            for v in range(1 << widths[p]):
                c = h[v]
                h[v] = start
                start += c
            su = shifts[p]
            mask = masks[p]
            for j in range(cols):  # stable: equal digits keep their order
                v = src[j]
                d = (v >> su) & mask
                at = h[d]
                h[d] = at + 1
                dst[at] = v
            src, dst = dst, src
        ua = (r - r0) * cols
        for t in range(cols):  # the drop flags, at the elements' own columns (xu is free again)
            xu[np.int64(src[t] & index_mask)] = np.uint32(u[ua + t] >= probs[t])
        # packed without branches (the flags are coin flips): partial bytes at the row's ends, whole bytes between
        f = a
        j = 0
        while j < cols and (f & 7) != 0:
            bits[f >> 3] |= np.uint8(xu[j] << np.uint32(7 - (f & 7)))
            j += 1
            f += 1
        while j + 8 <= cols:
            v = (xu[j] << np.uint32(7)) | (xu[j + 1] << np.uint32(6)) | (xu[j + 2] << np.uint32(5)) | (xu[j + 3] << np.uint32(4))
            v |= (xu[j + 4] << np.uint32(3)) | (xu[j + 5] << np.uint32(2)) | (xu[j + 6] << np.uint32(1)) | xu[j + 7]
            bits[f >> 3] = np.uint8(v)
            j += 8
            f += 8
        while j < cols:
            bits[f >> 3] |= np.uint8(xu[j] << np.uint32(7 - (f & 7)))
            j += 1
            f += 1


def _masked_block(x, b, shift, bits, a, m, dout, kout):
    """Over ``[a, a+m)``: ``dout = x - b`` and ``kout`` = it with the positions set in ``bits`` zeroed (+0), float32."""
    sh = np.uint32(shift)
    xu = np.empty(m, np.uint32)
    bu = np.empty(m, np.uint32)
    _load_block(x, a, m, sh, xu)
    _load_block(b, a, m, sh, bu)
    xf = xu.view(np.float32)
    bf = bu.view(np.float32)
    flags = np.empty(m, np.uint8)
    _unpack_block(bits, a, m, flags)
    for j in range(m):
        d = xf[j] - bf[j]
        dout[j] = d
        kout[j] = np.float32(0.0) if flags[j] else d


def _select2(x, b, shift, k1, k2):
    """``_select`` for two ranks at once (k1 <= k2): one histogram pass shared, one pass for both buckets.

    Returns (bits, below, equal) of the k1-th and then of the k2-th smallest.
    """
    n = b.shape[0]
    sh = np.uint32(shift)
    xu = np.empty(KERNEL_BLOCK, np.uint32)
    bu = np.empty(KERNEL_BLOCK, np.uint32)
    mu = np.empty(KERNEL_BLOCK, np.uint32)
    mf = mu.view(np.float32)
    h4 = np.zeros((4, (1 << 16) + 1), np.int32)
    for a in range(0, n, KERNEL_BLOCK):
        m = min(KERNEL_BLOCK, n - a)
        _block_magnitudes(x, b, a, m, sh, xu, bu, mf)
        for j in range(m):
            h4[j & 3, mu[j] >> np.uint32(16)] += 1
    hi = h4[0].astype(np.int64) + h4[1] + h4[2] + h4[3]
    tops = np.zeros(2, np.int64)
    belows = np.zeros(2, np.int64)
    ks = (k1, k2)
    for r in range(2):
        below = 0
        top = 0
        for top in range(1 << 16):
            if below + hi[top] >= ks[r]:
                break
            below += hi[top]
        tops[r] = top
        belows[r] = below
    ha = np.zeros((4, (1 << 16) + 1), np.int32)
    hb = np.zeros((4, (1 << 16) + 1), np.int32)
    t1 = np.uint32(tops[0])
    t2 = np.uint32(tops[1])
    for a in range(0, n, KERNEL_BLOCK):
        m = min(KERNEL_BLOCK, n - a)
        _block_magnitudes(x, b, a, m, sh, xu, bu, mf)
        for j in range(m):
            u = mu[j]
            top = u >> np.uint32(16)
            low = u & np.uint32(0xFFFF)
            ha[j & 3, low if top == t1 else np.uint32(1 << 16)] += 1
            hb[j & 3, low if top == t2 else np.uint32(1 << 16)] += 1
    out = np.zeros((2, 3), np.int64)
    for r in range(2):
        h = ha if r == 0 else hb
        lo = h[0].astype(np.int64) + h[1] + h[2] + h[3]
        below = belows[r]
        low = 0
        for low in range(1 << 16):
            if below + lo[low] >= ks[r]:
                break
            below += lo[low]
        out[r, 0] = (tops[r] << 16) | low
        out[r, 1] = below
        out[r, 2] = lo[low]
    return out


def _select(x, b, shift, k):
    """The k-th smallest (1-based) of ``|x - b|`` over whole flat tensors, by a two-level radix select.

    Non-negative float32 values order like their bit patterns, so a histogram
    of the top 16 bits finds the bucket holding the k-th value and a second
    histogram of the low 16 bits inside that bucket finds the value itself.
    Two passes, no sorting, exact, and indifferent to ties (bf16 deltas have
    few distinct magnitudes, which defeats sampling-based brackets).  Returns
    (the value's bits, how many are smaller, how many are equal).

    ``x``, ``b``: the raw bits of float32 (uint32, ``shift`` 0) or bfloat16
    (uint16, ``shift`` 16) tensors, flat.
    """
    n = b.shape[0]
    sh = np.uint32(shift)
    xu = np.empty(KERNEL_BLOCK, np.uint32)
    bu = np.empty(KERNEL_BLOCK, np.uint32)
    mu = np.empty(KERNEL_BLOCK, np.uint32)
    mf = mu.view(np.float32)
    # four interleaved histograms: runs of equal values (common in bf16 deltas) would
    # otherwise chain every increment on the previous one
    # int32 counts keep all four in L2 (callers pass tensors of fewer than 2**31 elements)
    h4 = np.zeros((4, (1 << 16) + 1), np.int32)  # + a spill bin for the second pass
    for a in range(0, n, KERNEL_BLOCK):
        m = min(KERNEL_BLOCK, n - a)
        _block_magnitudes(x, b, a, m, sh, xu, bu, mf)
        j = 0
        while j + 4 <= m:
            h4[0, mu[j] >> np.uint32(16)] += 1
            h4[1, mu[j + 1] >> np.uint32(16)] += 1
            h4[2, mu[j + 2] >> np.uint32(16)] += 1
            h4[3, mu[j + 3] >> np.uint32(16)] += 1
            j += 4
        while j < m:
            h4[0, mu[j] >> np.uint32(16)] += 1
            j += 1
    hi = h4[0].astype(np.int64) + h4[1] + h4[2] + h4[3]
    h4[:] = 0
    below = 0
    top = 0
    for top in range(1 << 16):
        if below + hi[top] >= k:
            break
        below += hi[top]
    for a in range(0, n, KERNEL_BLOCK):
        m = min(KERNEL_BLOCK, n - a)
        _block_magnitudes(x, b, a, m, sh, xu, bu, mf)
        for j in range(m):  # branch-free: entries outside the bucket go to the spill bin
            u = mu[j]
            h4[j & 3, (u & np.uint32(0xFFFF)) if (u >> np.uint32(16)) == top else np.uint32(1 << 16)] += 1
    lo = h4[0].astype(np.int64) + h4[1] + h4[2] + h4[3]
    low = 0
    for low in range(1 << 16):
        if below + lo[low] >= k:
            break
        below += lo[low]
    return (np.uint32(top) << np.uint32(16)) | np.uint32(low), below, lo[low]


def _nth_equal(x, b, shift, value_bits, count):
    """Flat position of the ``count``-th (1-based) entry whose ``|x - b|`` has bits ``value_bits``; -1 if none."""
    n = b.shape[0]
    sh = np.uint32(shift)
    xu = np.empty(KERNEL_BLOCK, np.uint32)
    bu = np.empty(KERNEL_BLOCK, np.uint32)
    mu = np.empty(KERNEL_BLOCK, np.uint32)
    mf = mu.view(np.float32)
    seen = 0
    for a in range(0, n, KERNEL_BLOCK):
        m = min(KERNEL_BLOCK, n - a)
        _block_magnitudes(x, b, a, m, sh, xu, bu, mf)
        hits = 0
        for j in range(m):
            hits += mu[j] == value_bits
        if seen + hits < count:
            seen += hits
            continue
        for j in range(m):
            if mu[j] == value_bits:
                seen += 1
                if seen == count:
                    return a + j
    return -1


def _gta(xs, b, shift, mode, fpar, ipar, keys, scale, masks, w, consensus, normalize, total, lam, out):
    """Steps 1-5 of ``_task_vectors`` over whole flat tensors of K models (``xs``, a tuple).

    ``xs``, ``b``: raw bits as in ``_select``.  Trim of model i (``mode[i]``):
    keep all; keep ``|d| > thr`` (torch's hardshrink: not ``-thr <= d <= thr``)
    and ``|d| == thr`` at flat positions below ``cutoff[i]``; drop the positions set in
    ``masks[i]`` (packed bits); or drop all.  Then
    ``d *= w[i]`` and either a TIES sign election (``consensus``) or a plain
    sum; ``normalize`` divides by the agreeing weights (a zero divisor counts
    as 1) or by ``total`` (the caller refuses a zero sum); ``lam`` scales;
    the base is added; ``out`` (float32) receives the result.  Returns how many
    elements had a zero divisor but a non-zero sum (agreeing weights that
    cancel; the caller decides).

    Models are processed one at a time over a block, accumulating into block
    arrays, so the element loops have no branches and vectorize.  Per element
    this is the torch path's sequence of float32 operations.
    """
    n = b.shape[0]
    k = len(xs)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    sh = np.uint32(shift)
    xu = np.empty(KERNEL_BLOCK, np.uint32)
    bu = np.empty(KERNEL_BLOCK, np.uint32)
    xf = xu.view(np.float32)
    bf = bu.view(np.float32)
    votes = np.empty(KERNEL_BLOCK, np.float32)
    pos = np.empty(KERNEL_BLOCK, np.float32)
    neg = np.empty(KERNEL_BLOCK, np.float32)
    pw = np.empty(KERNEL_BLOCK, np.float32)
    nw = np.empty(KERNEL_BLOCK, np.float32)
    dbuf = np.empty(KERNEL_BLOCK, np.float32)
    flags = np.empty(KERNEL_BLOCK, np.uint8)
    cancelled = 0
    for a in range(0, n, KERNEL_BLOCK):
        m = min(KERNEL_BLOCK, n - a)
        oa = out[a : a + m]
        _load_block(b, a, m, sh, bu)
        for j in range(m):
            votes[j] = zero
            pos[j] = zero
            neg[j] = zero
            pw[j] = zero
            nw[j] = zero
        for i in range(k):
            _load_block(xs[i], a, m, sh, xu)
            wi = w[i]
            md = mode[i]
            f0, f1, i0, i1, k0, k1, sci = fpar[i, 0], fpar[i, 1], ipar[i, 0], ipar[i, 1], keys[i, 0], keys[i, 1], scale[i]
            # the trim of this model over the block, one tight loop per mode (a loop with every
            # mode's branches vectorizes worse), then the rescale
            if md == KEEP_ALL:
                for j in range(m):
                    dbuf[j] = xf[j] - bf[j]
            elif md == THRESHOLD:
                ties_before = i0 - a  # block positions below this keep entries equal to f0
                for j in range(m):
                    d = xf[j] - bf[j]
                    ad = abs(d)
                    drop = (ad <= f0) & ~((ad == f0) & (j < ties_before))
                    dbuf[j] = zero if drop else d
            elif md == DROP_ALL:
                for j in range(m):
                    dbuf[j] = zero
            elif md == MASKED:
                _unpack_block(masks[i], a, m, flags)
                for j in range(m):
                    d = xf[j] - bf[j]
                    dbuf[j] = zero if flags[j] else d
            else:
                for j in range(m):
                    dbuf[j] = _trim_one(xf[j] - bf[j], a + j, md, f0, f1, i0, i1, k0, k1)
            if sci != one:
                for j in range(m):
                    dbuf[j] = dbuf[j] * sci
            for j in range(m):
                d = dbuf[j] * wi
                votes[j] += d
                if consensus:
                    pos[j] += d if d > zero else zero
                    pw[j] += wi if d > zero else zero
                    neg[j] += d if d < zero else zero
                    nw[j] += wi if d < zero else zero
        for j in range(m):
            if consensus:
                up = votes[j] >= zero
                r = pos[j] if up else neg[j]
                if normalize:
                    div = pw[j] if up else nw[j]
                    cancelled += (div == zero) & (r != zero)
                    div = one if div == zero else div
                    r = r / div
            else:
                r = votes[j]
                if normalize:
                    r = r / total
            oa[j] = r * lam + bf[j]
    return cancelled


def _sce_variance(xs, b, shift, out):
    """``out`` = the population variance across models of the deltas ``x_i - b`` (float32), per element; returns how many are NaN.

    torch's ``var(stack, dim=0, unbiased=False)`` on float32: Welford's update
    in float64 over the models in order, divided by K, rounded to float32
    (tests compare the bits).
    """
    n = b.shape[0]
    k = len(xs)
    sh = np.uint32(shift)
    xu = np.empty(KERNEL_BLOCK, np.uint32)
    bu = np.empty(KERNEL_BLOCK, np.uint32)
    xf = xu.view(np.float32)
    bf = bu.view(np.float32)
    mean = np.empty(KERNEL_BLOCK, np.float64)
    m2 = np.empty(KERNEL_BLOCK, np.float64)
    nan = 0
    for a in range(0, n, KERNEL_BLOCK):
        m = min(KERNEL_BLOCK, n - a)
        _load_block(b, a, m, sh, bu)
        for j in range(m):
            mean[j] = 0.0
            m2[j] = 0.0
        for i in range(k):
            _load_block(xs[i], a, m, sh, xu)
            count = np.float64(i + 1)
            for j in range(m):
                d = np.float64(xf[j] - bf[j])
                step = d - mean[j]
                mean[j] += step / count
                m2[j] += step * (d - mean[j])
        oa = out[a : a + m]
        for j in range(m):
            v = np.float32(m2[j] / np.float64(k))
            oa[j] = v
            nan += v != v
    return nan


def _sce_keep(v, value, cutoff, bits):
    """Set in ``bits`` the positions ``j`` with ``v[j] > value``, or ``v[j] == value`` and ``j < cutoff`` (``np.packbits`` order)."""
    n = v.shape[0]
    whole = n - n % 8
    for q in range(0, whole, 8):
        byte = np.uint32(0)
        for t in range(8):
            j = q + t
            keep = (v[j] > value) | ((v[j] == value) & (j < cutoff))
            byte |= np.uint32(keep) << np.uint32(7 - t)
        bits[q >> 3] = np.uint8(byte)
    for j in range(whole, n):
        keep = (v[j] > value) | ((v[j] == value) & (j < cutoff))
        bits[j >> 3] |= np.uint8(np.uint32(keep) << np.uint32(7 - (j & 7)))


def _sce_delta(x, b, shift, keep, masked, out):
    """``out`` = ``x - b`` (float32), times 1 where ``keep`` has the position and 0 elsewhere when ``masked`` (sce's ``delta.mul_(keep)``)."""
    n = b.shape[0]
    sh = np.uint32(shift)
    xu = np.empty(KERNEL_BLOCK, np.uint32)
    bu = np.empty(KERNEL_BLOCK, np.uint32)
    xf = xu.view(np.float32)
    bf = bu.view(np.float32)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    flags = np.empty(KERNEL_BLOCK, np.uint8)
    for a in range(0, n, KERNEL_BLOCK):
        m = min(KERNEL_BLOCK, n - a)
        _load_block(x, a, m, sh, xu)
        _load_block(b, a, m, sh, bu)
        oa = out[a : a + m]
        if masked:
            _unpack_block(keep, a, m, flags)
            for j in range(m):
                oa[j] = (xf[j] - bf[j]) * (one if flags[j] else zero)
        else:
            for j in range(m):
                oa[j] = xf[j] - bf[j]


def _sce_erase(xs, b, shift, keep, masked, w, out):
    """sce's erase over whole flat tensors: signs elected on the (kept) deltas, values and divisor weighted by ``w``.

    Per element, model by model: ``d`` as ``_sce_delta`` makes it, ``s = d * w[i]``;
    the vote sums ``d``, the two sides sum ``s`` and the weights of the models on
    them; the elected side's sum over its weights (clamped below at 1e-6, as
    ``SignConsensus.result(min_divisor=1e-6)``), plus the base, goes to ``out``.
    The float32 operations of the torch path, in its order.
    """
    n = b.shape[0]
    k = len(xs)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    floor = np.float32(1e-6)
    sh = np.uint32(shift)
    xu = np.empty(KERNEL_BLOCK, np.uint32)
    bu = np.empty(KERNEL_BLOCK, np.uint32)
    xf = xu.view(np.float32)
    bf = bu.view(np.float32)
    votes = np.empty(KERNEL_BLOCK, np.float32)
    pos = np.empty(KERNEL_BLOCK, np.float32)
    neg = np.empty(KERNEL_BLOCK, np.float32)
    pw = np.empty(KERNEL_BLOCK, np.float32)
    nw = np.empty(KERNEL_BLOCK, np.float32)
    dbuf = np.empty(KERNEL_BLOCK, np.float32)
    factor = np.empty(KERNEL_BLOCK, np.float32)  # the block's keep mask as 1 and 0, unpacked once for all models
    flags = np.empty(KERNEL_BLOCK, np.uint8)
    for a in range(0, n, KERNEL_BLOCK):
        m = min(KERNEL_BLOCK, n - a)
        _load_block(b, a, m, sh, bu)
        for j in range(m):
            votes[j] = zero
            pos[j] = zero
            neg[j] = zero
            pw[j] = zero
            nw[j] = zero
        if masked:
            _unpack_block(keep, a, m, flags)
            for j in range(m):
                factor[j] = one if flags[j] else zero
        for i in range(k):
            _load_block(xs[i], a, m, sh, xu)
            wi = w[i]
            if masked:
                for j in range(m):
                    dbuf[j] = (xf[j] - bf[j]) * factor[j]
            else:
                for j in range(m):
                    dbuf[j] = xf[j] - bf[j]
            for j in range(m):
                d = dbuf[j]
                s = d * wi
                votes[j] += d
                pos[j] += s if s > zero else zero
                pw[j] += wi if s > zero else zero
                neg[j] += s if s < zero else zero
                nw[j] += wi if s < zero else zero
        oa = out[a : a + m]
        for j in range(m):
            up = votes[j] >= zero
            r = pos[j] if up else neg[j]
            div = pw[j] if up else nw[j]
            div = div if div >= floor else floor
            oa[j] = r / div + bf[j]


_NO_CACHE_WARNING = "warning: numba finds no writable cache folder (read-only install and home); "


def _private_cache_dir() -> str | None:
    """A cache folder under the temporary directory that only this user can write, or None.

    Compiled code is loaded from it, so a folder another user could have
    planted (or could write into) is refused.
    """
    uid = os.getuid() if hasattr(os, "getuid") else None
    path = os.path.join(tempfile.gettempdir(), f"splice-numba-{uid if uid is not None else 'user'}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        st = os.lstat(path)
        own = uid is None or st.st_uid == uid
        if not stat.S_ISDIR(st.st_mode) or not own or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return None
    return path


def _compile_all(cache: bool) -> dict:
    """The kernels, njit-compiled lazily; helpers first (the kernels resolve them as globals)."""
    jit = numba.njit(nogil=True, cache=cache)
    glob = globals()
    for helper in ("_load_block", "_block_magnitudes", "_mix32", "_dare_rank", "_trim_one", "_bit", "_unpack_block"):
        glob[helper] = jit(getattr(glob[helper], "py_func", glob[helper]))
    names = ("select", "select2", "nth_equal", "gta", "kept_block", "della_rows", "masked_block")
    names += ("sce_variance", "sce_keep", "sce_delta", "sce_erase")
    return {name: jit(glob[f"_{name}"]) for name in names}


def _compile_with_fallback() -> dict:
    """``_compile_all`` with numba's cache; when numba has nowhere to write it, a private temporary one, else none."""
    try:
        return _compile_all(cache=True)
    except RuntimeError as e:  # "cannot cache function ...: no locator available"
        if "no locator" not in str(e):
            raise
    private = _private_cache_dir()
    if private is not None:
        saved = numba.config.CACHE_DIR
        numba.config.CACHE_DIR = private  # read once per function, when it is decorated
        try:
            kernels = _compile_all(cache=True)
            print(f"{_NO_CACHE_WARNING}compiled kernels are cached in {private}", file=sys.stderr)
            return kernels
        except RuntimeError:
            pass
        finally:
            numba.config.CACHE_DIR = saved  # other numba users in this process are unaffected
    print(f"{_NO_CACHE_WARNING}kernels are compiled again in every process (a few seconds)", file=sys.stderr)
    return _compile_all(cache=False)


if AVAILABLE:
    _compiled = _compile_with_fallback()
    select, select2, nth_equal, gta, kept_block = (_compiled[k] for k in ("select", "select2", "nth_equal", "gta", "kept_block"))
    della_rows, masked_block = _compiled["della_rows"], _compiled["masked_block"]
    sce_variance, sce_keep, sce_delta, sce_erase = (_compiled[k] for k in ("sce_variance", "sce_keep", "sce_delta", "sce_erase"))
    del _compiled
else:  # pragma: no cover
    select = select2 = nth_equal = gta = kept_block = della_rows = masked_block = None
    sce_variance = sce_keep = sce_delta = sce_erase = None
