"""Planners choose the layers a hand computation says, on hidden states with known similarities."""

import math

import pytest
import torch

from splice.skip import LayerCosts, SkipError, make_plan, stats_from_states
from splice.skip.strategies import _spread


def rotating_states(thetas, hidden=8, tokens=5, mid_phis=None):
    """Residual streams turning by thetas[i] across layer i (in one plane), so angles add up exactly.

    With ``mid_phis``, the stream before layer i's MLP is its output turned back by phis[i]."""

    def vec(angle):
        v = torch.zeros(tokens, hidden, dtype=torch.float64)
        v[:, 0] = math.cos(angle)
        v[:, 1] = math.sin(angle)
        return v * torch.arange(1, tokens + 1, dtype=torch.float64)[:, None]  # norms differ per token: cos ignores them

    acc = [0.0]
    for t in thetas:
        acc.append(acc[-1] + t)
    states = [vec(a) for a in acc]
    mids = [vec(acc[i + 1] - p) for i, p in enumerate(mid_phis)] if mid_phis is not None else None
    return stats_from_states(states, mids)


def uniform_costs(L, layer=100, mlp=60, fixed=100):
    return LayerCosts(
        L, [layer] * L, [mlp] * L, fixed, fixed + layer * L + 50, {i: [f"model.layers.{i}.mlp.down_proj.weight"] for i in range(L)}
    )


THETAS = [0.9, 0.3, 0.1, 0.2, 0.15, 0.8]


def test_block_influence_drops_least_turning_layers():
    st = rotating_states(THETAS)
    torch.testing.assert_close(st.cos[2, 3], torch.tensor(math.cos(0.1), dtype=torch.float64))
    p = make_plan(uniform_costs(6), "block-influence", st, drop=2)
    assert p.drop_layers == [2, 4]  # 1 - cos: 0.1 < 0.15 < 0.2 < ...
    assert p.scores["layer 2"] == pytest.approx(1 - math.cos(0.1))
    assert make_plan(uniform_costs(6), "block-influence", st, drop=3).drop_layers == [2, 3, 4]


def test_angular_drops_the_closest_contiguous_block():
    st = rotating_states(THETAS)
    # angle across layers 2..3 = 0.1 + 0.2 = 0.3, the smallest 2-block; 3-blocks: 2..4 = 0.45
    assert make_plan(uniform_costs(6), "angular", st, drop=2).drop_layers == [2, 3]
    p = make_plan(uniform_costs(6), "angular", st, drop=3)
    assert p.drop_layers == [2, 3, 4]
    assert p.scores["block 2-4"] == pytest.approx(0.45 / math.pi)
    assert p.scores["block 0-2"] == pytest.approx(1.3 / math.pi)


def test_angular_and_block_influence_differ_when_the_quiet_layers_are_apart():
    st = rotating_states([0.5, 0.05, 0.6, 0.6, 0.06, 0.5])
    assert make_plan(uniform_costs(6), "block-influence", st, drop=2).drop_layers == [1, 4]
    assert make_plan(uniform_costs(6), "angular", st, drop=2).drop_layers == [0, 1]  # 0.55 < 0.65 = 1..2


def test_ffn_drops_mlp_blocks_that_change_the_stream_least():
    st = rotating_states(THETAS, mid_phis=[0.3, 0.02, 0.4, 0.01, 0.2, 0.05])
    p = make_plan(uniform_costs(6), "ffn", st, drop=3)
    assert p.drop_mlp == [1, 3, 5] and p.drop_layers == []
    assert p.scores["mlp 3"] == pytest.approx(1 - math.cos(0.01))
    # MLP blocks stay stored (zeroed), so parameters do not shrink; compute does
    assert p.params_after == p.params_total
    assert p.compute_after == p.compute_total - 3 * 60


@pytest.mark.parametrize("L,n,expected", [(10, 3, [2, 5, 7]), (12, 4, [2, 4, 7, 9]), (6, 4, [1, 2, 3, 4]), (30, 1, [15])])
def test_balanced_spreads_over_intermediate_layers(L, n, expected):
    assert _spread(L, n) == expected
    p = make_plan(uniform_costs(L), "balanced", None, drop=n)
    assert p.drop_layers == expected and 0 not in p.drop_layers and L - 1 not in p.drop_layers


def test_speedup_picks_the_smallest_count_reaching_the_target():
    c = uniform_costs(10)  # compute 1100 = head 100 + 10 layers x 100
    p = make_plan(c, "balanced", None, speedup=1.5)
    # 1100 / (1100 - 100 n) >= 1.5  ->  n >= 3.67  ->  4 layers
    assert len(p.drop_layers) == 4 and p.predicted_speedup == pytest.approx(1100 / 700)
    assert make_plan(c, "balanced", None, speedup=1.0).drop_layers == []
    st = rotating_states([0.3] * 10)
    assert len(make_plan(c, "block-influence", st, speedup=1.5).drop_layers) == 4
    assert len(make_plan(c, "angular", st, speedup=1.5).drop_layers) == 4
    # MLP blocks are 60 each: 1100 / (1100 - 60 n) >= 1.5 -> n >= 6.1 -> 7
    assert len(make_plan(c, "ffn", rotating_states([0.3] * 10, mid_phis=[0.1] * 10), speedup=1.5).drop_mlp) == 7


def test_ratio_and_bad_counts():
    c = uniform_costs(8)
    assert len(make_plan(c, "balanced", None, ratio=0.25).drop_layers) == 2
    with pytest.raises(SkipError, match="at most 6"):
        make_plan(c, "balanced", None, drop=7)
    with pytest.raises(SkipError, match="at most 7"):
        make_plan(c, "block-influence", rotating_states([0.1] * 8), drop=8)
    with pytest.raises(SkipError, match="at least 1"):
        make_plan(c, "balanced", None, speedup=0.8)
    with pytest.raises(SkipError, match="gives only"):
        make_plan(c, "balanced", None, speedup=20)
    with pytest.raises(SkipError, match="exactly one"):
        make_plan(c, "balanced", None, drop=2, speedup=1.2)
    with pytest.raises(SkipError, match="needs calibration"):
        make_plan(c, "angular", None, drop=2)
    with pytest.raises(SkipError, match="unknown skip strategy"):
        make_plan(c, "shortest", None, drop=2)


def test_describe_names_choice_scores_and_reduction():
    p = make_plan(uniform_costs(6), "block-influence", rotating_states(THETAS), drop=2)
    text = p.describe()
    assert "drop 2 of 6 layers: 2,4" in text and "*layer 2=" in text and "predicted decode speedup" in text
    assert p.to_dict()["kept_layers"] == [0, 1, 3, 5]
