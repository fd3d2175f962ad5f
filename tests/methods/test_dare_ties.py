"""dare_ties: DARE random drop + L1 rescale, then TIES sign election."""

from __future__ import annotations

import pytest
import torch

from splice.methods import NO_DEFAULT, get_method

NAME = "dare_ties"


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
    """DARE (replaying the documented stream: one torch.rand per model, keep u < density), then TIES election."""
    g = torch.Generator().manual_seed(seed)
    b = base.double().reshape(-1)
    ds = []
    for t, w, p in zip(tensors, weight, density):
        d = t.double().reshape(-1) - b
        if p < 1:
            u = torch.rand(base.shape, generator=g).reshape(-1)
            kept = torch.where(u < p, d, torch.zeros_like(d))
            if rescale and d.abs().sum() >= 1e-7 and kept.abs().sum() >= 1e-7:
                kept = kept * d.abs().sum() / kept.abs().sum()
            d = kept
        ds.append(w * d)
    out = []
    for j in range(b.numel()):
        vals = [float(d[j]) for d in ds]
        positive = sum(vals) >= 0
        agree = [i for i, v in enumerate(vals) if v != 0 and (v > 0) == positive]
        s = sum(vals[i] for i in agree)
        if normalize:
            div = sum(weight[i] for i in agree)
            s /= div if div != 0 else 1.0
        out.append(float(b[j]) + lam * s)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


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


@pytest.mark.parametrize("normalize,rescale", [(False, True), (True, True), (True, False)])
def test_against_formula(normalize, rescale):
    base = rand(4, 4, seed=1)
    ts = [base + rand(4, 4, seed=s) for s in (2, 3, 4)]
    w, dens = [0.7, 0.4, 1.1], [0.5, 0.8, 0.6]
    out = call(ts, base, seed=11, weight=w, density=dens, normalize=normalize, rescale=rescale, **{"lambda": 0.9})
    torch.testing.assert_close(out.double(), reference(ts, base, w, dens, 11, normalize, rescale, 0.9), rtol=1e-5, atol=1e-6)


def test_density_one_equals_ties():
    base = rand(6, 7, seed=2)
    ts = [base + rand(6, 7, seed=3), base + rand(6, 7, seed=4), base - rand(6, 7, seed=5)]
    for normalize in (False, True):
        out = call(ts, base, weight=[0.4, 0.3, 0.9], density=1.0, normalize=normalize)
        ties = call(ts, base, name="ties", weight=[0.4, 0.3, 0.9], density=1.0, normalize=normalize)
        assert torch.equal(out, ties)


def test_keeps_density_fraction_and_rescales():
    base = rand(200, 200, seed=6)
    delta = rand(200, 200, seed=7)
    out = call([base + delta], base, seed=2, weight=[1.0], density=0.25)  # one model: every kept entry agrees
    changed = out != base
    assert abs(float(changed.float().mean()) - 0.25) < 0.01
    moved = (out - base).double()
    assert abs(float(moved.abs().sum() / delta.double().abs().sum()) - 1) < 1e-4
    assert abs(float((moved[changed] / delta.double()[changed]).mean()) * 0.25 - 1) < 0.05  # ~1/density


def test_seeded_and_edges():
    base = rand(40, 3, seed=8)
    ts = [base + rand(40, 3, seed=9), base + rand(40, 3, seed=10)]
    kw = dict(weight=[1.0, 1.0], density=0.5)
    a, b, c = call(ts, base, seed=1, **kw), call(ts, base, seed=1, **kw), call(ts, base, seed=2, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()
    v = rand(11, seed=11)  # 1-D
    out = call([v + 1, v - 1], v, seed=0, weight=[1.0, 1.0], density=0.5)
    assert out.shape == v.shape and torch.isfinite(out).all()
    assert torch.equal(call([base + 1], base, weight=[1.0], density=0.0), base)
    assert torch.equal(call([base.clone(), base.clone()], base, **kw), base)


@pytest.mark.mergekit
def test_parity_with_mergekit_on_deterministic_path():
    base_mod = pytest.importorskip("mergekit.merge_methods.base")
    if not hasattr(base_mod, "TensorGroup"):
        pytest.skip("needs mergekit >= 0.1.5")
    from mergekit.merge_methods.registry import get

    base = rand(16, 12, seed=12)
    ts = [base + 0.1 * rand(16, 12, seed=13 + i) for i in range(3)]
    for params in ({"weight": [0.5, -0.3, 0.7]}, {"weight": [0.5, 0.3, 0.7], "normalize": True, "lambda": 1.2}):
        group = base_mod.TensorGroup.from_tensors([base, *ts], base_index=0)
        (expected,) = get(NAME)((group,), parameters=params)
        torch.testing.assert_close(call(ts, base, **dict(params)), expected, rtol=1e-6, atol=1e-6)
