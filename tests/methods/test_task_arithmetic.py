"""task_arithmetic: base + lambda * sum_i w_i (t_i - base) [/ sum_i w_i]."""

from __future__ import annotations

import pytest
import torch

from splice.methods import NO_DEFAULT, get_method

NAME = "task_arithmetic"


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


def reference(tensors, base, weight, normalize=False, lam=1.0):
    """Element by element, float64."""
    b = base.double()
    out = torch.empty_like(b)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in b.shape]).reshape(-1, b.dim()).tolist():
        idx = tuple(idx)
        s = sum(w * (float(t[idx]) - float(b[idx])) for w, t in zip(weight, tensors))
        if normalize and abs(sum(weight)) >= 1e-8:
            s /= sum(weight)
        out[idx] = float(b[idx]) + lam * s
    return out


def test_registration_matches_mergekit():
    m = get_method(NAME)
    assert m.base == "required" and not m.randomized
    spec = {p.name: (p.default, p.per_model) for p in m.params}
    assert spec == {
        "weight": (NO_DEFAULT, True),
        "density": (1.0, True),
        "normalize": (False, False),
        "rescale": (False, False),
        "lambda": (1.0, False),
        "int8_mask": (False, False),
    }


@pytest.mark.parametrize("normalize", [False, True])
def test_against_formula(normalize):
    base = rand(4, 4, seed=1)
    ts = [base + rand(4, 4, seed=s) for s in (2, 3, 4)]
    w = [0.5, -0.2, 0.9]
    out = call(ts, base, weight=w, normalize=normalize, **{"lambda": 0.8})
    torch.testing.assert_close(out.double(), reference(ts, base, w, normalize, 0.8), rtol=1e-5, atol=1e-6)


def test_properties():
    base = rand(5, 3, seed=5)
    delta = rand(5, 3, seed=6)
    # identical fine-tunes, normalized: base + delta
    out = call([base + delta] * 3, base, weight=[0.2, 0.3, 0.5], normalize=True)
    torch.testing.assert_close(out, base + delta)
    # zero deltas: base
    assert torch.equal(call([base.clone(), base.clone()], base, weight=[0.7, 0.4]), base)
    # weights summing to ~0 are not divided by
    out = call([base + delta, base + delta], base, weight=[1.0, -1.0], normalize=True)
    torch.testing.assert_close(out, base)
    # no models: base
    assert torch.equal(call([], base, weight=[]), base)


def test_1d_and_finite():
    base = rand(7, seed=7)
    ts = [base + rand(7, seed=8), base + rand(7, seed=9)]
    out = call(ts, base, weight=[1.0, 0.5])
    torch.testing.assert_close(out.double(), reference(ts, base, [1.0, 0.5]), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out).all()


def test_inputs_untouched():
    base = rand(3, 3, seed=10)
    ts = [base + rand(3, 3, seed=11)]
    copies = [base.clone(), ts[0].clone()]
    call(ts, base, weight=[1.0])
    assert torch.equal(base, copies[0]) and torch.equal(ts[0], copies[1])


@pytest.mark.mergekit
def test_parity_with_mergekit():
    base_mod = pytest.importorskip("mergekit.merge_methods.base")
    if not hasattr(base_mod, "TensorGroup"):
        pytest.skip("needs mergekit >= 0.1.5")
    from mergekit.merge_methods.registry import get

    base = rand(16, 12, seed=12)
    ts = [base + 0.1 * rand(16, 12, seed=13 + i) for i in range(3)]
    for params in ({"weight": [0.5, 0.3, 0.7]}, {"weight": [1.0, -0.4, 0.2], "normalize": True, "lambda": 1.3}):
        group = base_mod.TensorGroup.from_tensors([base, *ts], base_index=0)
        (expected,) = get(NAME)((group,), parameters=params)
        torch.testing.assert_close(call(ts, base, **dict(params)), expected, rtol=1e-6, atol=1e-6)
