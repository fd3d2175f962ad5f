"""breadcrumbs: drop the largest outliers and the smallest entries of each task vector, then sum."""

from __future__ import annotations

import pytest
import torch

from splice.methods import NO_DEFAULT, get_method

NAME = "breadcrumbs"


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
    """Sort |d| ascending (stable); keep positions n_bot .. n_bot+int(density*n)."""
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
    total = torch.zeros_like(b)
    for t, w, p, g in zip(tensors, weight, density, gamma):
        total += w * crumbs(t.double().reshape(-1) - b, p, g, rescale)
    if normalize and abs(sum(weight)) >= 1e-8:
        total /= sum(weight)
    return (b + lam * total).reshape(base.shape)


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
    [([0.5, 0.75], [0.125, 0.0625], False, False), ([0.9, 0.3], [0.3, 0.01], True, True), ([1.0, 0.0], [0.2, 0.2], False, True)],
)
def test_against_formula(density, gamma, normalize, rescale):
    base = rand(4, 4, seed=1)
    ts = [base + rand(4, 4, seed=2), base + rand(4, 4, seed=3)]
    w = [0.8, 0.5]
    out = call(ts, base, weight=w, density=density, gamma=gamma, normalize=normalize, rescale=rescale, **{"lambda": 1.1})
    expected = reference(ts, base, w, density, gamma, normalize, rescale, 1.1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_drops_outliers_and_small():
    base = torch.zeros(10)
    t = torch.arange(1.0, 11.0) * torch.tensor([1, -1] * 5)  # |t| = 1..10
    out = call([t], base, weight=[1.0], density=0.6, gamma=0.2)  # drop 2 largest and 2 smallest
    assert out.abs().tolist() == [0, 0, 3, 4, 5, 6, 7, 8, 0, 0]
    assert torch.equal(out[2:8], t[2:8])


def test_properties():
    base = rand(8, 5, seed=4)
    delta = rand(8, 5, seed=5)
    out = call([base + delta] * 3, base, weight=[0.5, 0.25, 0.25], density=0.5, gamma=0.1)  # weights sum to 1
    torch.testing.assert_close(out.double(), base.double() + crumbs(delta.double().reshape(-1), 0.5, 0.1).reshape(8, 5))
    assert torch.equal(call([base.clone()] * 2, base, weight=[1.0, 1.0], density=0.5), base)
    assert torch.equal(call([base + delta], base, weight=[1.0], density=0.0), base)
    # density 1: nothing dropped, gamma ignored (as in mergekit)
    torch.testing.assert_close(call([base + delta], base, weight=[1.0], density=1.0, gamma=0.3), base + delta)
    v = rand(13, seed=6)  # 1-D
    out = call([v + rand(13, seed=7)], v, weight=[1.0], density=0.5, gamma=0.1)
    torch.testing.assert_close(out.double(), reference([v + rand(13, seed=7)], v, [1.0], [0.5], [0.1]))


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
        {"weight": [1.0, 0.5, 0.7], "density": [0.8, 0.3, 0.9], "gamma": [0.05, 0.2, 0.5], "rescale": True, "normalize": True},
    ):
        group = base_mod.TensorGroup.from_tensors([base, *ts], base_index=0)
        (expected,) = get(NAME)((group,), parameters=params)
        torch.testing.assert_close(call(ts, base, **dict(params)), expected, rtol=1e-5, atol=1e-6)
