"""RegMean against a float64 transcription of Jin et al. 2023 eq. (2), and its exactness properties."""

from __future__ import annotations

import pytest
import torch

from splice.methods import get_method
from splice.methods import regmean as rm

OUT, IN = 5, 6


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gram(seed, tokens=20, dim=IN):
    x = rand(tokens, dim, seed=seed)
    return x.T @ x / tokens


def reference(ws, grams, alpha, weights=None):
    """W = (sum_i G_i')^-1 sum_i G_i' W_i^T, G_i' = G_i with off-diagonals times alpha; written out directly."""
    weights = weights or [1.0] * len(ws)
    a = torch.zeros(IN, IN, dtype=torch.float64)
    b = torch.zeros(IN, OUT, dtype=torch.float64)
    for w, g, c in zip(ws, grams, weights):
        gp = torch.empty_like(g)
        for i in range(IN):
            for j in range(IN):
                gp[i, j] = g[i, j] if i == j else alpha * g[i, j]
        a += c * gp
        b += c * gp @ w.T
    return torch.linalg.solve(a, b).T


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_matches_the_formula(alpha):
    ws = [rand(OUT, IN, seed=s) for s in (1, 2, 3)]
    grams = [gram(s) for s in (4, 5, 6)]
    out = get_method("regmean")(ws, None, alpha=alpha, statistics=grams)
    torch.testing.assert_close(out, reference(ws, grams, alpha), rtol=1e-10, atol=1e-10)


def test_weights_scale_the_grams():
    ws = [rand(OUT, IN, seed=s) for s in (1, 2)]
    grams = [gram(s) for s in (4, 5)]
    out = get_method("regmean")(ws, None, weight=[0.3, 1.2], statistics=grams)
    torch.testing.assert_close(out, reference(ws, grams, 0.9, [0.3, 1.2]), rtol=1e-10, atol=1e-10)


def test_with_a_base_is_the_same_solve_on_task_vectors():
    base = rand(OUT, IN, seed=0)
    ws = [base + 0.01 * rand(OUT, IN, seed=s) for s in (1, 2, 3)]
    grams = [gram(s) for s in (4, 5, 6)]
    with_base = get_method("regmean")(ws, base, statistics=grams)
    torch.testing.assert_close(with_base, reference(ws, grams, 0.9), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.9, 1.0])
def test_identical_statistics_give_linear(alpha):
    ws = [rand(OUT, IN, seed=s) for s in (1, 2, 3)]
    g = gram(7)
    out = get_method("regmean")(ws, None, alpha=alpha, statistics=[g, g, g])
    torch.testing.assert_close(out, get_method("linear")(ws, None, weight=1.0), rtol=1e-10, atol=1e-10)
    weighted = get_method("regmean")(ws, None, alpha=alpha, weight=[1.0, 2.0, 0.5], statistics=[g, g, g])
    torch.testing.assert_close(weighted, get_method("linear")(ws, None, weight=[1.0, 2.0, 0.5]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_disjoint_input_subspaces_reproduce_each_expert_there(alpha):
    ws = [rand(OUT, IN, seed=s) for s in (1, 2)]
    k = IN // 2
    x1 = torch.zeros(30, IN, dtype=torch.float64)
    x2 = torch.zeros(30, IN, dtype=torch.float64)
    x1[:, :k] = rand(30, k, seed=8)
    x2[:, k:] = rand(30, IN - k, seed=9)
    out = get_method("regmean")(ws, None, alpha=alpha, statistics=[x1.T @ x1, x2.T @ x2])
    torch.testing.assert_close(out[:, :k], ws[0][:, :k], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[:, k:], ws[1][:, k:], rtol=1e-10, atol=1e-10)
    # and each merged layer gives each expert's outputs on that expert's inputs
    torch.testing.assert_close(x1 @ out.T, x1 @ ws[0].T, rtol=1e-9, atol=1e-9)


def test_alpha_zero_is_a_column_weighted_average():
    ws = [rand(OUT, IN, seed=s) for s in (1, 2, 3)]
    grams = [gram(s) for s in (4, 5, 6)]
    d = torch.stack([g.diagonal() for g in grams])  # [models, in]
    expect = sum(w * d[i] for i, w in enumerate(ws)) / d.sum(0)  # column j weighted by each model's G_jj
    out = get_method("regmean")(ws, None, alpha=0.0, statistics=grams)
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-10)


def test_embedding_rows_are_weighted_by_token_counts_and_unseen_rows_fall_back():
    ws = [rand(4, 3, seed=s) for s in (1, 2)]
    counts = [torch.tensor([3.0, 0.0, 1.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64)]
    out = get_method("regmean")(ws, None, statistics=counts)
    torch.testing.assert_close(out[0], (3 * ws[0][0] + ws[1][0]) / 4)
    torch.testing.assert_close(out[1], ws[1][1])
    torch.testing.assert_close(out[2], ws[0][2])
    torch.testing.assert_close(out[3], (ws[0][3] + ws[1][3]) / 2)  # no model saw it: linear


def test_tensors_without_statistics_fall_back_to_linear():
    ws = [rand(7, seed=s).float() for s in (1, 2)]
    out = get_method("regmean")(ws, None, weight=[1.0, 3.0])
    assert rm.FALLBACK_METHOD == "linear"
    torch.testing.assert_close(out, get_method("linear")(ws, None, weight=[1.0, 3.0]))
    assert out.dtype == torch.float32


def jittered_reference(ws, grams):
    """The solve with the first jitter (a share of the mean diagonal) that makes the system well conditioned."""
    a = sum(grams)
    eye = torch.eye(IN, dtype=torch.float64)
    for k in range(rm.JITTER_TRIES):
        j = rm.JITTER * rm.JITTER_GROWTH**k * float(a.diagonal().mean())
        f, info = torch.linalg.cholesky_ex(a + j * eye)
        if info == 0 and float(f.diagonal().min()) ** 2 >= rm.PIVOT_FLOOR * float(a.diagonal().mean()):
            break
    return torch.linalg.solve(a + j * eye, sum(g @ w.T for g, w in zip(grams, ws))).T


def test_a_gram_with_a_dead_input_is_solved_with_jitter():
    ws = [rand(OUT, IN, seed=s) for s in (1, 2)]
    xs = [rand(20, IN, seed=s) for s in (4, 5)]
    for x in xs:
        x[:, -1] = 0  # no token reaches the last input: a zero row and column, Cholesky fails outright
    grams = [x.T @ x for x in xs]
    assert torch.linalg.cholesky_ex(sum(grams)).info != 0
    out = get_method("regmean")(ws, None, alpha=1.0, statistics=grams)
    torch.testing.assert_close(out, jittered_reference(ws, grams), rtol=1e-6, atol=1e-8)


def test_a_rank_deficient_gram_is_solved_with_jitter():
    ws = [rand(OUT, IN, seed=s) for s in (1, 2)]
    low = [gram(s, tokens=2) for s in (4, 5)]  # 4 tokens in all for 6 inputs: singular at alpha = 1
    assert torch.linalg.matrix_rank(low[0] + low[1]) == 4
    out = get_method("regmean")(ws, None, alpha=1.0, statistics=low)
    assert out.abs().max() < 100 * max(w.abs().max() for w in ws)  # not rounding noise amplified
    torch.testing.assert_close(out, jittered_reference(ws, low), rtol=1e-6, atol=1e-8)


def test_singular_and_mismatched_statistics_are_one_line_errors():
    ws = [rand(OUT, IN, seed=s) for s in (1, 2)]
    zero = torch.zeros(IN, IN, dtype=torch.float64)
    with pytest.raises(ValueError, match="singular system") as e:
        get_method("regmean")(ws, None, statistics=[zero, zero])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="do not fit a tensor of shape"):
        get_method("regmean")(ws, None, statistics=[gram(1, dim=4), gram(2, dim=4)])
    with pytest.raises(ValueError, match="some models but not others"):
        get_method("regmean")(ws, None, statistics=[gram(1), None])
    with pytest.raises(ValueError, match="sum to 0"):
        get_method("regmean")(ws, None, weight=[0.0, 0.0], statistics=[gram(1), gram(2)])
    with pytest.raises(ValueError, match="alpha"):
        get_method("regmean")(ws, None, alpha=1.5, statistics=[gram(1), gram(2)])
