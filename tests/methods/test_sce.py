"""sce: select high-variance elements, weight models by mean squared delta, erase disagreeing signs."""

from __future__ import annotations

import pytest
import torch

from splice.methods import _chunked, _kernels, get_method
from splice.methods import sce as sce_module
from splice.methods._sparsify import SORT_LIMIT

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


# --------------------------------------------------------------------------- the kernel path


def _bf16_models(rows, cols, k=3, seed=20, scale=0.1, ties=False):
    """bf16 base and fine-tunes; ``ties``: deltas of a handful of values, so variances tie at the threshold."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g).bfloat16()
    if ties:
        steps = [torch.randint(-2, 3, (rows, cols), generator=g).float() * 2**-5 for _ in range(k)]
    else:
        steps = [scale * torch.randn(rows, cols, generator=g) for _ in range(k)]
    return [(base.float() + s).bfloat16() for s in steps], base


def _same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.skipif(not _kernels.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["gauss", "bf16", "ties"])
def test_kernel_variance_is_torch_var(k, kind):
    ts, base = _bf16_models(1, 200_003, k=k, seed=k, ties=kind == "ties")
    if kind == "gauss":
        base, ts = base.float(), [base.float() + 1e-3 * rand(1, 200_003, seed=40 + i) for i in range(k)]
    stacked = torch.stack([t.float().reshape(-1) - base.float().reshape(-1) for t in ts])
    expected = torch.var(stacked, dim=0, unbiased=False)
    (*xs, b), shift = _chunked.bit_views([*ts, base])
    got = torch.empty(base.numel())
    assert _kernels.sce_variance(tuple(xs), b, shift, got.numpy()) == 0
    assert _same_bits(got, expected)


@pytest.mark.skipif(not _kernels.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 1e-5])
@pytest.mark.parametrize(
    "case",
    [
        dict(),  # bf16 deltas: few distinct variances, ties at the threshold
        dict(ties=True),  # deltas of five values: a handful of variances, every threshold a big tie
        dict(scale=1e-4),  # mean squares summing below 1e-6: uniform weights
        dict(k=1),  # one model: every variance 0, nothing selected
        dict(k=4, float32=True),
    ],
    ids=["bf16", "ties", "uniform", "one-model", "float32"],
)
def test_kernel_path_is_bit_identical_to_the_torch_path(select_topk, case, monkeypatch):
    case = dict(case)
    as_f32 = case.pop("float32", False)
    ts, base = _bf16_models(300, 1001, **case)  # above SORT_LIMIT
    if as_f32:
        base = base.float()
        ts = [base + 0.01 * rand(300, 1001, seed=60 + i) for i in range(len(ts))]
    assert base.numel() > SORT_LIMIT
    ran = _spy_kernel(monkeypatch)
    fast = call(ts, base, select_topk=select_topk)
    assert ran == [True]  # the kernel path made the result
    monkeypatch.setattr(_kernels, "AVAILABLE", False)
    slow = call([t.float() for t in ts], base.float(), select_topk=select_topk)  # as the engine called it before
    assert _same_bits(fast, slow)


@pytest.mark.skipif(not _kernels.AVAILABLE, reason="numba not installed")
def test_kernel_path_leaves_non_finite_inputs_to_the_torch_path(monkeypatch):
    ts, base = _bf16_models(300, 1001)
    ts[1] = ts[1].clone()
    ts[1][5, 7] = float("nan")
    ts[2][9, 9] = float("inf")
    ran = _spy_kernel(monkeypatch)
    for st in (1.0, 0.5):
        fast = call(ts, base, select_topk=st)
        with monkeypatch.context() as m:
            m.setattr(_kernels, "AVAILABLE", False)
            slow = call(ts, base, select_topk=st)
        assert _same_bits(fast, slow)
    assert ran == [False, False]  # the kernel path declined both


def _spy_kernel(monkeypatch) -> list[bool]:
    """Record whether each call of the kernel path produced the result."""
    ran = []
    real = sce_module._sce_kernel

    def spy(*args):
        out = real(*args)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(sce_module, "_sce_kernel", spy)
    return ran


@pytest.mark.skipif(not _kernels.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("select_topk", [0.5, 0.1])
def test_small_tensors_take_the_kernels_with_the_same_bits(select_topk, monkeypatch):
    ts, base = _bf16_models(40, 51, ties=True)  # below SORT_LIMIT: torch.topk selects, the kernels do the rest
    ran = _spy_kernel(monkeypatch)
    fast = call(ts, base, select_topk=select_topk)
    assert ran == [True]
    ts = [t.float() for t in ts]
    monkeypatch.setattr(_kernels, "AVAILABLE", False)
    assert _same_bits(fast, call(ts, base.float(), select_topk=select_topk))
