"""fisher against a float64 transcription of Matena & Raffel 2022 eq. (3), and its exactness properties."""

from __future__ import annotations

import pytest
import torch

from splice.methods import fisher as fm
from splice.methods import get_method


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_matches_the_formula():
    ts = [rand(4, 5, seed=s) for s in (1, 2, 3)]
    fs = [rand(4, 5, seed=s).square() for s in (4, 5, 6)]
    w = [1.0, 0.5, 2.0]
    floor = fm.FISHER_FLOOR * sum(float(f.mean()) for f in fs) / 3
    expect = torch.empty(4, 5, dtype=torch.float64)
    for i in range(4):
        for j in range(5):
            num = sum(w[k] * (fs[k][i, j] + floor) * ts[k][i, j] for k in range(3))
            den = sum(w[k] * (fs[k][i, j] + floor) for k in range(3))
            expect[i, j] = num / den
    out = get_method("fisher")(ts, None, weight=w, statistics=fs)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


def test_identical_fisher_gives_linear_and_a_dominant_fisher_gives_its_model():
    ts = [rand(6, seed=s) for s in (1, 2)]
    f = rand(6, seed=3).square()
    torch.testing.assert_close(get_method("fisher")(ts, None, statistics=[f, f]), (ts[0] + ts[1]) / 2)
    big = torch.zeros(6, dtype=torch.float64)
    big[:3] = 1.0
    small = torch.zeros(6, dtype=torch.float64)
    small[3:] = 1.0
    out = get_method("fisher")(ts, None, statistics=[big, small])
    torch.testing.assert_close(out[:3], ts[0][:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[3:], ts[1][3:], rtol=1e-5, atol=1e-6)


def test_zero_fisher_and_no_statistics_fall_back_to_linear():
    ts = [rand(6, seed=s) for s in (1, 2)]
    z = torch.zeros(6, dtype=torch.float64)
    torch.testing.assert_close(get_method("fisher")(ts, None, statistics=[z, z]), (ts[0] + ts[1]) / 2)
    torch.testing.assert_close(get_method("fisher")(ts, None, weight=[1.0, 3.0]), (ts[0] + 3 * ts[1]) / 4)
    with pytest.raises(ValueError, match="do not fit"):
        get_method("fisher")(ts, None, statistics=[rand(5, seed=1), rand(5, seed=2)])
