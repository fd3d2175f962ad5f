"""The bytes every weight-writing operation produces, fixed by hash.

The inputs are built from seeded torch generators (no transformers initialisation), so
the hashes depend only on splice's code. They were recorded with the code before the
writer became one ``write_checkpoint`` (the old thread pool, shard writer and the GGUF
conversion's whole-model ``save_file``); any change to them is a change of output bits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

import splice

HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV_HEADS = 16, 32, 2, 48, 4, 2


def llama_config(dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


def llama_shapes() -> dict[str, tuple[int, ...]]:
    head = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (HIDDEN,),
                p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                p + "self_attn.k_proj.weight": (KV_HEADS * head, HIDDEN),
                p + "self_attn.v_proj.weight": (KV_HEADS * head, HIDDEN),
                p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                p + "post_attention_layernorm.weight": (HIDDEN,),
                p + "mlp.gate_proj.weight": (INTER, HIDDEN),
                p + "mlp.up_proj.weight": (INTER, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, INTER),
            }
        )
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def seeded_llama(folder: Path, seed: int, *, like: dict | None = None, dtype=torch.bfloat16) -> tuple[Path, dict]:
    """A Llama folder with seeded weights; with ``like``, those weights plus seeded noise (a 'fine-tune')."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in llama_shapes().items():
        noise = torch.randn(shape, generator=g, dtype=torch.float32)
        sd[name] = (like[name].float() + 0.05 * noise) if like is not None else noise * 0.2
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    folder.mkdir(parents=True)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(llama_config(str(dtype).replace("torch.", ""))))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder, sd


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded")
    base, bsd = seeded_llama(root / "base", 1)
    fts = [seeded_llama(root / f"ft{i}", 10 + i, like=bsd)[0] for i in range(2)]
    return base, fts


def digest(folder: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest()[:16] for n in names}


def _recipe(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


MERGES = {
    "ties": {"parameters": {"weight": 0.7, "density": 0.5}, "dtype": "bfloat16"},
    "dare_ties": {"parameters": {"weight": 0.7, "density": 0.5}, "dtype": "bfloat16"},
    "linear": {"parameters": {"weight": 1.0}, "out_dtype": "float16"},
}
_SIDE = {"generation_config.json": "5d1ec5cead41d3f7"}
MERGE_HASHES = {
    "ties": {"model.safetensors": "72acb99faec49c49", "config.json": "524b6342f628cad5", **_SIDE},
    "dare_ties": {"model.safetensors": "cfb75ac196ecd21b", "config.json": "524b6342f628cad5", **_SIDE},
    "linear": {"model.safetensors": "273b9f99ff72e444", "config.json": "5d5f770c2beadf74", **_SIDE},
    "stack": {
        "config.json": "2ac926fc854ad9ae",
        "model-00001-of-00007.safetensors": "1f7ba345cccc6da7",
        "model-00002-of-00007.safetensors": "82914d302d3a61f9",
        "model-00003-of-00007.safetensors": "428eb35f9c2b351d",
        "model-00004-of-00007.safetensors": "0496baea35fc4eb5",
        "model-00005-of-00007.safetensors": "4fd72d9f46c50869",
        "model-00006-of-00007.safetensors": "a1521b6591fa63eb",
        "model-00007-of-00007.safetensors": "fb5769fe064ef4b2",
        "model.safetensors.index.json": "c2550cd588ed9bb6",
        **_SIDE,
    },
}
WEIGHTS_AND_CONFIG = ("model.safetensors", "config.json", "generation_config.json")


@pytest.mark.parametrize("method", sorted(MERGES))
@pytest.mark.parametrize("workers", [1, 2])
def test_merge_bytes_are_fixed(tmp_path, seeded, method, workers):
    base, fts = seeded
    spec = MERGES[method]
    data = {
        "merge_method": method,
        "models": [{"model": str(f), "parameters": spec["parameters"]} for f in fts],
        **{k: v for k, v in spec.items() if k != "parameters"},
    }
    if method != "linear":
        data["base_model"] = str(base)
    out = tmp_path / "out"
    splice.merge(_recipe(tmp_path, data), out, quiet=True, seed=5, workers=workers)
    assert digest(out, WEIGHTS_AND_CONFIG) == MERGE_HASHES[method]


def test_stack_bytes_are_fixed(tmp_path, seeded):
    base, (a, b) = seeded
    data = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(b), "layer_range": [1, 2]}]},
        ],
    }
    out = tmp_path / "out"
    splice.merge(_recipe(tmp_path, data), out, quiet=True, shard_size=3000)
    names = tuple(sorted(p.name for p in out.iterdir() if p.name not in ("README.md", "mergekit_config.yml")))
    assert digest(out, names) == MERGE_HASHES["stack"]


MOE_HASH = {"model.safetensors": "3882b94f5fd1e634", "config.json": "a24c2367e4a8fe92", **_SIDE}


def test_moe_build_bytes_are_fixed(tmp_path, seeded):
    from splice.moe import build_moe

    base, fts = seeded
    recipe = {
        "base_model": str(base),
        "gate_mode": "random",
        "experts_per_token": 1,
        "experts": [{"source_model": str(f), "noise_scale": 0.01 * (i + 1)} for i, f in enumerate(fts)],
    }
    build_moe(recipe, tmp_path / "moe", quiet=True, seed=3)
    assert digest(tmp_path / "moe", WEIGHTS_AND_CONFIG) == MOE_HASH
