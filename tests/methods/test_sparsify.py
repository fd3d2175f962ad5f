"""The selection and sparsification helpers behind ties / dare / breadcrumbs / della.

References use a full stable sort, so they are independent of the kthvalue-based
selection under test.
"""

from __future__ import annotations

import pytest
import torch

from splice.methods._sparsify import (
    SORT_LIMIT,
    breadcrumbs_,
    della_,
    magnitude_,
    random_,
    topk_mask,
)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sorted_topk(v: torch.Tensor, k: int) -> torch.Tensor:
    flat = v.reshape(-1)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return keep.reshape(v.shape)


def sorted_window(v: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    flat = v.reshape(-1)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[start:stop]] = True
    return keep.reshape(v.shape)


def mergekit_topk(v: torch.Tensor, k: int) -> torch.Tensor:
    """The mask mergekit's sce builds: torch.topk's choice, ties included."""
    keep = torch.zeros(v.numel(), dtype=torch.bool)
    keep[torch.topk(v.reshape(-1), k).indices] = True
    return keep.reshape(v.shape)


@pytest.mark.parametrize("seed", range(4))
def test_topk_mask_small_is_torch_topk_large_is_stable_sort(seed):
    g = torch.Generator().manual_seed(seed)
    distinct = torch.rand(7, 9, generator=g)
    tied = torch.randint(0, 4, (7, 9), generator=g).float()  # many exact ties
    for v in (distinct, tied):
        for k in range(0, v.numel() + 2):
            m = topk_mask(v, k)
            assert m.shape == v.shape and m.dtype == torch.bool
            assert torch.equal(m, mergekit_topk(v, min(max(k, 0), v.numel()))), k
            if v is distinct:
                assert torch.equal(m, sorted_topk(v, k)), k
    if seed == 0:
        big = torch.randint(0, 50, (SORT_LIMIT + 1000,), generator=g).float()  # sampled-bracket path
        for k in (1, 150_000, SORT_LIMIT):
            assert torch.equal(topk_mask(big, k), sorted_topk(big, k)), k


def test_small_tensors_resolve_ties_with_mergekits_own_sort():
    g = torch.Generator().manual_seed(11)
    d = (torch.randint(-6, 7, (2000,), generator=g) * 0.25).float()  # heavy ties
    for density in (0.1, 0.45, 0.8):
        k = max(1, int(density * d.numel()))
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[torch.argsort(d.abs(), descending=True)[:k]] = True  # mergekit's magnitude()
        assert torch.equal(magnitude_(d.clone(), density), torch.where(keep, d, torch.zeros_like(d)))
    for density, gamma in ((0.5, 0.1), (0.7, 0.2)):
        target, n_top = int(density * 2000), int(gamma * 2000)
        start = 2000 - target - n_top
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[torch.sort(d.abs(), descending=False).indices[start : start + target]] = True  # magnitude_outliers()
        assert torch.equal(breadcrumbs_(d.clone(), density, gamma), torch.where(keep, d, torch.zeros_like(d)))


def test_breadcrumbs_window_on_large_tensors_matches_stable_sort_even_with_ties():
    n = SORT_LIMIT + 4000  # sampled-bracket path
    g = torch.Generator().manual_seed(0)
    tied = (torch.randint(-3, 4, (n,), generator=g) * 0.5).float()  # many exact ties, zeros too
    distinct = torch.randn(n, generator=g)
    for d, configs in ((tied, [(0.5, 0.1), (0.2, 0.0)]), (distinct, [(0.3, 0.5)])):
        order = torch.sort(d.abs(), stable=True).indices
        for i, (density, gamma) in enumerate(configs):
            target, n_top = int(density * n), int(gamma * n)
            start = max(0, n - target - n_top)
            keep = torch.zeros(n, dtype=torch.bool)
            keep[order[start : start + target]] = True
            expected = torch.where(keep, d, torch.zeros_like(d))
            scratch = torch.empty_like(d) if i % 2 == 0 else None
            assert torch.equal(breadcrumbs_(d.clone(), density, gamma, scratch=scratch), expected), (density, gamma)


def test_magnitude_leaves_zero_ties_alone():
    d = torch.tensor([0.0, 0.0, 0.0, 1.0, -2.0])
    assert torch.equal(magnitude_(d.clone(), 0.6), d)  # k = 3 reaches into the zeros: nothing to drop


def test_magnitude_keeps_int_density_n_at_least_one():
    d = rand(10, 10, seed=1)
    for density, k in [(0.37, 37), (0.999, 99), (0.001, 1), (0.5, 50)]:
        out = magnitude_(d.clone(), density)
        assert int(torch.count_nonzero(out)) == k
        assert torch.equal(out != 0, sorted_topk(d.abs(), k))
        assert torch.equal(out[out != 0], d[out != 0])
    assert torch.equal(magnitude_(d.clone(), 1.0), d)
    assert torch.equal(magnitude_(d.clone(), 0.0), torch.zeros_like(d))


def test_magnitude_rescale_matches_l1_norm():
    d = rand(6, 8, seed=2)
    out = magnitude_(d.clone(), 0.25, rescale=True)
    assert torch.isclose(out.abs().sum(), d.abs().sum(), rtol=1e-5)
    kept = sorted_topk(d.abs(), 12)
    ratio = d.abs().sum() / d[kept].abs().sum()
    torch.testing.assert_close(out[kept], d[kept] * ratio)


def test_breadcrumbs_window():
    d = rand(100, seed=3)
    order = torch.sort(d.abs(), stable=True).indices
    out = breadcrumbs_(d.clone(), 0.8, 0.05)
    keep = torch.zeros(100, dtype=torch.bool)
    keep[order[15:95]] = True  # drop 15 smallest, 5 largest
    assert torch.equal(out != 0, keep)
    # density + gamma > 1: fewer outliers dropped, still int(density*n) kept
    out = breadcrumbs_(d.clone(), 0.9, 0.3)
    keep = torch.zeros(100, dtype=torch.bool)
    keep[order[0:90]] = True
    assert torch.equal(out != 0, keep)
    assert torch.equal(breadcrumbs_(d.clone(), 1.0, 0.5), d)  # density 1: untouched, gamma ignored
    assert torch.equal(breadcrumbs_(d.clone(), 0.0, 0.01), torch.zeros_like(d))


def test_random_keeps_density_fraction_and_rescales():
    d = rand(200, 200, seed=4)
    g = torch.Generator().manual_seed(0)
    out = random_(d.clone(), 0.3, rescale=False, generator=g)
    frac = float(torch.count_nonzero(out)) / d.numel()
    assert abs(frac - 0.3) < 0.01
    out = random_(d.clone(), 0.3, rescale=True, generator=g)
    assert torch.isclose(out.abs().sum(), d.abs().sum(), rtol=1e-5)
    assert torch.equal(random_(d.clone(), 1.0, True, g), d)
    assert torch.equal(random_(d.clone(), 0.0, True, g), torch.zeros_like(d))


def test_della_keep_probability_rises_with_rank():
    rows, cols = 4000, 5
    # every row holds magnitudes 1..5 in a shuffled order, random signs
    g = torch.Generator().manual_seed(5)
    mags = torch.stack([torch.randperm(cols, generator=g) for _ in range(rows)]).float() + 1
    d = mags * torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0)
    out = della_(d.clone(), 0.5, 0.2, rescale=False, generator=torch.Generator().manual_seed(1))
    for rank in range(cols):
        sel = mags == rank + 1
        kept = float(torch.count_nonzero(out[sel])) / int(sel.sum())
        expected = 0.5 - 0.2 + 2 * 0.2 * rank / (cols - 1)
        assert abs(kept - expected) < 0.03, (rank, kept, expected)
    assert torch.equal(out[out != 0], d[out != 0])


def test_della_edges():
    d = rand(3, 4, seed=6)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(della_(d.clone(), 1.0, 0.1, True, g), d)
    assert torch.equal(della_(d.clone(), 0.0, 0.1, True, g), torch.zeros_like(d))
    with pytest.raises(ValueError, match=r"density=0.9, epsilon=0.15"):
        della_(d.clone(), 0.9, 0.15, True, g)
    with pytest.raises(ValueError, match=r"density=0.1, epsilon=0.15"):
        della_(d.clone(), 0.1, 0.15, True, g)
    one_col = della_(rand(50, 1, seed=7), 0.5, 0.1, True, g)  # rows of one element use density
    assert torch.isfinite(one_col).all()
    vec = della_(rand(64, seed=8), 0.5, 0.1, True, g)  # 1-D: one row
    assert vec.shape == (64,) and torch.isfinite(vec).all()


@pytest.mark.parametrize("kind", ["normal", "ties", "skewed"])
def test_kth_smallest_on_large_tensors_is_exact(kind):
    from splice.methods._sparsify import kth_smallest

    g = torch.Generator().manual_seed(9)
    n = 300_001  # above the size where the sampled bracket is used
    if kind == "normal":
        v = torch.randn(n, generator=g).abs()
    elif kind == "ties":
        v = torch.randint(0, 4, (n,), generator=g).float()
    else:  # most of the mass at zero, as in sparse deltas
        v = torch.where(torch.rand(n, generator=g) < 0.9, 0.0, torch.rand(n, generator=g))
    ordered = torch.sort(v).values
    for k in (1, 17, n // 3, n - 1000, n):
        assert kth_smallest(v, k) == ordered[k - 1], k


@pytest.mark.parametrize("density", [0.05, 0.77])
def test_magnitude_with_quantized_ties_on_large_tensor(density):
    """bf16-like deltas: few distinct magnitudes, so ties straddle the threshold."""
    g = torch.Generator().manual_seed(10)
    n = SORT_LIMIT + 30_000  # sampled-bracket path
    d = (torch.randint(-40, 41, (n,), generator=g).float() / 64).to(torch.bfloat16).float()
    k = max(1, int(density * n))
    expected = torch.where(sorted_topk(d.abs(), k), d, torch.zeros_like(d))
    assert torch.equal(magnitude_(d.clone(), density), expected)
    out = magnitude_(d.clone(), density, scratch=torch.empty_like(d))
    assert torch.equal(out, expected)
