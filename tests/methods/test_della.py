"""della: MagPrune (rank-dependent random drop) + L1 rescale, then TIES sign election."""

from __future__ import annotations

import pytest
import torch

from splice.methods import NO_DEFAULT, get_method

NAME = "della"


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
    """Along dim 1 (1-D: one row): the element of ascending-magnitude rank j is kept iff
    u[..., j, ...] < p_j, p_j = density - eps + 2 eps j / (n - 1) (the documented use of
    one torch.rand per model)."""
    shaped = d.reshape(1, -1) if d.dim() < 2 else d
    n = shaped.shape[1]
    moved = shaped.movedim(1, -1)
    rows = moved.reshape(-1, n)
    u = u.reshape(shaped.shape).movedim(1, -1).reshape(-1, n)
    out = torch.zeros_like(rows)
    for r in range(rows.shape[0]):
        order = torch.sort(rows[r].abs(), stable=True).indices.tolist()
        for j, col in enumerate(order):
            p = density - eps + 2 * eps * j / (n - 1)
            if float(u[r, j]) < p:
                out[r, col] = rows[r, col]
    out = out.reshape(moved.shape).movedim(-1, 1).reshape(d.shape)
    if rescale and d.abs().sum() >= 1e-7 and out.abs().sum() >= 1e-7:
        out = out * (d.abs().sum() / out.abs().sum())
    return out


def reference(tensors, base, weight, density, epsilon, seed, normalize=True, rescale=True, lam=1.0):
    g = torch.Generator().manual_seed(seed)
    b = base.double()
    ds = []
    for t, w, p, e in zip(tensors, weight, density, epsilon):
        d = t.double() - b
        if p < 1:
            d = magprune(d, p, e, torch.rand(base.shape, generator=g), rescale)
        ds.append((w * d).reshape(-1))
    flat = []
    for j in range(b.numel()):
        vals = [float(d[j]) for d in ds]
        positive = sum(vals) >= 0
        agree = [i for i, v in enumerate(vals) if v != 0 and (v > 0) == positive]
        s = sum(vals[i] for i in agree)
        if normalize:
            div = sum(weight[i] for i in agree)
            s /= div if div != 0 else 1.0
        flat.append(s)
    return b + lam * torch.tensor(flat, dtype=torch.float64).reshape(base.shape)


def test_registration_matches_mergekit():
    m = get_method(NAME)
    assert m.base == "required" and m.randomized
    spec = {p.name: (p.default, p.per_model) for p in m.params}
    assert spec == {
        "weight": (NO_DEFAULT, True),
        "density": (1.0, True),
        "epsilon": (0.15, True),
        "normalize": (True, False),
        "rescale": (True, False),
        "lambda": (1.0, False),
        "int8_mask": (False, False),
    }


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (7,)])
def test_against_formula(shape):
    base = rand(*shape, seed=1)
    ts = [base + rand(*shape, seed=s) for s in (2, 3, 4)]
    w, dens, eps = [0.8, 0.5, 1.0], [0.5, 0.4, 0.7], [0.2, 0.1, 0.15]
    out = call(ts, base, seed=5, weight=w, density=dens, epsilon=eps, **{"lambda": 1.2})
    torch.testing.assert_close(out.double(), reference(ts, base, w, dens, eps, 5, lam=1.2), rtol=1e-5, atol=1e-6)


def test_density_one_equals_ties():
    base = rand(6, 7, seed=2)
    ts = [base + rand(6, 7, seed=3), base - rand(6, 7, seed=4)]
    out = call(ts, base, weight=[0.4, 0.9], density=1.0)
    assert torch.equal(out, call(ts, base, name="ties", weight=[0.4, 0.9], density=1.0))


def test_keep_rate_and_rescale():
    base = rand(400, 50, seed=5)
    delta = rand(400, 50, seed=6)
    out = call([base + delta], base, seed=3, weight=[1.0], density=0.4, epsilon=0.2)
    moved = (out - base).double()
    assert abs(float((moved != 0).double().mean()) - 0.4) < 0.01
    assert abs(float(moved.abs().sum() / delta.double().abs().sum()) - 1) < 1e-4
    # the largest-magnitude fifth of each row is kept far more often than the smallest fifth
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    top = float((moved[ranks >= 40] != 0).double().mean())
    bottom = float((moved[ranks < 10] != 0).double().mean())
    assert abs(top - 0.56) < 0.03 and abs(bottom - 0.24) < 0.03


def test_seeded_and_edges():
    base = rand(20, 6, seed=7)
    ts = [base + rand(20, 6, seed=8), base + rand(20, 6, seed=9)]
    kw = dict(weight=[1.0, 1.0], density=0.5)
    a, b, c = call(ts, base, seed=1, **kw), call(ts, base, seed=1, **kw), call(ts, base, seed=2, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()
    with pytest.raises(ValueError):
        call(ts, base, weight=[1.0, 1.0], density=0.9, epsilon=0.15)
    assert torch.equal(call([base + 1], base, weight=[1.0], density=0.0), base)
    assert torch.equal(call([base.clone()] * 2, base, **kw), base)
    col = rand(9, 1, seed=10)  # rows of a single element
    assert torch.isfinite(call([col + 1], col, weight=[1.0], density=0.5)).all()
    cube = rand(2, 6, 3, seed=11)  # 3-D: ranks along dim 1, as mergekit's argsort(dim=1)
    out = call([cube + rand(2, 6, 3, seed=12)], cube, seed=4, weight=[1.0], density=0.5, epsilon=0.2)
    torch.testing.assert_close(out.double(), reference([cube + rand(2, 6, 3, seed=12)], cube, [1.0], [0.5], [0.2], 4))


@pytest.mark.mergekit
def test_parity_with_mergekit_on_deterministic_path():
    base_mod = pytest.importorskip("mergekit.merge_methods.base")
    if not hasattr(base_mod, "TensorGroup"):
        pytest.skip("needs mergekit >= 0.1.5")
    from mergekit.merge_methods.registry import get

    base = rand(16, 12, seed=12)
    ts = [base + 0.1 * rand(16, 12, seed=13 + i) for i in range(3)]
    for params in ({"weight": [0.5, -0.3, 0.7]}, {"weight": [0.5, 0.3, 0.7], "normalize": False, "lambda": 1.2}):
        group = base_mod.TensorGroup.from_tensors([base, *ts], base_index=0)
        (expected,) = get(NAME)((group,), parameters=params)
        torch.testing.assert_close(call(ts, base, **dict(params)), expected, rtol=1e-6, atol=1e-6)
