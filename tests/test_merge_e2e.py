"""End-to-end merges of tiny random checkpoints built here, loaded back with transformers."""

import hashlib
import json

import pytest
import torch
import yaml
from helpers import FAMILIES, load_sd, logits, make_model

import splice


def _recipe(tmp_path, data):
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    out = {}
    for fam in FAMILIES:
        root = tmp_path_factory.mktemp(fam)
        base = make_model(root / "base", fam, seed=1, dtype=torch.bfloat16)
        fts = [make_model(root / f"ft{i}", fam, seed=20 + i, from_model=base, dtype=torch.bfloat16) for i in range(2)]
        out[fam] = (base, fts)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "slerp"])
def test_family_merges_load_and_give_finite_logits(tmp_path, families, family, method):
    base, (a, b) = families[family]
    params = {
        "linear": ({"weight": 0.5}, {}),
        "task_arithmetic": ({"weight": 0.5}, {}),
        "ties": ({"weight": 0.5, "density": 0.5}, {}),
        "dare_ties": ({"weight": 0.5, "density": 0.5}, {}),
        "slerp": ({}, {"t": 0.5}),
    }[method]
    models = [{"model": str(a), "parameters": params[0]}]
    if method != "slerp":
        models.append({"model": str(b), "parameters": params[0]})
    data = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if method != "linear":
        data["base_model"] = str(base)
    if params[1]:
        data["parameters"] = params[1]
    out = tmp_path / "out"
    s = splice.merge(_recipe(tmp_path, data), out, quiet=True, seed=3)
    assert s["tensors"] == len(load_sd(base))
    lg = logits(out)
    assert torch.isfinite(lg).all()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == json.loads((base / "config.json").read_text())["model_type"]
    assert (out / "README.md").read_text().count(method) >= 1


def test_linear_is_weighted_mean_in_fp32(tmp_path, llama_trio):
    base, fts = llama_trio
    data = {"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(fts, (1, 2, 1))]}
    out = tmp_path / "out"
    splice.merge(_recipe(tmp_path, data), out, quiet=True)
    sds = [load_sd(f) for f in fts]
    got = load_sd(out)
    for k in got:
        want = (sds[0][k] + 2 * sds[1][k] + sds[2][k]) / 4
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-6)


def test_passthrough_slices_stack_layers_bit_identical(tmp_path, llama_trio):
    base, (a, b, _) = llama_trio
    data = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(b), "layer_range": [1, 4]}]},
        ],
    }
    out = tmp_path / "out"
    s = splice.merge(_recipe(tmp_path, data), out, quiet=True)
    assert s["layers"] == 6
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    got, sa, sb = load_sd(out), load_sd(a), load_sd(b)
    for i, (src, layer) in enumerate([(sa, 0), (sa, 1), (sa, 2), (sb, 1), (sb, 2), (sb, 3)]):
        for k in [k for k in src if k.startswith(f"model.layers.{layer}.")]:
            out_k = k.replace(f"model.layers.{layer}.", f"model.layers.{i}.")
            assert torch.equal(got[out_k], src[k]), out_k
    assert torch.equal(got["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], sb["lm_head.weight"])
    assert torch.isfinite(logits(out)).all()


def test_shallower_model_and_per_layer_config_lists(tmp_path):
    import transformers as tf

    root = tmp_path / "m"
    make_model(root, "qwen2", seed=4, layers=4)
    cfg = json.loads((root / "config.json").read_text())
    cfg["layer_types"] = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    (root / "config.json").write_text(json.dumps(cfg))
    data = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(root), "layer_range": [1, 3]}]}]}
    out = tmp_path / "out"
    splice.merge(_recipe(tmp_path, data), out, quiet=True)
    cfg2 = json.loads((out / "config.json").read_text())
    assert cfg2["num_hidden_layers"] == 2
    assert cfg2["layer_types"] == ["sliding_attention", "full_attention"]
    tf.AutoModelForCausalLM.from_pretrained(out)


def test_same_seed_gives_identical_files_and_card_lists_hashes(tmp_path, llama_trio):
    base, fts = llama_trio
    data = {
        "merge_method": "dare_ties",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 1.0, "density": 0.3}} for f in fts],
    }
    r = _recipe(tmp_path, data)
    splice.merge(r, tmp_path / "o1", quiet=True, seed=7, shard_size=40_000)
    splice.merge(r, tmp_path / "o2", quiet=True, seed=7, shard_size=40_000)
    splice.merge(r, tmp_path / "o3", quiet=True, seed=8, shard_size=40_000)
    files = sorted(p.name for p in (tmp_path / "o1").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "o1" / "model.safetensors.index.json").exists()
    card = (tmp_path / "o1" / "README.md").read_text()
    for f in files:
        h1 = hashlib.sha256((tmp_path / "o1" / f).read_bytes()).hexdigest()
        assert h1 == hashlib.sha256((tmp_path / "o2" / f).read_bytes()).hexdigest()
        assert h1 in card
    assert load_sd(tmp_path / "o1").keys() == load_sd(tmp_path / "o3").keys()
    assert any(not torch.equal(load_sd(tmp_path / "o1")[k], load_sd(tmp_path / "o3")[k]) for k in load_sd(tmp_path / "o1"))
    # sharded output loads
    assert torch.isfinite(logits(tmp_path / "o1")).all()


def test_tokenizer_union_aligns_embeddings_by_token(tmp_path):
    base = make_model(tmp_path / "base", "llama", seed=0, vocab=96)
    ft = make_model(tmp_path / "ft", "llama", seed=1, vocab=98, extra_tokens=["<extra_a>", "<extra_b>"])
    data = {
        "merge_method": "linear",
        "base_model": str(base),
        "models": [{"model": str(base), "parameters": {"weight": 1}}, {"model": str(ft), "parameters": {"weight": 1}}],
        "tokenizer_source": "union",
    }
    # the two models only share their first 94 word tokens by string; make ft's layers match base's shapes
    out = tmp_path / "out"
    splice.merge(_recipe(tmp_path, data), out, quiet=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    emb = load_sd(out)["model.embed_tokens.weight"]
    assert emb.shape[0] == cfg["vocab_size"] == len(tok) >= 96
    sb, sf = load_sd(base)["model.embed_tokens.weight"], load_sd(ft)["model.embed_tokens.weight"]
    # token t5 exists in both at id 5: the mean of both rows
    torch.testing.assert_close(emb[5], (sb[5] + sf[5]) / 2)
    # "<extra_a>" only in ft (id 96 there): ft's row, unchanged by the mean over models that have it
    new_id = tok.convert_tokens_to_ids("<extra_a>")
    torch.testing.assert_close(emb[new_id], sf[96])
    assert torch.isfinite(logits(out)).all()


@pytest.mark.parametrize("family", ["qwen3", "gemma", "gemma3_text", "phi3"])
def test_more_families_merge_and_stack_without_family_code(tmp_path, family):
    """Gemma (tied, scaled embeddings), Gemma 3 (layer_types), Phi-3 (fused qkv), Qwen3 (q/k norms)."""
    import transformers as tf

    small = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg = {
        "qwen3": lambda: tf.Qwen3Config(head_dim=8, **small),
        "gemma": lambda: tf.GemmaConfig(head_dim=8, **small),
        "gemma3_text": lambda: tf.Gemma3TextConfig(head_dim=8, sliding_window=16, **small),
        "phi3": lambda: tf.Phi3Config(pad_token_id=0, **small),
    }[family]()
    paths = []
    for s in range(2):
        torch.manual_seed(s)
        tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / f"m{s}")
        paths.append(tmp_path / f"m{s}")
    ties = {
        "merge_method": "ties",
        "base_model": str(paths[0]),
        "models": [{"model": str(paths[1]), "parameters": {"weight": 1, "density": 0.5}}],
    }
    stack = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(paths[0]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(paths[1]), "layer_range": [2, 4]}]},
        ],
    }
    for name, rec in (("ties", ties), ("stack", stack)):
        s = splice.merge(rec, tmp_path / name, quiet=True)
        assert s["layers"] == (4 if name == "ties" else 5)
        assert torch.isfinite(logits(tmp_path / name)).all()
    cfg_out = json.loads((tmp_path / "stack" / "config.json").read_text())
    if "layer_types" in cfg_out:
        src = json.loads((paths[0] / "config.json").read_text())["layer_types"]
        assert cfg_out["layer_types"] == src[0:3] + src[2:4]


def test_gradient_gives_pre_and_post_layer_tensors_t0_as_mergekit(llama_trio):
    """mergekit plans embeddings, the final norm and an untied lm_head with t = 0."""
    base, (a, b, _) = llama_trio
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": [0.1, 0.9]}}, {"model": str(b), "parameters": {"weight": 1.0}}],
    }
    plan = splice.plan(recipe)
    w = {j.out_name: j.kwargs["weight"][0] for j in plan.jobs}
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert w[name] == pytest.approx(0.1), name
    assert w["model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.1)
    assert w["model.layers.3.mlp.up_proj.weight"] == pytest.approx(0.9)
