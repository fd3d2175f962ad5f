"""della_linear: MagPrune (rank-dependent random drop) + L1 rescale, then the weighted sum."""

from __future__ import annotations

import pytest
import torch

from splice.methods import NO_DEFAULT, get_method

NAME = "della_linear"


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


def magprune(d, density, eps, u, rescale=True):
    """Per row: the element of ascending-magnitude rank j is kept iff u[row, j] < p_j,
    p_j = density - eps + 2 eps j / (n - 1) (the documented use of one torch.rand per model)."""
    rows = d.reshape(1, -1) if d.dim() < 2 else d
    u = u.reshape(rows.shape)
    out = torch.zeros_like(rows)
    n = rows.shape[1]
    for r in range(rows.shape[0]):
        order = torch.sort(rows[r].abs(), stable=True).indices.tolist()
        for j, col in enumerate(order):
            if float(u[r, j]) < density - eps + 2 * eps * j / (n - 1):
                out[r, col] = rows[r, col]
    out = out.reshape(d.shape)
    if rescale and d.abs().sum() >= 1e-7 and out.abs().sum() >= 1e-7:
        out = out * (d.abs().sum() / out.abs().sum())
    return out


def reference(tensors, base, weight, density, epsilon, seed, normalize=False, rescale=True, lam=1.0):
    g = torch.Generator().manual_seed(seed)
    b = base.double()
    total = torch.zeros_like(b)
    for t, w, p, e in zip(tensors, weight, density, epsilon):
        d = t.double() - b
        if p < 1:
            d = magprune(d, p, e, torch.rand(base.shape, generator=g), rescale)
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
        "epsilon": (0.15, True),
        "normalize": (False, False),
        "rescale": (True, False),
        "lambda": (1.0, False),
        "int8_mask": (False, False),
    }


@pytest.mark.parametrize("shape,normalize,rescale", [((4, 4), False, True), ((3, 5), True, False), ((7,), False, True)])
def test_against_formula(shape, normalize, rescale):
    base = rand(*shape, seed=1)
    ts = [base + rand(*shape, seed=2), base + rand(*shape, seed=3)]
    w, dens, eps = [0.8, 0.5], [0.5, 0.3], [0.2, 0.1]
    out = call(ts, base, seed=9, weight=w, density=dens, epsilon=eps, normalize=normalize, rescale=rescale)
    expected = reference(ts, base, w, dens, eps, 9, normalize, rescale)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_density_one_is_task_arithmetic():
    base = rand(6, 7, seed=2)
    ts = [base + rand(6, 7, seed=3), base - rand(6, 7, seed=4)]
    out = call(ts, base, weight=[0.4, 0.9], density=1.0)
    assert torch.equal(out, call(ts, base, name="task_arithmetic", weight=[0.4, 0.9]))


def test_keep_rate_seeded_and_edges():
    base = rand(300, 40, seed=5)
    delta = rand(300, 40, seed=6)
    out = call([base + delta], base, seed=3, weight=[1.0], density=0.3, epsilon=0.1)
    moved = (out - base).double()
    assert abs(float((moved != 0).double().mean()) - 0.3) < 0.01
    assert abs(float(moved.abs().sum() / delta.double().abs().sum()) - 1) < 1e-4
    again = call([base + delta], base, seed=3, weight=[1.0], density=0.3, epsilon=0.1)
    other = call([base + delta], base, seed=4, weight=[1.0], density=0.3, epsilon=0.1)
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert torch.equal(call([base + delta], base, weight=[1.0], density=0.0), base)
    assert torch.equal(call([base.clone()] * 2, base, weight=[1.0, 1.0], density=0.5), base)
    with pytest.raises(ValueError):
        call([base + delta], base, weight=[1.0], density=0.1, epsilon=0.1)


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
