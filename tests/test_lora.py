"""``model+adapter`` references: a PEFT LoRA adapter merged into a model as it is read.

The formula against float64 transcriptions on tiny tensors (rank_pattern, alpha_pattern,
fan_in_fan_out, rslora, embeddings, lora_bias, modules_to_save), merges of a tiny model with
a tiny adapter written here with safetensors, and the one-line errors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_sd, make_model
from safetensors.torch import save_file

import splice
from splice.checkpoint import open_model
from splice.checkpoint.lora import LoraSource, pattern_key
from splice.cli import main
from splice.errors import CheckpointError, RecipeError

P = "base_model.model."


def rand(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    """A PEFT adapter folder: adapter_config.json (LoRA defaults plus ``config``) and adapter_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None}
    cfg.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


# ---------------------------------------------------------------- the formula, tensor by tensor

SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (8, 6),
    "model.layers.0.self_attn.q_proj.bias": (8,),
    "model.layers.0.mlp.up_proj.weight": (10, 6),
    "model.layers.1.mlp.up_proj.weight": (10, 6),
    "model.embed_tokens.weight": (12, 6),
    "lm_head.weight": (12, 6),
    "model.norm.weight": (6,),
    "transformer.h.0.attn.c_attn.weight": (6, 9),  # GPT-2 Conv1D layout: (in, out)
    "transformer.h.0.attn.c_proj.weight": (6, 6),
}


@pytest.fixture
def tiny(tmp_path):
    """A folder of named tensors (no config: a source needs none) and its float64 copy."""
    folder = tmp_path / "base"
    folder.mkdir()
    tensors = {k: rand(*s, seed=i) for i, (k, s) in enumerate(SHAPES.items())}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder, tensors


def factors(module: str, out_f: int, in_f: int, r: int, seed: int) -> dict[str, torch.Tensor]:
    return {
        f"{P}{module}.lora_A.weight": rand(r, in_f, seed=seed, scale=0.3),
        f"{P}{module}.lora_B.weight": rand(out_f, r, seed=seed + 1, scale=0.3),
    }


def expected(w, a, b, scale, transpose=False):
    """W + scale * (B @ A) (transposed), float64."""
    d = b.double() @ a.double()
    return w.double() + scale * (d.T if transpose else d)


def adapted(base: Path, adapter: Path) -> LoraSource:
    src = open_model(f"{base}+{adapter}")
    assert isinstance(src, LoraSource)
    return src


def close(actual, want):
    torch.testing.assert_close(actual.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rslora", [False, True])
def test_scale_alpha_over_r_or_sqrt_r(tmp_path, tiny, rslora):
    base, w = tiny
    t = factors("model.layers.0.self_attn.q_proj", 8, 6, 4, seed=10)
    src = adapted(base, write_adapter(tmp_path / "ad", t, r=4, lora_alpha=8, use_rslora=rslora))
    scale = 8 / math.sqrt(4) if rslora else 8 / 4
    name = "model.layers.0.self_attn.q_proj.weight"
    a, b = t[f"{P}model.layers.0.self_attn.q_proj.lora_A.weight"], t[f"{P}model.layers.0.self_attn.q_proj.lora_B.weight"]
    close(src.get(name), expected(w[name], a, b, scale))
    for other in SHAPES:  # everything else is the base's, bit for bit
        if other != name:
            assert torch.equal(src.get(other), w[other]), other
    src.close()


def test_rank_and_alpha_patterns(tmp_path, tiny):
    base, w = tiny
    t = {
        **factors("model.layers.0.self_attn.q_proj", 8, 6, 2, seed=20),  # rank 2 from rank_pattern
        **factors("model.layers.0.mlp.up_proj", 10, 6, 4, seed=22),  # alpha 16 from alpha_pattern
        **factors("model.layers.1.mlp.up_proj", 10, 6, 3, seed=24),  # both patterns: first matching key wins
    }
    ad = write_adapter(
        tmp_path / "ad",
        t,
        r=4,
        lora_alpha=8,
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.up_proj": 3, r"layers\.[1-9]\.mlp\.up_proj": 5},
        alpha_pattern={r"model\.layers\.0\.mlp\.up_proj": 16, "layers.1.mlp.up_proj": 1.5},
    )
    src = adapted(base, ad)
    for module, scale in (
        ("model.layers.0.self_attn.q_proj", 8 / 2),
        ("model.layers.0.mlp.up_proj", 16 / 4),
        ("model.layers.1.mlp.up_proj", 1.5 / 3),
    ):
        name = module + ".weight"
        close(src.get(name), expected(w[name], t[f"{P}{module}.lora_A.weight"], t[f"{P}{module}.lora_B.weight"], scale))
    src.close()


def test_pattern_matching_is_peft_s():
    # PEFT: the first key k (in file order) for which (.*\.)?(k)$ matches the whole module name
    name = "model.layers.11.self_attn.q_proj"
    assert pattern_key({"q_proj": 1}, name) == "q_proj"
    assert pattern_key({"proj": 1}, name) is None  # not a whole name component
    assert pattern_key({"layers.1.self_attn.q_proj": 1}, name) is None
    assert pattern_key({"layers.11.self_attn.q_proj": 1, "q_proj": 2}, name) == "layers.11.self_attn.q_proj"
    assert pattern_key({r".*\.1[01]\.self_attn\.q_proj": 1}, name) is not None
    assert pattern_key({}, name) is None


def test_fan_in_fan_out_and_conv1d_orientation(tmp_path, tiny):
    base, w = tiny
    # Conv1D weights are (in, out): the change is (B @ A)^T. Square c_proj: fan_in_fan_out decides.
    t = {**factors("transformer.h.0.attn.c_attn", 9, 6, 4, seed=30), **factors("transformer.h.0.attn.c_proj", 6, 6, 4, seed=32)}
    src = adapted(base, write_adapter(tmp_path / "fifo", t, fan_in_fan_out=True))
    for module in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"):
        name = module + ".weight"
        close(src.get(name), expected(w[name], t[f"{P}{module}.lora_A.weight"], t[f"{P}{module}.lora_B.weight"], 2.0, transpose=True))
    src.close()
    # fan_in_fan_out false on the square one: not transposed; on the (6, 9) one PEFT turns it by layer type, as the shape does here
    src = adapted(base, write_adapter(tmp_path / "plain", t, fan_in_fan_out=False))
    m = "transformer.h.0.attn.c_proj"
    close(src.get(m + ".weight"), expected(w[m + ".weight"], t[f"{P}{m}.lora_A.weight"], t[f"{P}{m}.lora_B.weight"], 2.0))
    m = "transformer.h.0.attn.c_attn"
    close(src.get(m + ".weight"), expected(w[m + ".weight"], t[f"{P}{m}.lora_A.weight"], t[f"{P}{m}.lora_B.weight"], 2.0, transpose=True))
    src.close()


def test_embedding_lora_bias_and_modules_to_save(tmp_path, tiny):
    base, w = tiny
    head = rand(12, 6, seed=40)
    q = "model.layers.0.self_attn.q_proj"
    t = {
        f"{P}model.embed_tokens.lora_embedding_A": rand(4, 12, seed=41, scale=0.3),  # (r, vocab)
        f"{P}model.embed_tokens.lora_embedding_B": rand(6, 4, seed=42, scale=0.3),  # (dim, r)
        **factors(q, 8, 6, 4, seed=43),
        f"{P}{q}.lora_B.bias": rand(8, seed=45),
        f"{P}lm_head.weight": head,  # modules_to_save: the whole tensor
        f"{P}model.norm.weight": torch.full((6,), 0.5),  # a trained norm (bias: all style): replaced too
    }
    src = adapted(base, write_adapter(tmp_path / "ad", t, modules_to_save=["lm_head"], lora_bias=True))
    e = "model.embed_tokens.weight"
    close(src.get(e), expected(w[e], t[f"{P}model.embed_tokens.lora_embedding_A"], t[f"{P}model.embed_tokens.lora_embedding_B"], 2.0, True))
    close(src.get(q + ".bias"), w[q + ".bias"].double() + 2.0 * t[f"{P}{q}.lora_B.bias"].double())
    assert torch.equal(src.get("lm_head.weight"), head)
    assert torch.equal(src.get("model.norm.weight"), torch.full((6,), 0.5))
    src.close()


def test_half_precision_base_keeps_its_dtype(tmp_path):
    """As PEFT merges: the change in float32 (adapter weights upcast), added to float32(W), rounded once to W's dtype."""
    folder = tmp_path / "bf16"
    folder.mkdir()
    w = {
        "model.layers.0.mlp.up_proj.weight": rand(10, 6, seed=1).bfloat16(),
        "model.norm.weight": rand(6, seed=2).bfloat16(),
        "lm_head.weight": rand(12, 6, seed=3).half(),
    }
    save_file(w, str(folder / "model.safetensors"))
    t = factors("model.layers.0.mlp.up_proj", 10, 6, 4, seed=3)
    t = {k: v.bfloat16() for k, v in t.items()}
    t[f"{P}lm_head.weight"] = rand(12, 6, seed=4)  # float32 in the adapter: cast to the replaced tensor's float16
    src = adapted(folder, write_adapter(tmp_path / "ad", t))
    name = "model.layers.0.mlp.up_proj.weight"
    assert src.info(name).dtype == torch.bfloat16
    out = src.get(name)
    a = t[f"{P}model.layers.0.mlp.up_proj.lora_A.weight"].float()
    b = t[f"{P}model.layers.0.mlp.up_proj.lora_B.weight"].float()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (w[name].float() + (b @ a) * 2.0).bfloat16())
    assert torch.equal(src.get("model.norm.weight"), w["model.norm.weight"])
    head = src.get("lm_head.weight")
    assert head.dtype == torch.float16 and torch.equal(head, t[f"{P}lm_head.weight"].half())
    src.close()


def test_half_precision_embedding_rounds_the_change_first(tmp_path):
    """PEFT's Embedding.merge casts the change to the weight's dtype before adding it (Linear does not)."""
    folder = tmp_path / "bf16"
    folder.mkdir()
    w = rand(12, 6, seed=1).bfloat16()
    save_file({"model.embed_tokens.weight": w}, str(folder / "model.safetensors"))
    a, b = rand(4, 12, seed=2, scale=0.3), rand(6, 4, seed=3, scale=0.3)
    t = {f"{P}model.embed_tokens.lora_embedding_A": a, f"{P}model.embed_tokens.lora_embedding_B": b}
    src = adapted(folder, write_adapter(tmp_path / "ad", t))
    assert torch.equal(src.get("model.embed_tokens.weight"), w + ((b @ a).T * 2.0).bfloat16())
    src.close()


# ---------------------------------------------------------------- end to end: merges with a tiny model and adapter


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_model(root / "base", "llama", seed=0, layers=2)
    ft = make_model(root / "ft", "llama", seed=7, layers=2, from_model=base, noise=0.05)
    sd = load_sd(base)
    t = {}
    for i in range(2):
        for j, proj in enumerate(("q_proj", "v_proj")):
            module = f"model.layers.{i}.self_attn.{proj}"
            out_f, in_f = sd[module + ".weight"].shape
            t.update(factors(module, out_f, in_f, 4 if proj == "q_proj" else 2, seed=100 + 10 * i + j))
    t[f"{P}lm_head.weight"] = sd["lm_head.weight"] + 0.5
    adapter = write_adapter(root / "adapter", t, r=4, lora_alpha=16, rank_pattern={"v_proj": 2}, modules_to_save=["lm_head"])
    return base, ft, adapter, t


def adapted_sd(base: Path, t: dict, alpha=16, ranks=None) -> dict[str, torch.Tensor]:
    """The base's tensors with the adapter applied, float64 (the expected merged model)."""
    ranks = ranks or {"q_proj": 4, "v_proj": 2}
    out = {k: v.double() for k, v in load_sd(base).items()}
    for k in t:
        if k.endswith(".lora_A.weight"):
            module = k[len(P) : -len(".lora_A.weight")]
            proj = module.rsplit(".", 1)[1]
            out[module + ".weight"] = expected(out[module + ".weight"], t[k], t[k.replace("lora_A", "lora_B")], alpha / ranks[proj])
    out["lm_head.weight"] = t[f"{P}lm_head.weight"].double()
    return out


def test_linear_merge_with_an_adapted_model(tmp_path, pair):
    base, ft, adapter, t = pair
    recipe = {
        "merge_method": "linear",
        "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 0.3}}, {"model": str(ft), "parameters": {"weight": 0.7}}],
        "dtype": "float32",
    }
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    splice.merge(p, tmp_path / "out", quiet=True)
    got, a, f = load_sd(tmp_path / "out"), adapted_sd(base, t), load_sd(ft)
    assert set(got) == set(a)
    for k in got:
        torch.testing.assert_close(got[k].double(), 0.3 * a[k] + 0.7 * f[k].double(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], load_sd(base)["model.layers.0.self_attn.q_proj.weight"])


def test_base_model_slices_and_mergekit_s_mapping_form(tmp_path, pair):
    """The '+' works for base_model and slice sources, relative to the recipe, and as {model: {path}, lora: {path}}."""
    base, ft, adapter, t = pair
    (tmp_path / "m").symlink_to(base)
    (tmp_path / "a").symlink_to(adapter)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": {"model": {"path": "m"}, "lora": {"path": "a"}},
        "slices": [
            {
                "sources": [
                    {"model": "m+a", "layer_range": [0, 2]},
                    {"model": str(ft), "layer_range": [0, 2], "parameters": {"weight": 0.5}},
                ]
            }
        ],
        "dtype": "float32",
    }
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    splice.merge(p, tmp_path / "out", quiet=True)
    got, a, f = load_sd(tmp_path / "out"), adapted_sd(base, t), load_sd(ft)
    for k in got:  # base + 0.5 * (ft - base), the base being the adapted model
        torch.testing.assert_close(got[k].double(), a[k] + 0.5 * (f[k].double() - a[k]), rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_passthrough_of_an_adapted_model_is_the_merged_model(tmp_path, pair):
    base, _, adapter, t = pair
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": f"{base}+{adapter}"}]}))
    splice.merge(p, tmp_path / "out", quiet=True)
    got, a = load_sd(tmp_path / "out"), adapted_sd(base, t)
    for k in got:
        torch.testing.assert_close(got[k].double(), a[k], rtol=1e-6, atol=1e-6)
    from splice.hf import load_causal_lm  # the in-memory loader reads the same adapted tensors

    sd = load_causal_lm(f"{base}+{adapter}").state_dict()
    torch.testing.assert_close(sd["model.layers.1.self_attn.v_proj.weight"], got["model.layers.1.self_attn.v_proj.weight"])


def test_output_inside_the_adapter_is_refused(tmp_path, pair):
    base, ft, adapter, _ = pair
    recipe = {"merge_method": "linear", "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}
    with pytest.raises(CheckpointError, match=r"lies inside the input .*adapter"):
        splice.merge(recipe, adapter / "out", quiet=True)
    with pytest.raises(CheckpointError, match=r"is the input .*adapter"):
        splice.merge(recipe, adapter, quiet=True, force=True)
    assert not (adapter / "out").exists()
    # a command given the reference as text (skip, compress) checks both folders too
    from splice.checkpoint.writer import check_output

    with pytest.raises(CheckpointError, match="lies inside the input"):
        check_output(adapter / "x", inputs=[f"{base}+{adapter}"])
    with pytest.raises(CheckpointError, match="lies inside the input"):
        check_output(base / "x", inputs=[f"{base}+{adapter}"])
    assert check_output(tmp_path / "fine", inputs=[f"{base}+{adapter}", None]) == (tmp_path / "fine").resolve()


def test_moe_expert_from_an_adapted_model(tmp_path, pair):
    """mergekit-moe's base_model and source_model take the '+' too: adapted base, one adapted expert, top-1: the adapted model."""
    from helpers import logits

    from splice.moe import build_moe

    base, _, adapter, _ = pair
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": f"{base}+{adapter}"}]}))
    splice.merge(p, tmp_path / "dense", quiet=True)
    r = {
        "base_model": f"{base}+{adapter}",
        "gate_mode": "random",
        "experts_per_token": 1,
        "experts": [{"source_model": f"{base}+{adapter}"}],
    }
    build_moe(r, tmp_path / "moe", quiet=True)
    ids = (2, 5, 17, 33, 60)
    torch.testing.assert_close(logits(tmp_path / "moe", ids), logits(tmp_path / "dense", ids), rtol=0, atol=1e-5)
    with pytest.raises(CheckpointError, match="lies inside the input"):
        build_moe(r, adapter / "moe", quiet=True)


# ---------------------------------------------------------------- one-line errors


def _merge_error(tmp_path, model_ref: str, capsys) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": model_ref, "parameters": {"weight": 1.0}}]}))
    code = main(["merge", str(p), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("splice: error: "), err
    assert not (tmp_path / "out").exists()
    return err[0]


def _broken(tmp_path, pair, name, mutate_cfg=None, mutate_tensors=None, weights=True) -> Path:
    _, _, adapter, t = pair
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = dict(t)
    if mutate_cfg:
        mutate_cfg(cfg)
    if mutate_tensors:
        mutate_tensors(tensors)
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(cfg) if isinstance(cfg, dict) else cfg)
    if weights:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def test_missing_adapter(tmp_path, pair, capsys):
    base = pair[0]
    line = _merge_error(tmp_path, f"{base}+{tmp_path / 'nope'}", capsys)
    assert "LoRA adapter" in line and "not found" in line
    line = _merge_error(tmp_path, f"{base}+{base}", capsys)  # a model folder, not an adapter
    assert "no adapter_config.json" in line


def test_dora_and_other_peft_types_are_refused(tmp_path, pair, capsys):
    base = pair[0]
    dora = _broken(tmp_path, pair, "dora", lambda c: c.update(use_dora=True))
    assert "DoRA adapter (use_dora: true) cannot be merged" in _merge_error(tmp_path, f"{base}+{dora}", capsys)
    ia3 = _broken(tmp_path, pair, "ia3", lambda c: c.update(peft_type="IA3"))
    assert "peft_type is 'IA3'; only LoRA adapters" in _merge_error(tmp_path, f"{base}+{ia3}", capsys)
    mag = _broken(
        tmp_path,
        pair,
        "mag",
        mutate_tensors=lambda t: t.update({f"{P}model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)}),
    )
    assert "DoRA magnitude" in _merge_error(tmp_path, f"{base}+{mag}", capsys)


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda c: c.update(r="eight"), "r must be a positive number, got 'eight'"),
        (lambda c: c.update(r=0), "r must be a positive number, got 0"),
        (lambda c: c.update(rank_pattern=[1]), "rank_pattern must be a mapping"),
        (lambda c: c.update(alpha_pattern={"(": 2}), "alpha_pattern key '(' is not a valid pattern"),
        (lambda c: c.update(fan_in_fan_out="yes"), "fan_in_fan_out must be true or false"),
        (lambda c: c.pop("peft_type"), "peft_type is None"),
        (lambda c: c.update(rank_pattern={}), "its factors have rank 2, adapter_config.json gives it r = 4"),
    ],
)
def test_bad_config(tmp_path, pair, capsys, mutate, needle):
    ad = _broken(tmp_path, pair, "bad", mutate)
    line = _merge_error(tmp_path, f"{pair[0]}+{ad}", capsys)
    assert needle in line and "adapter" in line, line


def test_adapter_without_weights(tmp_path, pair, capsys):
    empty = _broken(tmp_path, pair, "empty", mutate_tensors=lambda t: t.clear())
    assert "adapter_model.safetensors holds no tensors" in _merge_error(tmp_path, f"{pair[0]}+{empty}", capsys)
    none = _broken(tmp_path, pair, "none", weights=False)
    assert "no adapter_model.safetensors in" in _merge_error(tmp_path, f"{pair[0]}+{none}", capsys)


def test_unreadable_config(tmp_path, pair, capsys):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json: cannot read JSON" in _merge_error(tmp_path, f"{pair[0]}+{folder}", capsys)


Q = f"{P}model.layers.0.self_attn.q_proj"


def _set(**tensors):
    """A mutation that sets each named adapter tensor (``None`` deletes it)."""

    def mutate(t):
        for name, value in tensors.items():
            if value is None:
                del t[name]
            else:
                t[name] = value

    return mutate


def _unprefix_head(t):
    t["lm_head.weight"] = t.pop(f"{P}lm_head.weight")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            _set(**{Q + ".lora_B.weight": torch.zeros(31, 4)}),
            "shape mismatch for tensor model.layers.0.self_attn.q_proj.weight: the adapter's is [31, 32]",
        ),
        (_set(**{f"{P}lm_head.weight": torch.zeros(95, 32)}), "shape mismatch for tensor lm_head.weight"),
        (_set(**{Q + ".lora_B.weight": torch.zeros(32, 3)}), "are not factors of one matrix"),
        (
            _set(
                **{
                    f"{P}model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(4, 32),
                    f"{P}model.layers.9.mlp.up_proj.lora_B.weight": torch.zeros(64, 4),
                }
            ),
            "changes tensor 'model.layers.9.mlp.up_proj.weight', which model",
        ),
        (_set(**{Q + ".lora_B.weight": None}), "not both A and B"),
        (_unprefix_head, "does not start with 'base_model.model.'"),
    ],
    ids=["shape", "head", "not-factors", "stray", "half", "unprefixed"],
)
def test_shape_mismatch_and_unknown_tensor(tmp_path, pair, capsys, mutate, message):
    line = _merge_error(tmp_path, f"{pair[0]}+{_broken(tmp_path, pair, 'bad', mutate_tensors=mutate)}", capsys)
    assert message in line


def test_pickle_adapter_needs_the_opt_in(tmp_path, pair, capsys):
    base, _, adapter, t = pair
    folder = _broken(tmp_path, pair, "pkl", weights=False)
    torch.save(dict(t), folder / "adapter_model.bin")
    line = _merge_error(tmp_path, f"{base}+{folder}", capsys)
    assert "only pickle weights (adapter_model.bin) found; pass --allow-pickle" in line
    p = tmp_path / "ok.yaml"
    p.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": f"{base}+{folder}"}]}))
    splice.merge(p, tmp_path / "pk", quiet=True, allow_pickle=True)
    splice.merge(p, tmp_path / "st", quiet=True, allow_pickle=True, force=True)
    a = adapted_sd(base, t)
    got = load_sd(tmp_path / "pk")
    for k in got:
        torch.testing.assert_close(got[k].double(), a[k], rtol=1e-6, atol=1e-6)


def test_bad_reference_syntax_fails_at_parse_with_its_line(tmp_path, pair):
    base, _, adapter, _ = pair
    p = tmp_path / "r.yaml"
    p.write_text(f"merge_method: linear\nmodels:\n  - model: {base}+{adapter}+{adapter}\n    parameters: {{weight: 1.0}}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:3: models\[0\]\.model: a LoRA reference is 'model\+adapter'"):
        splice.merge(p, tmp_path / "out", quiet=True)
    p.write_text(f"merge_method: linear\nmodels:\n  - model: '{base}+'\n    parameters: {{weight: 1.0}}\n")
    with pytest.raises(RecipeError, match="both sides named"):
        splice.merge(p, tmp_path / "out", quiet=True)


def test_hub_ids_resolve_through_the_local_cache_only(tmp_path, monkeypatch, pair):
    """``org/model+org/adapter``, as published recipes write it: both from the local Hugging Face cache, never fetched."""
    import shutil

    import huggingface_hub.constants as c

    base, _, adapter, t = pair
    cache = tmp_path / "hub"
    for repo, folder in (("acme--tiny", base), ("acme--tiny-lora", adapter)):
        snap = cache / f"models--{repo}" / "snapshots" / "abc123"
        snap.parent.mkdir(parents=True)
        shutil.copytree(folder, snap)
        (cache / f"models--{repo}" / "refs").mkdir()
        (cache / f"models--{repo}" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    src = open_model("acme/tiny+acme/tiny-lora")
    a = adapted_sd(base, t)
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(src.get(name).double(), a[name], rtol=1e-6, atol=1e-6)
    src.close()
    with pytest.raises(CheckpointError, match="LoRA adapter 'acme/absent' not found"):
        open_model("acme/tiny+acme/absent")


def test_an_adapter_on_a_stage_of_a_multi_stage_recipe(tmp_path, pair):
    """A later stage reads ``stage+adapter``: the earlier stage's output with the adapter merged in."""
    base, ft, adapter, t = pair
    (tmp_path / "lora").symlink_to(adapter)
    docs = [
        {"name": "avg", "merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in (base, ft)]},
        {"merge_method": "passthrough", "models": [{"model": {"model": "avg", "lora": "lora"}}]},
    ]
    p = tmp_path / "multi.yaml"
    p.write_text(yaml.safe_dump_all(docs))
    splice.merge(p, tmp_path / "out", quiet=True)
    avg = {k: 0.5 * v.double() + 0.5 * load_sd(ft)[k].double() for k, v in load_sd(base).items()}
    got = load_sd(tmp_path / "out")
    q = "model.layers.0.self_attn.q_proj"
    want = expected(avg[q + ".weight"], t[f"{P}{q}.lora_A.weight"], t[f"{P}{q}.lora_B.weight"], 16 / 4)
    torch.testing.assert_close(got[q + ".weight"].double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["lm_head.weight"].double(), t[f"{P}lm_head.weight"].double())
    torch.testing.assert_close(got["model.norm.weight"].double(), avg["model.norm.weight"], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- real PEFT adapters (where the mergekit side venv has peft)

ROOT = Path(__file__).resolve().parents[1]


def _side_python() -> str | None:
    """The mergekit 0.1.5 side venv's python (it has peft), from $SPLICE_MERGEKIT_YAML or benchmarks/.venv-mergekit."""
    import os

    env = os.environ.get("SPLICE_MERGEKIT_YAML")
    for cand in ([Path(env).with_name("python")] if env else []) + [ROOT / "benchmarks" / ".venv-mergekit" / "bin" / "python"]:
        if cand.exists():
            return str(cand)
    return None


# Run in the side venv: a tiny model, a PEFT adapter on it (every LoRA parameter randomized, since PEFT
# starts B at zero), saved with PEFT, and PEFT's merge_and_unload of the two.
PEFT_SCRIPT = r"""
import sys
from pathlib import Path

import peft
import torch
import transformers as tf

out, kind, dtype = Path(sys.argv[1]), sys.argv[2], getattr(torch, sys.argv[3])
torch.manual_seed(0)
common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)
if kind == "qwen2":
    cfg = tf.Qwen2Config(**common)
    lcfg = dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], lora_bias=True, rank_pattern={"v_proj": 2})
elif kind == "llama":
    cfg = tf.LlamaConfig(**common)
    lcfg = dict(target_modules=["q_proj", "o_proj", "embed_tokens"], use_rslora=True, rank_pattern={r"model\.layers\.1\.self_attn\.q_proj": 2},
                alpha_pattern={"o_proj": 3})
else:
    cfg = tf.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    lcfg = dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
model = tf.AutoModelForCausalLM.from_config(cfg).to(dtype)
model.save_pretrained(out / "base")
pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **lcfg))
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for n, p in pm.named_parameters():
        if "lora_" in n or "modules_to_save" in n:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
pm.save_pretrained(out / "adapter")
merged = pm.merge_and_unload()
merged.save_pretrained(out / "merged")
print("ok", sorted(p.name for p in (out / "adapter").iterdir()))
"""


@pytest.mark.mergekit
@pytest.mark.skipif(_side_python() is None, reason="the mergekit side venv (with peft) is not built")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "kind",
    [
        "qwen2",  # lora_bias, modules_to_save, rank_pattern
        "llama",  # embedding LoRA (PEFT saves the embedding's base layer too), rsLoRA, rank and alpha patterns
        "gpt2",  # Conv1D layers: fan_in_fan_out
    ],
)
def test_real_peft_adapters_give_merge_and_unload_bit_for_bit(tmp_path, kind, dtype):
    import subprocess

    (tmp_path / "make.py").write_text(PEFT_SCRIPT)
    subprocess.run([_side_python(), str(tmp_path / "make.py"), str(tmp_path), kind, dtype], check=True, capture_output=True)
    merged = load_sd(tmp_path / "merged")
    src = open_model(f"{tmp_path / 'base'}+{tmp_path / 'adapter'}")
    try:
        assert set(merged) == set(src.keys())
        changed = [k for k in merged if not torch.equal(load_sd(tmp_path / "base")[k], merged[k])]
        assert len(changed) >= 5
        for k in merged:
            assert torch.equal(src.get(k), merged[k]), k
    finally:
        src.close()
