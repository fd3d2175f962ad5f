"""Bad input to splice moe: one line naming the model or key, nothing written (or a warning)."""

from __future__ import annotations

import pytest
import yaml
from helpers import make_model
from moe_helpers import make_expert, recipe

from splice.cli import main
from splice.errors import SpliceError
from splice.moe import build_moe, load_moe_recipe


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if ".splice-tmp-" in p.name]


def _fails(tmp_path, r, *needles, **kw):
    out = tmp_path / "out"
    with pytest.raises(SpliceError) as e:
        build_moe(r, out, quiet=True, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    assert not out.exists() and not _leftovers(tmp_path)
    return msg


def test_donor_of_another_architecture(tmp_path, moe_donors):
    base, experts = moe_donors
    other = make_model(tmp_path / "qwen2", "qwen2", layers=2, hidden=64)
    _fails(tmp_path, recipe(base, [experts[0], other]), "expert 1", str(other), "'qwen2'", "'llama'")


def test_donor_of_another_hidden_size(tmp_path, moe_donors):
    base, experts = moe_donors
    other = make_model(tmp_path / "wide", "llama", layers=2, hidden=96)
    _fails(tmp_path, recipe(base, [experts[0], other]), "expert 1", str(other), "hidden size 96")


def test_expert_without_prompts_under_hidden(tmp_path, moe_donors):
    base, experts = moe_donors
    r = recipe(base, experts[:2])
    del r["experts"][1]["positive_prompts"]
    _fails(tmp_path, r, "experts[1]", str(experts[1]), "positive_prompts", "'hidden'")
    r["gate_mode"] = "random"  # random gates need no prompts
    build_moe(r, tmp_path / "ok", quiet=True)


def test_identical_prompts_and_identical_gates(tmp_path, moe_donors):
    base, experts = moe_donors
    r = recipe(base, experts)
    r["experts"][1]["positive_prompts"] = r["experts"][0]["positive_prompts"]
    _fails(tmp_path, r, "experts[0] and experts[1]", "identical")
    _fails(tmp_path, recipe(base, experts[:2], experts_per_token=1) | {"experts": r["experts"][:2]}, "all 2 experts have the same prompts")
    # different strings, same tokens after the tokenizer's unknown-token mapping: identical gates
    r["experts"][0]["positive_prompts"] = ["zzz"]
    r["experts"][1]["positive_prompts"] = ["qqq"]
    _fails(tmp_path, r, "identical gates in layer 0", str(experts[0]), str(experts[1]))
    r["gate_mode"] = "cheap_embed"
    _fails(tmp_path, r, "identical gates in every layer")


def test_nearly_parallel_gates_warn(tmp_path, moe_donors, capsys):
    base, experts = moe_donors
    r = recipe(base, experts)
    r["experts"][2]["positive_prompts"] = r["experts"][1]["positive_prompts"] + ["t50"]
    s = build_moe(r, tmp_path / "moe", quiet=True)
    assert any("nearly parallel" in w and str(experts[2]) in w for w in s["warnings"])
    assert "nearly parallel" in capsys.readouterr().err


def test_base_that_is_not_the_experts_base_warns(tmp_path, moe_donors):
    base, experts = moe_donors
    stranger = make_model(tmp_path / "stranger", "llama", seed=123, layers=2, hidden=64)
    s = build_moe(recipe(stranger, experts[:2]), tmp_path / "moe", quiet=True)
    assert any("far from the base" in w and str(experts[0]) in w for w in s["warnings"])
    s = build_moe(recipe(base, experts[:2]), tmp_path / "moe2", quiet=True)
    assert not any("far from the base" in w for w in s["warnings"])


def test_unsupported_output_family(tmp_path, moe_donors):
    base, experts = moe_donors
    g = make_model(tmp_path / "gpt2", "gpt2", layers=2, hidden=32)
    _fails(tmp_path, recipe(g, [g, g], gate_mode="random"), "no MoE output family", "'gpt2'")
    q = make_model(tmp_path / "qwen2", "qwen2", layers=2, hidden=64)
    qe = make_expert(q, tmp_path / "qwen2e", seed=1)
    _fails(tmp_path, recipe(q, [q, qe], gate_mode="random"), "shared expert")
    _fails(tmp_path, recipe(base, experts[:2], architecture="qwen3_moe"), "qwen3_moe", "'llama'")
    with pytest.raises(SpliceError, match="unsupported output architecture 'deepseek'"):
        load_moe_recipe(recipe(base, experts[:2], architecture="deepseek"))


def test_recipe_errors_name_file_line_and_choices(tmp_path, moe_donors):
    base, experts = moe_donors
    r = recipe(base, experts[:2])
    r["gate_mode"] = "hiden"
    p = tmp_path / "moe.yaml"
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    with pytest.raises(SpliceError) as e:
        load_moe_recipe(p)
    assert str(e.value).startswith(
        f"{p}:2: gate_mode: unknown gate_mode 'hiden' (valid: hidden, cheap_embed, random, uniform_random, hidden_avg, hidden_last)"
    )
    r["gate_mode"] = "hidden"
    r["experts"][1]["noise"] = 0.1
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    with pytest.raises(SpliceError, match=r"experts\[1\]\.noise: unknown key 'noise' in an expert \(valid: source_model"):
        load_moe_recipe(p)
    del r["experts"][1]["noise"]
    r["experts_per_token"] = 3
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    with pytest.raises(SpliceError, match="experts_per_token is 3 but there are only 2 experts"):
        load_moe_recipe(p)


def test_prompts_file_and_cli_one_line_error(tmp_path, moe_donors, capsys):
    base, experts = moe_donors
    r = recipe(base, experts[:2])
    (tmp_path / "p1.txt").write_text("\n".join(r["experts"][1].pop("positive_prompts")) + "\n")
    r["experts"][1]["prompts_file"] = "p1.txt"  # relative to the recipe
    p = tmp_path / "moe.yaml"
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    assert main(["moe", str(p), "-o", str(tmp_path / "moe"), "-q"]) == 0
    assert "Mixtral, 2 experts" in capsys.readouterr().out
    assert main(["moe", str(p), "-o", str(tmp_path / "moe"), "-q"]) == 2  # exists, no --force
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("splice: error:") and "--force" in err[0]
    r["experts"][1]["prompts_file"] = "missing.txt"
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    assert main(["moe", str(p), "-o", str(tmp_path / "moe2"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "experts[1].prompts_file" in err[0] and "missing.txt" in err[0]
