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

from ._sizes import KERNEL_BLOCK

try:  # pragma: no cover - exercised by whichever path the environment has
    import numba

    AVAILABLE = True
except ImportError:  # pragma: no cover
    numba = None
    AVAILABLE = False

KEEP_ALL, THRESHOLD, DROP_ALL, RANDOM = 0, 1, 2, 3  # trim modes per model (RANDOM: DARE's drop)


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


def _dare_block(x, b, shift, ka, kb, thr, a, m, dout, kout):
    """Over ``[a, a+m)``: ``dout = x - b`` and ``kout`` = its DARE-kept part (dropped: +0), float32."""
    sh = np.uint32(shift)
    xu = np.empty(m, np.uint32)
    bu = np.empty(m, np.uint32)
    _load_block(x, a, m, sh, xu)
    _load_block(b, a, m, sh, bu)
    xf = xu.view(np.float32)
    bf = bu.view(np.float32)
    zero = np.float32(0.0)
    for j in range(m):
        d = xf[j] - bf[j]
        dout[j] = d
        kout[j] = d if _dare_rank(a + j, ka, kb) < thr else zero


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


def _gta(xs, b, shift, mode, thr, cutoff, ka, kb, rthr, scale, w, consensus, normalize, total, lam, out):
    """Steps 1-5 of ``_task_vectors`` over whole flat tensors of K models (``xs``, a tuple).

    ``xs``, ``b``: raw bits as in ``_select``.  Trim of model i (``mode[i]``):
    keep all; keep ``|d| > thr`` (torch's hardshrink: not ``-thr <= d <= thr``)
    and ``|d| == thr`` at flat positions below ``cutoff[i]``; or drop all.  Then
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
            t = thr[i]
            md = mode[i]
            ties_before = cutoff[i] - a  # block positions below this keep entries equal to t
            kai, kbi, rti, sci = ka[i], kb[i], rthr[i], scale[i]
            for j in range(m):
                d = xf[j] - bf[j]
                if md == DROP_ALL:
                    d = zero
                elif md == THRESHOLD:
                    ad = abs(d)
                    drop = (ad <= t) & ~((ad == t) & (j < ties_before))
                    d = zero if drop else d
                elif md == RANDOM:
                    d = d if _dare_rank(a + j, kai, kbi) < rti else zero
                    d = d * sci
                d = d * wi
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
    for helper in ("_load_block", "_block_magnitudes", "_mix32", "_dare_rank"):
        glob[helper] = jit(getattr(glob[helper], "py_func", glob[helper]))
    return {"select": jit(_select), "nth_equal": jit(_nth_equal), "gta": jit(_gta), "dare_block": jit(_dare_block)}


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
    select, nth_equal, gta, dare_block = _compiled["select"], _compiled["nth_equal"], _compiled["gta"], _compiled["dare_block"]
    del _compiled
else:  # pragma: no cover
    select = nth_equal = gta = dare_block = None
