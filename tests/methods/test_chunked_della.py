"""DELLA by blocks of rows (``_chunked.della_chunked``) gives the whole-tensor path's bits."""

import pytest
import torch

from splice.methods import _chunked, get_method
from splice.methods._sparsify import SORT_LIMIT, della_
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
