"""Parity with mergekit 0.1.5 on the same recipe, for every deterministic method.

mergekit runs from its side venv (``benchmarks/.venv-mergekit``, which ``make test``
builds; see ``mergekit_side``). Without it these tests skip, except under
``SPLICE_REQUIRE_MERGEKIT=1`` (set by ``make test``), where they fail.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_sd, make_model

import splice

pytestmark = pytest.mark.mergekit


CASES = {
    "linear": (False, {"weight": [0.3, 0.5, 0.2]}, {}),
    "task_arithmetic": (True, {"weight": [0.5, 0.3, 0.7]}, {}),
    "ties": (True, {"weight": [1.0, 0.6, 0.8], "density": [0.5, 0.3, 0.7]}, {}),
    "breadcrumbs": (True, {"weight": [1.0, 0.5, 0.7], "density": 0.8, "gamma": 0.05}, {}),
    "breadcrumbs_ties": (True, {"weight": [1.0, 0.5, 0.7], "density": 0.8, "gamma": 0.05}, {}),
    "sce": (True, {}, {"select_topk": 0.5}),
    "model_stock": (True, {}, {}),
    "slerp": (True, {}, {"t": 0.3}),
    "nearswap": (True, {}, {"t": 0.01}),
    "nuslerp": (True, {"weight": [0.4, 0.6]}, {}),
    "multislerp": (False, {"weight": [0.3, 0.5, 0.2]}, {}),
    "karcher": (False, {}, {}),
    "arcee_fusion": (True, {}, {}),
    # the fine-tunes change every element by noise 0.05 * N(0, 1): epsilon makes the changes sparse
    "ram": (True, {}, {"epsilon": 0.05}),
    "ramplus_tl": (True, {}, {"epsilon": 0.08, "r": 0.5, "alpha": 1.0}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    base = make_model(root / "base", "llama", seed=0, layers=3)
    fts = [make_model(root / f"ft{i}", "llama", seed=30 + i, layers=3, from_model=base, noise=0.05) for i in range(3)]
    return base, fts


@pytest.mark.parametrize("method", sorted(CASES))
def test_matches_mergekit(tmp_path, models, mergekit, method):
    uses_base, per, glob = CASES[method]
    base, fts = models
    n = {"slerp": 1, "nearswap": 1, "arcee_fusion": 1, "nuslerp": 2}.get(method, 3)
    entries = []
    for i, f in enumerate(fts[:n]):
        params = {k: (v[i] if isinstance(v, list) else v) for k, v in per.items()}
        entries.append({"model": str(f), **({"parameters": params} if params else {})})
    recipe = {"merge_method": method, "models": entries, "dtype": "float32"}
    if uses_base:
        recipe["base_model"] = str(base)
    if glob:
        recipe["parameters"] = glob
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    splice.merge(p, tmp_path / "ours", quiet=True)
    mergekit.run_yaml(p, tmp_path / "theirs")
    ours, theirs = load_sd(tmp_path / "ours"), load_sd(tmp_path / "theirs")
    assert set(theirs) <= set(ours)
    for k in theirs:
        torch.testing.assert_close(ours[k].float(), theirs[k].float(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{method} {k}: {m}")


def test_passthrough_slices_match_mergekit(tmp_path, models, mergekit):
    base, fts = models
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(fts[0]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(fts[1]), "layer_range": [1, 3]}]},
        ],
        "dtype": "float32",
    }
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    splice.merge(p, tmp_path / "ours", quiet=True)
    mergekit.run_yaml(p, tmp_path / "theirs")
    ours, theirs = load_sd(tmp_path / "ours"), load_sd(tmp_path / "theirs")
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("method", ["linear", "ties", "slerp"])
def test_mixed_input_dtypes_without_a_dtype_give_mergekits_output(tmp_path, mergekit, method):
    """A bf16 base and an f32 fine-tune, no dtype in the recipe: mergekit's output is f32 (torch's promotion), so is ours."""
    base = make_model(tmp_path / "base", "llama", seed=0, layers=1, dtype=torch.bfloat16)
    ft = make_model(tmp_path / "ft", "llama", seed=1, layers=1, from_model=base)
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(ft), "parameters": {"weight": 0.7, "density": 0.5}}, {"model": str(base), "parameters": {"weight": 0.3}}],
    }
    if method == "slerp":
        recipe["parameters"] = {"t": 0.3}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    splice.merge(p, tmp_path / "ours", quiet=True)
    mergekit.run_yaml(p, tmp_path / "theirs")
    ours, theirs = load_sd(tmp_path / "ours"), load_sd(tmp_path / "theirs")
    assert {str(t.dtype) for t in theirs.values()} == {"torch.float32"}
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{method} {k}: {m}")


def _write_lora(folder: Path, base: Path, dtype=torch.float32) -> Path:
    """A PEFT LoRA adapter for the tiny llama ``base``: q/v projections (a rank and an alpha pattern, rsLoRA)
    and a full lm_head (modules_to_save), written with safetensors."""
    from safetensors.torch import save_file

    sd = load_sd(base)
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for name, w in sd.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.endswith(("q_proj", "v_proj")):
            r = 2 if module.endswith("v_proj") else 4
            tensors[f"base_model.model.{module}.lora_A.weight"] = 0.2 * torch.randn(r, w.shape[1], generator=g)
            tensors[f"base_model.model.{module}.lora_B.weight"] = 0.2 * torch.randn(w.shape[0], r, generator=g)
    tensors["base_model.model.lm_head.weight"] = sd["lm_head.weight"].float() + 0.1 * torch.randn(sd["lm_head.weight"].shape, generator=g)
    folder.mkdir(parents=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"v_proj": 2},
        "alpha_pattern": {r"model\.layers\.1\.self_attn\.q_proj": 3},
        "modules_to_save": ["lm_head"],
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_reference_matches_mergekit(tmp_path, models, mergekit, dtype):
    """``model+adapter`` in base_model and models: mergekit merges the adapter with PEFT first; splice on read."""
    base, fts = models
    if dtype == "bfloat16":  # PEFT adds the float32 change to float32(W) and rounds once to bfloat16; so does splice
        base = make_model(tmp_path / "base16", "llama", seed=0, layers=3, dtype=torch.bfloat16)
    adapter = _write_lora(tmp_path / "adapter", base, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": f"{base}+{adapter}", "parameters": {"weight": 0.7}},
            {"model": str(fts[0]), "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",  # the inputs as stored (a bfloat16 adapted model rounded as PEFT rounds it), no further rounding
    }
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    splice.merge(p, tmp_path / "ours", quiet=True)
    mergekit.run_yaml(p, tmp_path / "theirs", lora_merge_cache=str(tmp_path / "cache"))
    ours, theirs = load_sd(tmp_path / "ours"), load_sd(tmp_path / "theirs")
    assert set(theirs) <= set(ours)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, (k, ours[k].dtype, theirs[k].dtype)
        torch.testing.assert_close(ours[k].float(), theirs[k].float(), rtol=1e-4, atol=1e-5, msg=lambda m: f"lora {k}: {m}")
    # the adapted model itself: mergekit's PEFT-merged copy in its LoRA cache, bit for bit
    from splice.checkpoint import open_model

    (cached,) = (tmp_path / "cache").iterdir()
    merged, src = load_sd(cached), open_model(f"{base}+{adapter}")
    try:
        for k in merged:
            assert torch.equal(src.get(k), merged[k]), f"lora cache {k}"
    finally:
        src.close()
    # the adapter changed what it targets
    assert not torch.allclose(
        ours["model.layers.0.self_attn.q_proj.weight"].float(), load_sd(base)["model.layers.0.self_attn.q_proj.weight"].float()
    )
