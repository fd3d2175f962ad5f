"""arcee_fusion: against a plain float64 transcription, plus properties and mergekit parity."""

from __future__ import annotations

import math

import pytest
import torch

from splice.methods import arcee_fusion as af
from splice.methods import get_method


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Row-wise KL of softmaxes times |delta|, fence median + 1.5 IQR on sorted positions floor(q (n-1)), float64."""
    a = base.double().reshape(-1, base.shape[-1]).tolist()
    b = other.double().reshape(-1, base.shape[-1]).tolist()

    def softmax(row):
        m = max(row)
        e = [math.exp(x - m) for x in row]
        s = sum(e)
        return [x / s + 1e-8 for x in e]

    scores = []
    for ra, rb in zip(a, b):
        p, q = softmax(rb), softmax(ra)
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        scores.append([abs(y - x) * kl for x, y in zip(ra, rb)])
    flat = sorted(s for row in scores for s in row)
    n = len(flat)
    median, q1, q3 = flat[int(0.5 * (n - 1))], flat[int(0.25 * (n - 1))], flat[int(0.75 * (n - 1))]
    threshold = median + 1.5 * (q3 - q1)
    out = [[x + (y - x) * (s >= threshold) for x, y, s in zip(ra, rb, rs)] for ra, rb, rs in zip(a, b, scores)]
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def run(base, other, generator=None):
    return get_method("arcee_fusion")([other], base, generator=generator)


def test_registration_matches_mergekit():
    m = get_method("arcee_fusion")
    assert m.base == "required" and m.params == ()
    assert (m.min_models, m.max_models) == (1, 1)


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (9,), (2, 3, 4), (17, 6)])
@pytest.mark.parametrize("noise", [0.05, 0.5, 2.0])
def test_matches_reference(shape, noise):
    base = rand(*shape, seed=1)
    other = base + noise * rand(*shape, seed=2) * (rand(*shape, seed=3) > 0.5)
    expected = reference(base, other)
    out = run(base, other)
    # float64 in: the transcription to the last bits; float32 in: within the usual tolerance
    torch.testing.assert_close(run(base.double(), other.double()), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_keeps_only_outliers():
    base = torch.zeros(1, 8)
    other = torch.tensor([[0.01, -0.01, 0.02, 0.0, 0.01, 0.0, 5.0, -0.02]])
    out = run(base, other)
    assert out[0, 6] == 5.0  # the one large change is fused in
    assert torch.count_nonzero(out) == 1


def test_properties():
    base = rand(4, 4, seed=4)
    assert torch.equal(run(base, base.clone()), base)  # no change, nothing fused
    other = base + rand(4, 4, seed=5)
    b0, o0 = base.clone(), other.clone()
    out = run(base, other)
    assert torch.equal(base, b0) and torch.equal(other, o0)
    # every element is either the base's or the other model's
    assert torch.all((out == base) | (out == other))
    assert out.dtype == base.dtype and torch.isfinite(out).all()


def test_threshold_positions():
    scores = torch.arange(10, dtype=torch.float64).flip(0)  # sorted: 0..9; n - 1 = 9
    # median at floor(4.5) = 4, Q1 at floor(2.25) = 2, Q3 at floor(6.75) = 6
    assert float(af.fusion_threshold(scores)) == 4 + 1.5 * (6 - 2)


def test_large_tensor_samples_with_the_generator(monkeypatch):
    monkeypatch.setattr(af, "QUANTILE_SAMPLE", 1000)
    scores = torch.rand(5000, generator=torch.Generator().manual_seed(0))
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    one, two, other = (af.fusion_threshold(scores, g(s)) for s in (7, 7, 8))
    assert torch.equal(one, two) and not torch.equal(one, other)
    assert abs(float(one) - 1.25) < 0.1  # uniform [0, 1): 0.5 + 1.5 * 0.5


def test_errors():
    x = torch.ones(4)
    with pytest.raises(ValueError, match="needs a base model"):
        get_method("arcee_fusion")([x], None)
    with pytest.raises(ValueError, match=r"needs exactly 1 model tensor\(s\) besides the base, got 2"):
        get_method("arcee_fusion")([x, x], x)


@pytest.mark.mergekit
def test_parity_with_mergekit(mergekit):
    for shape, seed in (((6, 7), 1), ((12,), 2), ((5, 3, 4), 3), ((64, 33), 4)):
        base = rand(*shape, seed=seed)
        other = base + 0.3 * rand(*shape, seed=seed + 10)
        expected = mergekit.merge("mergekit.merge_methods.arcee_fusion:arcee_fusion_merge_method", [base, other], base_index=0)
        torch.testing.assert_close(run(base, other), expected, rtol=1e-6, atol=1e-7)
