"""ties: against a plain transcription of TIES (trim, elect sign, disjoint merge), plus properties."""

from __future__ import annotations

import pytest
import torch

from splice.methods import NO_DEFAULT, get_method

NAME = "ties"


def call(tensors, base, **params):
    m = get_method(NAME)
    kw = {}
    for p in m.params:
        v = params.pop(p.name, p.default)
        assert v is not NO_DEFAULT, p.name
        kw[p.py_name] = [v] * len(tensors) if p.per_model and not isinstance(v, list) else v
    assert not params
    return m.fn(list(tensors), base, **kw)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def trim(d, density, rescale=False):
    """Keep the max(1, int(density*n)) largest |d| (stable sort: ties to the lower index)."""
    if density >= 1:
        return d
    n = d.numel()
    k = 0 if density <= 0 else max(1, int(density * n))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.sort(d.abs(), descending=True, stable=True).indices[:k]] = True
    out = torch.where(keep, d, torch.zeros_like(d))
    if rescale and d.abs().sum() >= 1e-7 and out.abs().sum() >= 1e-7:
        out = out * (d.abs().sum() / out.abs().sum())
    return out


def reference(tensors, base, weight, density, normalize=True, rescale=False, lam=1.0):
    b = base.double().reshape(-1)
    ds = [w * trim(t.double().reshape(-1) - b, dens, rescale) for t, w, dens in zip(tensors, weight, density)]
    out = []
    for j in range(b.numel()):
        vals = [float(d[j]) for d in ds]
        positive = sum(vals) >= 0
        agree = [i for i, v in enumerate(vals) if v != 0 and (v > 0) == positive]
        s = sum(vals[i] for i in agree)
        div = sum(weight[i] for i in agree)
        if normalize:
            s /= div if div != 0 else 1.0
        out.append(float(b[j]) + lam * s)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def test_registration_matches_mergekit():
    m = get_method(NAME)
    assert m.base == "required" and not m.randomized
    spec = {p.name: (p.default, p.per_model) for p in m.params}
    assert spec == {
        "weight": (NO_DEFAULT, True),
        "density": (1.0, True),
        "normalize": (True, False),
        "rescale": (False, False),
        "lambda": (1.0, False),
        "int8_mask": (False, False),
    }


@pytest.mark.parametrize(
    "weight,density,normalize,rescale,lam",
    [
        ([1.0, 0.6, 0.8], [0.5, 0.3, 0.7], True, False, 1.0),
        ([1.0, -0.6, 0.8], [0.25, 1.0, 0.1], True, True, 0.7),
        ([0.3, 0.3, 0.4], [0.6, 0.6, 0.6], False, False, 1.5),
    ],
)
def test_against_formula(weight, density, normalize, rescale, lam):
    base = rand(4, 4, seed=1)
    ts = [base + rand(4, 4, seed=s) for s in (2, 3, 4)]
    out = call(ts, base, weight=weight, density=density, normalize=normalize, rescale=rescale, **{"lambda": lam})
    close(out, reference(ts, base, weight, density, normalize, rescale, lam))


def test_density_one_is_sign_consensus_task_arithmetic_by_hand():
    base = torch.zeros(2)
    ts = [torch.tensor([1.0, -2.0]), torch.tensor([-3.0, 1.0]), torch.tensor([1.0, 1.0])]
    # column 0: sum -1 -> negative wins -> only -3 (weight 1) -> -3
    # column 1: sum 0 counts as positive -> 1 and 1 -> 2 / 2 = 1
    out = call(ts, base, weight=[1.0, 1.0, 1.0], density=1.0)
    assert out.tolist() == [-3.0, 1.0]
    out = call(ts, base, weight=[1.0, 1.0, 1.0], density=1.0, normalize=False)
    assert out.tolist() == [-3.0, 2.0]


def test_properties():
    base = rand(6, 5, seed=5)
    delta = rand(6, 5, seed=6)
    # identical fine-tunes: base + the trimmed delta, whatever the (positive) weights
    out = call([base + delta] * 3, base, weight=[0.2, 0.5, 2.0], density=0.4)
    close(out, base.double() + trim(delta.double().reshape(-1), 0.4).reshape(6, 5))
    # zero deltas and density 0: base
    assert torch.equal(call([base.clone(), base.clone()], base, weight=[1.0, 1.0], density=0.5), base)
    assert torch.equal(call([base + delta], base, weight=[1.0], density=0.0), base)
    assert torch.equal(call([], base, weight=[]), base)


def test_small_tensor_ties_resolve_like_mergekits_sort():
    base = torch.zeros(64)
    t = (torch.randint(-3, 4, (64,), generator=torch.Generator().manual_seed(0)) * 0.5).float()
    keep = torch.zeros(64, dtype=torch.bool)
    keep[torch.argsort(t.abs(), descending=True)[:25]] = True  # mergekit's trim, ties included
    out = call([t], base, weight=[1.0], density=25 / 64)
    assert torch.equal(out, torch.where(keep, t, torch.zeros_like(t)))


def magnitude_mask(t, base, density):
    from splice.methods._sparsify import magnitude_

    return magnitude_((t - base).reshape(-1), density) != 0


def test_1d_and_large_are_exact():
    base = rand(37, seed=7)
    ts = [base + rand(37, seed=8), base + rand(37, seed=9)]
    close(call(ts, base, weight=[1.0, 0.5], density=[0.3, 0.6]), reference(ts, base, [1.0, 0.5], [0.3, 0.6]))
    base = rand(200, 100, seed=10)
    ts = [base + 0.01 * rand(200, 100, seed=11 + i) for i in range(2)]
    out = call(ts, base, weight=[1.0, 1.0], density=0.2)
    b = base.double().reshape(-1)
    kept = [trim(t.double().reshape(-1) - b, 0.2) != 0 for t in ts]
    mine = [magnitude_mask(t, base, 0.2) for t in ts]
    for a, e in zip(mine, kept):
        assert torch.equal(a, e)
    assert torch.isfinite(out).all()


@pytest.mark.mergekit
def test_parity_with_mergekit():
    base_mod = pytest.importorskip("mergekit.merge_methods.base")
    if not hasattr(base_mod, "TensorGroup"):
        pytest.skip("needs mergekit >= 0.1.5")
    from mergekit.merge_methods.registry import get

    base = rand(33, 17, seed=12)
    ts = [base + 0.1 * rand(33, 17, seed=13 + i) for i in range(3)]
    # bf16-valued models: deltas take few distinct values, so magnitudes tie at the threshold
    cases = [(ts, base), ([t.bfloat16().float() for t in ts], base.bfloat16().float())]
    for (ts, base), params in [
        (c, p)
        for c in cases
        for p in (
            {"weight": [1.0, 0.6, 0.8], "density": [0.5, 0.3, 0.7]},
            {"weight": [1.0, -0.6, 0.8], "density": [0.5, 0.3, 0.7], "rescale": True, "lambda": 0.7},
            {"weight": [0.2, 0.6, 0.8], "density": [1.0, 0.05, 0.9], "normalize": False},
        )
    ]:
        group = base_mod.TensorGroup.from_tensors([base, *ts], base_index=0)
        (expected,) = get(NAME)((group,), parameters=params)
        torch.testing.assert_close(call(ts, base, **dict(params)), expected, rtol=1e-5, atol=1e-6)
