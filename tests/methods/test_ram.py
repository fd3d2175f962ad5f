"""ram and ramplus_tl: against element-by-element float64 transcriptions, plus properties and mergekit parity."""

from __future__ import annotations

import pytest
import torch

from splice.methods import get_method


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sparse_fts(base, seeds, keep=0.5, scale=0.1):
    """Fine-tunes that each change a random part of the base (so counts of 0, 1, 2, 3 all occur)."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        mask = torch.rand(base.shape, generator=g) < keep
        out.append(base + scale * torch.randn(base.shape, generator=g) * mask)
    return out


def reference(tensors, base, epsilon, r=None, alpha=None):
    """The paper's RAM (r None) or RAM+ tensor-local, element by element, float64."""
    b = base.double().reshape(-1).tolist()
    ds = [[x - y for x, y in zip(t.double().reshape(-1).tolist(), b)] for t in tensors]
    n = len(b)
    counts = [sum(1 for d in ds if abs(d[j]) > epsilon) for j in range(n)]
    lams = []
    for d in ds:
        if r is None:
            lams.append(1.0)
            continue
        shared = sum(1 for j in range(n) if abs(d[j]) > epsilon and counts[j] > 1)
        unique = sum(1 for j in range(n) if abs(d[j]) > epsilon and counts[j] == 1)
        rho = shared / max(unique, epsilon) if unique else 0.0  # no unique element: lambda is never used
        lams.append(1 + r * min(max(rho, 0.0), alpha))
    out = []
    for j in range(n):
        acc = 0.0
        for d, lam in zip(ds, lams):
            if abs(d[j]) <= epsilon:
                continue
            acc += d[j] * lam if counts[j] == 1 else d[j] / counts[j]
        out.append(b[j] + acc)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def close(actual, expected):
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)


def test_registration_matches_mergekit():
    ram, plus = get_method("ram"), get_method("ramplus_tl")
    for m in (ram, plus):
        assert m.base == "required" and not m.randomized
        assert all(not p.per_model for p in m.params)
    assert [(p.name, p.default) for p in ram.params] == [("epsilon", 1e-5)]
    assert [(p.name, p.default) for p in plus.params] == [("r", 0.1), ("alpha", 0.2), ("epsilon", 1e-5)]


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (9,), (2, 3, 4)])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("epsilon", [1e-5, 0.05, 0.0])
def test_ram_matches_reference(shape, k, epsilon):
    base = rand(*shape, seed=1)
    ts = sparse_fts(base, range(10, 10 + k))
    close(get_method("ram")(ts, base, epsilon=epsilon), reference(ts, base, epsilon))


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (9,), (2, 3, 4)])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("r,alpha,epsilon", [(0.1, 0.2, 1e-5), (1.0, 5.0, 0.05), (0.5, 0.0, 1e-5), (0.0, 0.2, 1e-5), (2.0, 1.0, 0.0)])
def test_ramplus_matches_reference(shape, k, r, alpha, epsilon):
    base = rand(*shape, seed=2)
    ts = sparse_fts(base, range(20, 20 + k), keep=0.6)
    out = get_method("ramplus_tl")(ts, base, r=r, alpha=alpha, epsilon=epsilon)
    close(out, reference(ts, base, epsilon, r, alpha))


def test_known_values():
    base = torch.zeros(5)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0, 1e-6])
    b = torch.tensor([3.0, 0.0, 0.0, 4.0, 0.0])
    # counts: 2, 1, 0, 1, 0 (1e-6 is below epsilon) -> means where shared, whole where unique
    close(get_method("ram")([a, b], base), torch.tensor([2.0, 2.0, 0.0, 4.0, 0.0], dtype=torch.float64))
    # ramplus: a has 1 shared, 1 unique -> rho 1 -> lambda 1 + 0.1 * 0.2; b the same
    lam = 1 + 0.1 * 0.2
    close(get_method("ramplus_tl")([a, b], base), torch.tensor([2.0, 2.0 * lam, 0.0, 4.0 * lam, 0.0], dtype=torch.float64))


def test_properties():
    base = rand(4, 4, seed=3)
    ft = base + 0.1 * rand(4, 4, seed=4)
    for name in ("ram", "ramplus_tl"):
        m = get_method(name)
        close(m([ft, ft.clone(), ft.clone()], base), ft.double())  # identical fine-tunes give the fine-tune
        assert torch.equal(m([base.clone(), base.clone()], base), base)  # zero deltas give the base
        close(m([ft], base), ft.double())  # one model: its own delta (no overlap, rho = 0)
        b0, f0 = base.clone(), ft.clone()
        m([ft, base + 0.2], base)
        assert torch.equal(base, b0) and torch.equal(ft, f0)


def test_float64_in_float64_out():
    base = rand(3, 5, seed=5)
    ts = sparse_fts(base, (6, 7))
    out = get_method("ram")([t.double() for t in ts], base.double())
    assert out.dtype == torch.float64
    close(out, reference(ts, base, 1e-5))


def test_errors():
    x = torch.ones(4)
    with pytest.raises(ValueError, match="needs a base model"):
        get_method("ram")([x], None)
    with pytest.raises(ValueError, match="parameter 'epsilon' must be a number >= 0"):
        get_method("ram")([x], x, epsilon=-1.0)
    with pytest.raises(ValueError, match="parameter 'alpha' must be a number >= 0"):
        get_method("ramplus_tl")([x], x, alpha=-0.5)
    with pytest.raises(ValueError, match="parameter 'r' must be a number >= 0"):
        get_method("ramplus_tl")([x], x, r=float("nan"))


@pytest.mark.mergekit
@pytest.mark.parametrize(
    "name,params", [("ram", {}), ("ram", {"epsilon": 0.05}), ("ramplus_tl", {}), ("ramplus_tl", {"r": 1.0, "alpha": 3.0, "epsilon": 0.0})]
)
def test_parity_with_mergekit(mergekit, name, params):
    fn = {"ram": "mergekit.merge_methods.ram:ram_merge", "ramplus_tl": "mergekit.merge_methods.ram:ramplus_tl_merge"}[name]
    base = rand(6, 7, seed=8)
    ts = sparse_fts(base, (30, 31, 32))
    expected = mergekit.merge(fn, [base, *ts], base_index=0, parameters=params)
    torch.testing.assert_close(get_method(name)(ts, base, **params), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.mergekit
def test_mergekit_writes_nan_where_splice_takes_rho_as_zero(mergekit):
    """ramplus_tl with epsilon 0 and a model that changes nothing: mergekit's 0/0 ratio is NaN everywhere."""
    base = rand(3, 4, seed=9)
    ts = [base.clone(), base + 1.0]
    theirs = mergekit.merge("mergekit.merge_methods.ram:ramplus_tl_merge", [base, *ts], base_index=0, parameters={"epsilon": 0.0})
    assert torch.isnan(theirs).all()
    close(get_method("ramplus_tl")(ts, base, epsilon=0.0), reference(ts, base, 0.0, 0.1, 0.2))
