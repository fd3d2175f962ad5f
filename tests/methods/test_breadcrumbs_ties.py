"""breadcrumbs_ties: Breadcrumbs sparsification followed by TIES sign election."""

from __future__ import annotations

import pytest
import torch

from splice.methods import NO_DEFAULT, get_method

NAME = "breadcrumbs_ties"


def call(tensors, base, name=NAME, **params):
    m = get_method(name)
    kw = {}
    for p in m.params:
        v = params.pop(p.name, p.default)
        assert v is not NO_DEFAULT, p.name
        kw[p.py_name] = [v] * len(tensors) if p.per_model and not isinstance(v, list) else v
    assert not params
    return m.fn(list(tensors), base, **kw)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def crumbs(d, density, gamma, rescale=False):
    if density >= 1:
        return d
    n = d.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.sort(d.abs(), stable=True).indices[n_bot : n_bot + target]] = True
    out = torch.where(keep, d, torch.zeros_like(d))
    if rescale and d.abs().sum() >= 1e-7 and out.abs().sum() >= 1e-7:
        out = out * (d.abs().sum() / out.abs().sum())
    return out


def reference(tensors, base, weight, density, gamma, normalize=False, rescale=False, lam=1.0):
    b = base.double().reshape(-1)
    ds = [w * crumbs(t.double().reshape(-1) - b, p, g, rescale) for t, w, p, g in zip(tensors, weight, density, gamma)]
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
    assert m.base == "required" and not m.randomized
    spec = {p.name: (p.default, p.per_model) for p in m.params}
    assert spec == {
        "weight": (NO_DEFAULT, True),
        "density": (1.0, True),
        "gamma": (0.01, True),
        "normalize": (False, False),
        "rescale": (False, False),
        "lambda": (1.0, False),
        "int8_mask": (False, False),
    }


@pytest.mark.parametrize(
    "density,gamma,normalize,rescale",
    [([0.5, 0.75, 0.5], [0.125, 0.0625, 0.0], False, False), ([0.9, 0.3, 0.6], [0.3, 0.01, 0.2], True, True)],
)
def test_against_formula(density, gamma, normalize, rescale):
    base = rand(4, 4, seed=1)
    ts = [base + rand(4, 4, seed=s) for s in (2, 3, 4)]
    w = [0.8, -0.5, 1.0]
    out = call(ts, base, weight=w, density=density, gamma=gamma, normalize=normalize, rescale=rescale, **{"lambda": 0.9})
    expected = reference(ts, base, w, density, gamma, normalize, rescale, 0.9)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_density_one_is_sign_consensus():
    base = rand(5, 4, seed=5)
    ts = [base + rand(5, 4, seed=6), base - rand(5, 4, seed=7), base + rand(5, 4, seed=8)]
    out = call(ts, base, weight=[1.0, 0.5, 0.7], density=1.0, normalize=True)
    ties = call(ts, base, name="ties", weight=[1.0, 0.5, 0.7], density=1.0, normalize=True)
    assert torch.equal(out, ties)


def test_properties():
    base = rand(8, 5, seed=9)
    delta = rand(8, 5, seed=10)
    out = call([base + delta] * 2, base, weight=[1.0, 1.0], density=0.5, gamma=0.1, normalize=True)
    torch.testing.assert_close(out.double(), base.double() + crumbs(delta.double().reshape(-1), 0.5, 0.1).reshape(8, 5))
    assert torch.equal(call([base.clone()] * 2, base, weight=[1.0, 1.0], density=0.5), base)
    assert torch.equal(call([base + delta], base, weight=[1.0], density=0.0), base)
    v = rand(13, seed=11)
    ts = [v + rand(13, seed=12), v - rand(13, seed=13)]
    out = call(ts, v, weight=[1.0, 1.0], density=0.6, gamma=0.1)
    torch.testing.assert_close(out.double(), reference(ts, v, [1.0, 1.0], [0.6] * 2, [0.1] * 2))
    assert torch.isfinite(out).all()


@pytest.mark.mergekit
def test_parity_with_mergekit():
    base_mod = pytest.importorskip("mergekit.merge_methods.base")
    if not hasattr(base_mod, "TensorGroup"):
        pytest.skip("needs mergekit >= 0.1.5")
    from mergekit.merge_methods.registry import get

    base = rand(33, 17, seed=12)
    ts = [base + 0.1 * rand(33, 17, seed=13 + i) for i in range(3)]
    for quantize in (False, True):  # bf16-valued models: many exactly tied magnitudes
        if quantize:
            base, ts = base.bfloat16().float(), [t.bfloat16().float() for t in ts]
        check_parity(get, base_mod, base, ts)


def check_parity(get, base_mod, base, ts):
    for params in (
        {"weight": [1.0, 0.5, 0.7], "density": [0.8] * 3, "gamma": [0.05] * 3},
        {"weight": [1.0, -0.5, 0.7], "density": [0.8, 0.3, 0.9], "gamma": [0.05, 0.2, 0.5], "rescale": True, "normalize": True},
    ):
        group = base_mod.TensorGroup.from_tensors([base, *ts], base_index=0)
        (expected,) = get(NAME)((group,), parameters=params)
        torch.testing.assert_close(call(ts, base, **dict(params)), expected, rtol=1e-5, atol=1e-6)
