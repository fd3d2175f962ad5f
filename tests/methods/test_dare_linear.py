"""dare_linear: DARE random drop + L1 rescale, then the weighted task-vector sum."""

from __future__ import annotations

import pytest
import torch

from splice.methods import NO_DEFAULT, get_method

NAME = "dare_linear"


def call(tensors, base, seed=0, name=NAME, **params):
    m = get_method(name)
    kw = {}
    for p in m.params:
        v = params.pop(p.name, p.default)
        assert v is not NO_DEFAULT, p.name
        kw[p.py_name] = [v] * len(tensors) if p.per_model and not isinstance(v, list) else v
    assert not params
    if m.randomized:
        kw["generator"] = None if seed is None else torch.Generator().manual_seed(seed)
    return m.fn(list(tensors), base, **kw)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference(tensors, base, weight, density, seed, normalize=False, rescale=True, lam=1.0):
    """DARE transcribed, replaying the documented random stream: one torch.rand per model, keep u < density."""
    g = torch.Generator().manual_seed(seed)
    b = base.double()
    total = torch.zeros_like(b)
    for t, w, p in zip(tensors, weight, density):
        d = t.double() - b
        if p < 1:
            u = torch.rand(base.shape, generator=g)
            kept = torch.where(u < p, d, torch.zeros_like(d))
            if rescale and d.abs().sum() >= 1e-7 and kept.abs().sum() >= 1e-7:
                kept = kept * d.abs().sum() / kept.abs().sum()
            d = kept
        total += w * d
    if normalize and abs(sum(weight)) >= 1e-8:
        total /= sum(weight)
    return b + lam * total


def test_registration_matches_mergekit():
    m = get_method(NAME)
    assert m.base == "required" and m.randomized
    spec = {p.name: (p.default, p.per_model) for p in m.params}
    assert spec == {
        "weight": (NO_DEFAULT, True),
        "density": (1.0, True),
        "normalize": (False, False),
        "rescale": (True, False),
        "lambda": (1.0, False),
        "int8_mask": (False, False),
    }


@pytest.mark.parametrize("normalize,rescale", [(False, True), (True, False)])
def test_against_formula(normalize, rescale):
    base = rand(4, 4, seed=1)
    ts = [base + rand(4, 4, seed=s) for s in (2, 3)]
    out = call(ts, base, seed=7, weight=[0.7, 0.4], density=[0.5, 0.8], normalize=normalize, rescale=rescale)
    expected = reference(ts, base, [0.7, 0.4], [0.5, 0.8], 7, normalize, rescale)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_keeps_density_fraction_and_preserves_l1():
    base = rand(200, 200, seed=3)
    delta = rand(200, 200, seed=4)
    out = call([base + delta], base, seed=1, weight=[1.0], density=0.3)
    changed = out != base
    assert abs(float(changed.float().mean()) - 0.3) < 0.01
    moved = (out - base).double()
    assert abs(float(moved.abs().sum() / delta.double().abs().sum()) - 1) < 1e-4  # L1 rescale
    assert abs(float(moved.mean() - delta.double().mean())) < 0.02  # unbiased on average
    # kept entries are scaled by about 1/density
    ratio = moved[changed] / delta.double()[changed]
    assert abs(float(ratio.mean()) * 0.3 - 1) < 0.05


def test_seeded():
    base = rand(30, 30, seed=5)
    ts = [base + rand(30, 30, seed=6), base + rand(30, 30, seed=7)]
    kw = dict(weight=[0.5, 0.5], density=0.5)
    a, b, c = call(ts, base, seed=3, **kw), call(ts, base, seed=3, **kw), call(ts, base, seed=4, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.isfinite(call(ts, base, seed=None, **kw)).all()  # no generator: torch's global RNG


def test_edges():
    base = rand(9, seed=8)  # 1-D
    delta = rand(9, seed=9)
    ta = get_method("task_arithmetic").fn
    # density 1: plain task arithmetic, no randomness
    out = call([base + delta, base - delta / 2], base, weight=[0.3, 0.9], density=1.0)
    torch.testing.assert_close(
        out,
        ta(
            [base + delta, base - delta / 2],
            base,
            weight=[0.3, 0.9],
            density=[1.0, 1.0],
            normalize=False,
            rescale=False,
            lambda_=1.0,
            int8_mask=False,
        ),
    )
    assert torch.equal(call([base + delta], base, weight=[1.0], density=0.0), base)
    assert torch.equal(call([base.clone(), base.clone()], base, weight=[1.0, 1.0], density=0.5), base)
    assert torch.equal(call([], base, weight=[]), base)


@pytest.mark.mergekit
def test_parity_with_mergekit_on_deterministic_path():
    base_mod = pytest.importorskip("mergekit.merge_methods.base")
    if not hasattr(base_mod, "TensorGroup"):
        pytest.skip("needs mergekit >= 0.1.5")
    from mergekit.merge_methods.registry import get

    base = rand(16, 12, seed=12)
    ts = [base + 0.1 * rand(16, 12, seed=13 + i) for i in range(3)]
    params = {"weight": [0.5, 0.3, 0.7], "normalize": True, "lambda": 0.9}  # density 1: no drop
    group = base_mod.TensorGroup.from_tensors([base, *ts], base_index=0)
    (expected,) = get(NAME)((group,), parameters=params)
    torch.testing.assert_close(call(ts, base, **dict(params)), expected, rtol=1e-6, atol=1e-6)
