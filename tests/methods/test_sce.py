"""sce: select high-variance elements, weight models by mean squared delta, erase disagreeing signs."""

from __future__ import annotations

import pytest
import torch

from splice.methods import get_method

NAME = "sce"


def call(tensors, base, **params):
    return get_method(NAME).fn(list(tensors), base, **params)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference(tensors, base, select_topk=1.0):
    """Plain transcription in float64 with a stack, torch.var and a sort."""
    b = base.double().reshape(-1)
    tv = torch.stack([t.double().reshape(-1) - b for t in tensors])
    k_models, n = tv.shape
    if select_topk < 1:
        var = ((tv - tv.mean(0)) ** 2).mean(0)
        k = 0 if select_topk <= 0 else int(int((var != 0).sum()) * select_topk)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.sort(var, descending=True, stable=True).indices[:k]] = True
        tv = tv * keep
    energy = (tv**2).mean(1)
    w = [1.0 / k_models] * k_models if abs(float(energy.sum())) < 1e-6 else (energy / energy.sum()).tolist()
    out = []
    for j in range(n):
        vals = tv[:, j].tolist()
        positive = sum(vals) >= 0
        agree = [i for i, v in enumerate(vals) if v != 0 and (v > 0) == positive]
        num = sum(w[i] * vals[i] for i in agree)
        den = max(sum(w[i] for i in agree), 1e-6)
        out.append(float(b[j]) + num / den)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def test_registration_matches_mergekit():
    m = get_method(NAME)
    assert m.base == "required" and not m.randomized
    assert {p.name: (p.default, p.per_model) for p in m.params} == {
        "select_topk": (1.0, False),
        "int8_mask": (False, False),
    }


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.2, 0.0])
@pytest.mark.parametrize("scale", [1.0, 1e-4])  # 1e-4: energies sum below 1e-6 -> uniform weights
def test_against_formula(select_topk, scale):
    base = rand(4, 4, seed=1)
    ts = [base + scale * rand(4, 4, seed=s) for s in (2, 3, 4)]
    out = call(ts, base, select_topk=select_topk)
    torch.testing.assert_close(out.double(), reference(ts, base, select_topk), rtol=1e-5, atol=1e-6)


def test_properties():
    base = rand(6, 5, seed=5)
    delta = rand(6, 5, seed=6)
    # identical fine-tunes: all signs agree, base + delta; with selection, zero variance selects nothing
    torch.testing.assert_close(call([base + delta] * 3, base), base + delta)
    assert torch.equal(call([base + delta] * 3, base, select_topk=0.5), base)
    assert torch.equal(call([base.clone()] * 2, base), base)
    assert torch.equal(call([], base), base)
    v = rand(11, seed=7)  # 1-D
    ts = [v + rand(11, seed=8), v - rand(11, seed=9)]
    torch.testing.assert_close(call(ts, v, select_topk=0.6).double(), reference(ts, v, 0.6), rtol=1e-5, atol=1e-6)


def test_selection_keeps_highest_variance():
    base = torch.zeros(6)
    a = torch.tensor([1.0, 0.0, 5.0, 0.1, 3.0, 0.0])
    b = torch.tensor([-1.0, 0.0, -5.0, 0.1, 3.5, 0.2])
    # variances: 1, 0, 25, 0, 0.0625, 0.01 -> 4 non-zero, top half = elements 2 and 0
    out = call([a, b], base, select_topk=0.5)
    assert (out != 0).tolist() == [True, False, True, False, False, False]


@pytest.mark.mergekit
def test_parity_with_mergekit(mergekit):

    base = rand(33, 17, seed=12)
    for scale in (0.1, 1.0, None):
        if scale is None:  # bf16-valued models: quantized deltas, tied variances
            base = base.bfloat16().float()
            ts = [(base + 0.1 * rand(33, 17, seed=13 + i)).bfloat16().float() for i in range(3)]
        else:
            ts = [base + scale * rand(33, 17, seed=13 + i) for i in range(3)]
        for st in (1.0, 0.5, 0.1, 0.0):
            expected = mergekit.merge(
                "mergekit.merge_methods.registry:get", [base, *ts], base_index=0, parameters={"select_topk": st}, registry=NAME
            )
            torch.testing.assert_close(call(ts, base, select_topk=st), expected, rtol=1e-5, atol=1e-6)
