"""DELLA by blocks of rows (``_chunked.della_chunked``) gives the whole-tensor path's bits."""

import numpy as np
import pytest
import torch

from splice.methods import _chunked, _kernels, get_method
from splice.methods._sparsify import SORT_LIMIT, della_, della_probs
from splice.methods.task_arithmetic import merge_task_vectors

ROWS, COLS = 263, 1001  # above SORT_LIMIT; rows of an odd length: the L1 partials straddle row blocks
assert ROWS * COLS > SORT_LIMIT


def _models(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(ROWS, COLS, generator=g)
    # bf16 deltas of few distinct values: magnitudes tie within rows (the stable rank order decides)
    ts = [(base + ((0.02 * torch.randn(ROWS, COLS, generator=g)) * 200).round() / 200).bfloat16() for _ in range(3)]
    return ts, base.bfloat16()


@pytest.mark.parametrize(
    "della,rescale,kw",
    [
        ([(0.4, 0.2), (1.0, 0.1), (0.7, 0.15)], True, dict(weight=[1.0, 0.5, -0.3], consensus=True, normalize=True, lambda_=0.9)),
        ([(0.5, 0.3), (0.0, 0.1), (0.3, 0.1)], True, dict(weight=[0.8, 0.5, 0.4], consensus=False, normalize=True)),
        ([(0.6, 0.1), (0.2, 0.15), (0.5, 0.4)], False, dict(weight=[1.0, 0.7, 0.4], consensus=True, normalize=False)),
    ],
)
def test_della_by_row_blocks_is_bit_identical_to_whole_tensor_path(della, rescale, kw, monkeypatch):
    ts, base = _models()
    g = torch.Generator().manual_seed(3)
    sp = lambda i, d, s: della_(d, della[i][0], della[i][1], rescale, g, scratch=s)  # noqa: E731
    slow = merge_task_vectors([t.float() for t in ts], base.float(), sparsify=sp, **dict(kw))
    fast = merge_task_vectors(ts, base, della=della, rescale=rescale, generator=torch.Generator().manual_seed(3), **dict(kw))
    assert torch.equal(fast, slow)
    monkeypatch.setattr(_chunked, "DELLA_BLOCK", 7 * COLS + 5)  # blocks of 7 rows: many, not dividing ROWS
    fast = merge_task_vectors(ts, base, della=della, rescale=rescale, generator=torch.Generator().manual_seed(3), **dict(kw))
    assert torch.equal(fast, slow)
    monkeypatch.setattr(_kernels, "AVAILABLE", False)  # the torch row blocks too
    fast = merge_task_vectors(ts, base, della=della, rescale=rescale, generator=torch.Generator().manual_seed(3), **dict(kw))
    assert torch.equal(fast, slow)


def test_della_method_takes_the_row_path_and_refuses_a_bad_epsilon():
    ts, base = _models(seed=1)
    m = get_method("della")
    out = m(ts, base, weight=1.0, density=0.5, epsilon=0.2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    sp = lambda i, d, s: della_(d, 0.5, 0.2, True, g, scratch=s)  # noqa: E731
    assert torch.equal(
        out, merge_task_vectors([t.float() for t in ts], base.float(), weight=[1.0] * 3, sparsify=sp, consensus=True, normalize=True)
    )
    with pytest.raises(ValueError, match=r"epsilon must keep density \+- epsilon inside \(0, 1\)"):
        m(ts, base, weight=1.0, density=0.85, epsilon=0.2, generator=torch.Generator().manual_seed(0))


def _tie_heavy(rows, cols, seed=0):
    """bf16 models whose deltas take a handful of values, with rows that tie throughout and rows with outliers."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g).bfloat16()
    ts = []
    for _ in range(3):
        steps = torch.randint(-2, 3, (rows, cols), generator=g).float() * 2**-6  # magnitudes 0, 2**-6, 2**-5
        steps[0] = 0.0  # a row of exact zeros: every magnitude tied
        steps[1] = 2**-6  # a row of one non-zero magnitude
        steps[2, cols // 2] = 1e4  # an outlier: the row's magnitudes vary in more than two digits' worth of bits
        steps[3] = torch.randn(cols, generator=g) * 1e-3  # a row of many distinct magnitudes
        ts.append((base.float() + steps).bfloat16())
    return ts, base


@pytest.mark.skipif(not _kernels.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cols", [1, 5, 8, 13, 768, 70001])
def test_della_row_ranks_kernel_matches_stable_argsort(dtype, cols):
    rows = 40
    ts, base = _tie_heavy(rows, cols)
    x, b = ts[0].to(dtype), base.to(dtype)
    if dtype == torch.float32:  # full float32 mantissas: the radix sort takes every digit
        x = x + 1e-3 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(5))
    mags = (x.float() - b.float()).abs()
    order = torch.argsort(mags.view(torch.int32), dim=1, stable=True)
    u = torch.rand(rows, cols, generator=torch.Generator().manual_seed(1))
    probs = della_probs(cols, 0.5, 0.3, "cpu", torch.float32)
    expected = torch.empty(rows, cols, dtype=torch.bool).scatter_(1, order, u >= probs)
    (xv, bv), shift = _chunked.bit_views([x, b])
    bits = np.zeros((rows * cols + 7) // 8, dtype=np.uint8)
    for r0, r1 in [(0, 7), (7, 8), (8, rows)]:  # blocks of rows sharing bytes of the mask
        _kernels.della_rows(xv, bv, shift, cols, r0, r1, u[r0:r1].reshape(-1).numpy(), probs.reshape(-1).numpy(), bits)
    got = np.unpackbits(bits, count=rows * cols).reshape(rows, cols).astype(bool)
    assert np.array_equal(got, expected.numpy())


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("consensus", [True, False])
@pytest.mark.parametrize("rows,cols", [(300, 1003), (37, 29)])  # above SORT_LIMIT, and below (by rows with the kernels only)
def test_della_kernel_path_is_bit_identical_on_tied_magnitudes(rows, cols, rescale, consensus, monkeypatch):
    ts, base = _tie_heavy(rows, cols, seed=2)
    della = [(0.5, 0.2), (0.3, 0.25), (0.7, 0.1)]
    kw = dict(weight=[1.0, 0.6, 0.3], consensus=consensus, normalize=True)
    g = torch.Generator().manual_seed(9)
    sp = lambda i, d, s: della_(d, della[i][0], della[i][1], rescale, g, scratch=s)  # noqa: E731
    slow = merge_task_vectors([t.float() for t in ts], base.float(), sparsify=sp, **kw)
    for kernels in (_kernels.AVAILABLE, False):  # the kernels, then the torch row blocks
        monkeypatch.setattr(_kernels, "AVAILABLE", kernels)
        for block in (_chunked.DELLA_BLOCK, 3 * cols + 1):
            monkeypatch.setattr(_chunked, "DELLA_BLOCK", block)
            fast = merge_task_vectors(ts, base, della=della, rescale=rescale, generator=torch.Generator().manual_seed(9), **kw)
            assert torch.equal(fast, slow)
