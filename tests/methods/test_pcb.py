"""pcb: against a transcription of the authors' released PCB-merging code (per tensor), plus properties."""

from __future__ import annotations

import pytest
import torch

from splice.methods import get_method

NAME = "pcb"


def call(tensors, base, **params):
    return get_method(NAME)(list(tensors), base, **params)  # through the registry: scalars become per-model lists


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def minmax(x):
    lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    return (x - lo) / (hi - lo)


def reference(tensors, base, density, weight=None, lam=1.0):
    """The reference PCB_merge (without its 0.01% magnitude clipping), float64, with a full sort."""
    b = base.double().reshape(-1)
    tv = torch.stack([t.double().reshape(-1) - b for t in tensors])
    n, d = tv.shape
    intra = torch.exp(n * minmax(tv.abs()) ** 2)
    inter = torch.tanh(tv * tv.sum(dim=0))
    score = intra * inter
    ordered = torch.sort(score, dim=1).values
    floor = ordered[:, int(d * (1 - density))].unsqueeze(1)
    scale = minmax(torch.maximum(score, floor))
    w = torch.tensor(weight or [1.0] * n, dtype=torch.float64).unsqueeze(1)
    merged = (w * tv * scale).sum(0) / scale.sum(0).clamp(min=1e-12)
    return (b + lam * merged).reshape(base.shape)


def test_registration():
    m = get_method(NAME)
    assert m.base == "required" and not m.randomized
    assert {p.name: (p.default, p.per_model) for p in m.params} == {
        "weight": (1.0, True),
        "density": (0.2, True),
        "lambda": (1.0, False),
    }


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("n_models", [1, 2, 3])
def test_against_reference(density, n_models):
    base = rand(4, 4, seed=1)
    ts = [base + rand(4, 4, seed=2 + i) for i in range(n_models)]
    out = call(ts, base, weight=[1.0] * n_models, density=[density] * n_models, lambda_=1.0)
    torch.testing.assert_close(out.double(), reference(ts, base, density), rtol=1e-5, atol=1e-6)


def test_weights_lambda_and_1d():
    base = rand(40, seed=3)
    ts = [base + 0.05 * rand(40, seed=4 + i) for i in range(3)]
    out = call(ts, base, weight=[1.2, 0.8, 1.0], density=0.3, lambda_=0.9)
    expected = reference(ts, base, 0.3, weight=[1.2, 0.8, 1.0], lam=0.9)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    doubled = call(ts, base, weight=[2.0] * 3, density=0.3)
    single = call(ts, base, weight=[1.0] * 3, density=0.3)
    torch.testing.assert_close(doubled - base, 2 * (single - base))


def test_identical_finetunes_keep_delta_on_top_elements():
    base = rand(10, 10, seed=5)
    delta = rand(10, 10, seed=6)
    out = call([base + delta] * 3, base, density=0.3)
    moved = out != base
    # scores are distinct, so int(100 * 0.7) + 1 of them fall to zero and the rest survive
    assert int(moved.sum()) == 100 - 71
    torch.testing.assert_close(out[moved], (base + delta)[moved])
    assert bool(delta.abs()[moved].min() >= delta.abs()[~moved].max())  # the largest magnitudes survive


def test_disagreeing_small_entry_is_dropped():
    base = torch.zeros(8)
    a = torch.tensor([1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01])
    b = torch.tensor([-0.1, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01])
    out = call([a, b], base, density=0.5)
    assert out[0] == 1.0  # b opposes the combined direction there: its score is negative, dropped


def test_edges():
    base = rand(6, 6, seed=7)
    ts = [base + rand(6, 6, seed=8), base + rand(6, 6, seed=9)]
    assert torch.equal(call([base.clone(), base.clone()], base), base)
    assert torch.equal(call(ts, base, density=0.0), base)
    assert torch.equal(get_method(NAME).fn([], base, weight=[], density=[]), base)  # the function alone: no models, the base
    many = [base + 0.5 * rand(6, 6, seed=20 + i) for i in range(120)]  # exp(N * ...) must not overflow
    out = call(many, base, density=0.5)
    assert torch.isfinite(out).all()
    huge = call([base + 1e3 * rand(6, 6, seed=10), base - 1e3 * rand(6, 6, seed=11)], base, density=0.5)
    assert torch.isfinite(huge).all()
