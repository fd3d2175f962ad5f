"""splice moe-compress: grouping, neuron alignment, usage-weighted merging, and a smaller MoE that loads."""

from __future__ import annotations

import json

import numpy as np
import torch
from helpers import load_sd, logits
from moe_helpers import RANGES, make_expert, recipe

from splice.moe import build_moe, compress_moe
from splice.moe.assignment import _hungarian_min, max_weight_matching
from splice.moe.compress import align, group_experts, merge_group


def _text(path, ranges, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [" ".join(f"t{int(t)}" for t in torch.randint(lo, hi, (30,), generator=g)) for lo, hi in ranges for _ in range(n)]
    path.write_text("\n\n".join(docs))
    return path


def test_hungarian_matches_brute_force():
    import itertools

    rng = np.random.default_rng(0)
    for n in (1, 2, 4, 6):
        for _ in range(10):
            c = rng.normal(size=(n, n))
            best = max(sum(c[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            for perm in (max_weight_matching(c), _hungarian_min(-c)):
                assert sorted(perm) == list(range(n))
                assert abs(sum(c[i, perm[i]] for i in range(n)) - best) < 1e-9


def test_align_undoes_a_permutation_and_merge_weights_by_usage():
    g = torch.Generator().manual_seed(0)
    a = {"gate": torch.randn(8, 4, generator=g), "up": torch.randn(8, 4, generator=g), "down": torch.randn(4, 8, generator=g)}
    perm = torch.randperm(8, generator=g)
    b = {"gate": a["gate"][perm], "up": a["up"][perm], "down": a["down"][:, perm]}
    al = align(a, b)
    for p in a:
        assert torch.equal(al[p], a[p])
    c = {p: torch.randn(a[p].shape, generator=g) for p in a}
    m = merge_group([a, c], [3.0, 1.0])
    ca = align(a, c)
    for p in a:
        torch.testing.assert_close(m[p], 0.75 * a[p] + 0.25 * ca[p])


def test_group_experts_leaders_are_most_used_and_members_join_the_most_similar():
    usage = torch.tensor([5.0, 50.0, 1.0, 30.0])
    t = torch.randn(100, 1)
    logits = torch.cat([t, -t, -t + 0.01 * torch.randn(100, 1), t + 0.01 * torch.randn(100, 1)], dim=1)
    assert group_experts(usage, logits, 2) == [[1, 2], [3, 0]]
    assert group_experts(usage, logits, 1) == [[1, 3, 0, 2]]
    assert group_experts(usage, logits, 4) == [[0], [1], [2], [3]]


def test_compress_to_one_expert_is_the_usage_weighted_average_of_aligned_experts(tmp_path, moe_donors):
    base, experts = moe_donors
    build_moe(recipe(base, experts, experts_per_token=2), tmp_path / "moe", quiet=True)
    cal = _text(tmp_path / "cal.txt", RANGES)
    s = compress_moe(tmp_path / "moe", tmp_path / "one", experts=1, calibration=[cal], quiet=True)
    cfg = json.loads((tmp_path / "one" / "config.json").read_text())
    assert cfg["num_local_experts"] == 1 and cfg["num_experts_per_tok"] == 1
    big, small = load_sd(tmp_path / "moe"), load_sd(tmp_path / "one")
    names = {"gate": "w1", "up": "w3", "down": "w2"}
    for layer in range(2):
        group = s["groups"][layer][0]
        assert sorted(group) == [0, 1, 2] and group[0] == int(np.argmax(s["usage"][layer]))
        ex = [{p: big[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"] for p, w in names.items()} for e in group]
        w = [s["usage"][layer][e] for e in group]
        aligned = [ex[0]] + [align(ex[0], m) for m in ex[1:]]
        for p, wname in names.items():
            want = sum(wi * a[p] for wi, a in zip(w, aligned)) / sum(w)
            torch.testing.assert_close(small[f"model.layers.{layer}.block_sparse_moe.experts.0.{wname}.weight"], want, rtol=1e-5, atol=1e-6)
        lead = group[0]
        assert torch.equal(
            small[f"model.layers.{layer}.block_sparse_moe.gate.weight"],
            big[f"model.layers.{layer}.block_sparse_moe.gate.weight"][lead : lead + 1],
        )
    assert torch.isfinite(logits(tmp_path / "one")).all()


def test_permuted_copies_merge_back_to_the_original_expert(tmp_path, moe_donors):
    base, experts = moe_donors
    twin = make_expert(experts[0], tmp_path / "twin", seed=7, scale=0.0, permute=True)  # same function, shuffled units
    r = recipe(base, [experts[0], twin], gate_mode="random", experts_per_token=2)
    build_moe(r, tmp_path / "moe", quiet=True)
    cal = _text(tmp_path / "cal.txt", RANGES[:1], n=2)
    compress_moe(tmp_path / "moe", tmp_path / "one", experts=1, calibration=[cal], quiet=True)
    ids = (3, 31, 32, 55, 60)
    torch.testing.assert_close(logits(tmp_path / "one", ids), logits(experts[0], ids), rtol=1e-4, atol=1e-5)


def test_compress_keeps_two_of_three_and_loads(tmp_path, moe_donors):
    from splice.cli import main

    base, experts = moe_donors
    build_moe(recipe(base, experts, experts_per_token=2), tmp_path / "moe", quiet=True)
    cal = _text(tmp_path / "cal.jsonl", RANGES, n=2)
    cal.write_text("\n".join(json.dumps({"text": d}) for d in cal.read_text().split("\n\n")))
    code = main(["moe-compress", str(tmp_path / "moe"), "-o", str(tmp_path / "two"), "--experts", "2", "--calibration", str(cal), "-q"])
    assert code == 0
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert cfg["num_local_experts"] == 2 and cfg["num_experts_per_tok"] == 2
    assert load_sd(tmp_path / "two")["model.layers.0.block_sparse_moe.gate.weight"].shape == (2, 64)
    assert torch.isfinite(logits(tmp_path / "two")).all()
