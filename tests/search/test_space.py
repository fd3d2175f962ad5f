"""Space (a): genes decode into an ordinary recipe that splice merge accepts, and the in-memory merge
of that recipe is exactly what splice merge writes."""

import random

import pytest
import torch
from helpers import load_sd

from splice.engine import run_merge
from splice.recipe import load_recipe
from splice.search.optimizers import suggest_random
from splice.search.resident import ResidentModel
from splice.search.space import MergeSpace
from splice.search.spec import parse_spec


def spec_of(base, experts, space, tmp_path):
    text = tmp_path / "held.txt"
    text.write_text("t3 t4 t5\n")
    data = {
        "models": {"base": str(base), "experts": {f"d{i}": str(e) for i, e in enumerate(experts)}},
        "evaluation": {"domains": {f"d{i}": str(text) for i in range(len(experts))}},
        "space": space,
    }
    return parse_spec(data, folder=tmp_path)


def test_global_genes_decode_to_scalars(tmp_path):
    s = spec_of("b", ["x", "y"], {"methods": ["ties"], "params": {"lambda": [0.5, 1.5]}}, tmp_path)
    sp = MergeSpace(s, 4)
    assert [g.name for g in sp.genes("ties")] == ["weight[d0]", "weight[d1]", "density[d0]", "density[d1]", "lambda"]
    assert sp.method_gene() is None
    r = sp.decode({"weight[d0]": 0.25, "weight[d1]": 0.75, "density[d0]": 0.5, "density[d1]": 0.6, "lambda": 1.2})
    assert r["merge_method"] == "ties" and r["base_model"].endswith("b")
    assert r["models"][1]["parameters"] == {"weight": 0.75, "density": 0.6}
    assert r["parameters"] == {"lambda": 1.2}
    load_recipe(r)  # splice's recipe schema accepts it


def test_groups_per_layer_and_split_decode_to_gradients_and_filters(tmp_path):
    s = spec_of("b", ["x"], {"methods": ["linear", "ties"], "granularity": {"groups": 3}, "split_attention_mlp": True}, tmp_path)
    sp = MergeSpace(s, 4)
    assert sp.method_gene().choices == ("linear", "ties")
    names = [g.name for g in sp.genes("linear")]
    assert names[:4] == ["weight[d0]@attn#0", "weight[d0]@attn#1", "weight[d0]@attn#2", "weight[d0]@mlp#0"] and len(names) == 9
    params = {"method": "linear", **{n: i / 10 for i, n in enumerate(names)}}
    r = sp.decode(params)
    assert "base_model" not in r  # linear uses no base: the base would be averaged in
    assert r["models"][0]["parameters"]["weight"] == [
        {"filter": "self_attn", "value": [0.0, 0.1, 0.2]},
        {"filter": "mlp", "value": [0.3, 0.4, 0.5]},
        {"value": [0.6, 0.7, 0.8]},
    ]
    load_recipe(r)
    per_layer = MergeSpace(spec_of("b", ["x"], {"methods": ["linear"], "granularity": "per-layer"}, tmp_path), 5)
    r = per_layer.decode(per_layer.start("linear"))
    assert r["models"][0]["parameters"]["weight"] == [1.0] * 5


def test_start_points_are_hand_tuned_and_in_range(tmp_path):
    s = spec_of("b", ["x", "y", "z"], {"methods": ["ties"], "params": {"weight": [0.5, 1]}}, tmp_path)
    start = MergeSpace(s, 4).start("ties")
    assert start == {"weight[d0]": 0.5, "weight[d1]": 0.5, "weight[d2]": 0.5, "density[d0]": 0.5, "density[d1]": 0.5, "density[d2]": 0.5}


SPACES = [
    {"methods": ["ties"], "params": {"lambda": [0.5, 1.5]}},
    {"methods": ["task_arithmetic"], "granularity": {"groups": 2}},
    {"methods": ["linear"], "granularity": "per-layer"},
    {"methods": ["dare_ties"], "granularity": {"groups": 3}, "split_attention_mlp": True},
]


@pytest.fixture(scope="module")
def resident(llama_trio):
    base, fts = llama_trio
    r = ResidentModel(str(base), [str(f) for f in fts], threads=1)
    yield r
    r.close()


@pytest.mark.parametrize("space", SPACES, ids=["global", "groups", "per-layer", "split"])
def test_in_memory_merge_equals_splice_merge(llama_trio, resident, tmp_path, space):
    base, fts = llama_trio
    s = spec_of(base, fts, space, tmp_path)
    sp = MergeSpace(s, 4)
    params = sp.propose(suggest_random(random.Random(1)))
    recipe = sp.decode(params)
    run_merge(recipe, tmp_path / "out", quiet=True)
    written = load_sd(tmp_path / "out")
    resident.apply(recipe)
    held = resident.state_dict()
    assert set(written) <= set(held)
    for name, t in written.items():
        assert torch.equal(held[name], t.to(held[name].dtype)), name


def test_only_changed_tensors_are_recomputed(llama_trio, resident, tmp_path):
    base, fts = llama_trio
    s = spec_of(base, fts, {"methods": ["ties"], "granularity": "per-layer"}, tmp_path)
    sp = MergeSpace(s, 4)
    params = sp.start("ties")
    total = resident.apply(sp.decode(params))
    assert resident.apply(sp.decode(params)) == 0  # the same candidate again: nothing to compute
    params["density[d1]#3"] = 0.9  # one expert's density on the last layer
    changed = resident.apply(sp.decode(params))
    assert 0 < changed < total
    resident.load_reference(str(base))  # the base's own weights: everything is recomputed next time
    assert resident.apply(sp.decode(params)) == total
