"""The model card and recipe file of an output look like a Hub merge's (as mergekit 0.1.5 writes them):
YAML front matter with base_model (Hub ids only), tags and library_name; the recipe as mergekit_config.yml."""

from __future__ import annotations

import shutil

import pytest
import yaml
from helpers import make_model

import splice
from splice.checkpoint.card import hub_ids, is_hub_id


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, sep, _ = card[4:].partition("\n---\n")
    assert sep, "front matter is not closed"
    return yaml.safe_load(head)


@pytest.fixture
def hub_model(tmp_path, monkeypatch, llama_trio):
    """``acme/tiny``: a copy of the trio's first fine-tune in a local Hugging Face cache (never the network)."""
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    shutil.copytree(llama_trio[1][0], snap)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return "acme/tiny"


def test_hub_ids_leave_local_paths_out(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    refs = ["acme/tiny", "gpt2", "/abs/model", "~/model", "./rel", "../up", "a/b/c", "here", "sub/model", "x.gguf", "acme/tiny"]
    assert hub_ids(refs) == ["acme/tiny", "gpt2"]
    assert not is_hub_id("model", base_dir=tmp_path / "sub")  # exists beside the recipe
    assert hub_ids(["acme/base+acme/lora", "/local+acme/lora2"]) == ["acme/base", "acme/lora", "acme/lora2"]


def test_merge_card_front_matter_and_mergekit_config(tmp_path, llama_trio, hub_model):
    base, (a, b, _) = llama_trio
    text = (
        "# my recipe, comments kept\n"
        f"merge_method: task_arithmetic\nbase_model: {base}\n"
        f"models:\n  - model: {hub_model}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
        "dtype: float32\n"
    )
    r = tmp_path / "recipe.yml"
    r.write_text(text)
    out = tmp_path / "out"
    splice.merge(r, out, quiet=True)
    meta = _front_matter((out / "README.md").read_text())
    assert meta == {"base_model": ["acme/tiny"], "tags": ["merge", "mergekit", "splice"], "library_name": "transformers"}
    assert (out / "mergekit_config.yml").read_text() == text  # the file as written, as mergekit copies it


def test_local_only_merge_has_an_empty_base_model_and_a_recipe_from_a_dict(tmp_path, llama_trio):
    base, (a, b, _) = llama_trio
    data = {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}],
    }
    out = tmp_path / "out"
    splice.merge(data, out, quiet=True)
    meta = _front_matter((out / "README.md").read_text())
    assert meta["base_model"] == [] and meta["tags"] == ["merge", "mergekit", "splice"]
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == data


def test_no_card_means_no_recipe_file(tmp_path, llama_trio):
    base, (a, _, _) = llama_trio
    out = tmp_path / "out"
    splice.merge(
        {"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [{"model": str(a)}, {"model": str(base)}]},
        out,
        quiet=True,
        write_card=False,
    )
    assert not (out / "README.md").exists() and not (out / "mergekit_config.yml").exists()


def test_multi_stage_target_card_and_recipe(tmp_path, llama_trio, hub_model):
    base, (a, b, _) = llama_trio
    text = (
        f"name: ab\nmerge_method: linear\nparameters: {{weight: 1.0}}\nmodels:\n  - model: {hub_model}\n  - model: {b}\n"
        "---\n"
        f"merge_method: linear\nparameters: {{weight: 1.0}}\nmodels:\n  - model: ab\n  - model: {base}\n"
    )
    r = tmp_path / "multi.yaml"
    r.write_text(text)
    out = tmp_path / "out"
    splice.merge(r, out, quiet=True)
    meta = _front_matter((out / "README.md").read_text())
    # the target's inputs: stage ab's folder and the base, both local (ab's own Hub input is not listed)
    assert meta["base_model"] == [] and meta["tags"] == ["merge", "mergekit", "splice"]
    assert (out / "mergekit_config.yml").read_text() == text  # the whole multi-stage file: it re-makes the output


def test_moe_card_front_matter_and_mergekit_moe_config(tmp_path):
    from splice.moe import build_moe

    base = make_model(tmp_path / "base", "llama", seed=0, layers=2)
    experts = [make_model(tmp_path / f"e{i}", "llama", seed=100 + i, layers=2, from_model=base) for i in range(2)]
    r = tmp_path / "moe.yml"
    data = {"base_model": str(base), "gate_mode": "random", "experts_per_token": 1}
    data["experts"] = [{"source_model": str(e), "positive_prompts": ["t1 t2"]} for e in experts]
    text = yaml.safe_dump(data)
    r.write_text(text)
    build_moe(r, tmp_path / "moe", quiet=True)
    meta = _front_matter((tmp_path / "moe" / "README.md").read_text())
    assert meta["base_model"] == [] and meta["library_name"] == "transformers"
    assert meta["tags"][:3] == ["merge", "mergekit", "splice"] and "moe" in meta["tags"]
    assert (tmp_path / "moe" / "mergekit_moe_config.yml").read_text() == text
