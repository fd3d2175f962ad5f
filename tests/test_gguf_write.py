"""GGUF out: ``splice convert MODEL --gguf F`` and ``splice merge ... --gguf F``, read back by transformers'
own GGUF loader (same logits as the source for f32; within a stated tolerance for f16/bf16/q8_0) and by splice."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from gguf_helpers import bpe_tokenizer
from helpers import tiny_config

from splice.checkpoint.gguf_write import write_gguf
from splice.checkpoint.reader import open_model
from splice.cli import main
from splice.errors import CheckpointError

TEXT = "def write_gguf(model, out):\n    return 42  # the GGUF holds the tokenizer too <|endoftext|>"
IDS = [5, 17, 300, 42, 7, 199, 3, 250]
CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"

# largest |logit difference| allowed against the float32 source, per stored type, for these
# tiny random models (logits of size ~1): float16 keeps ~3 decimal digits, bfloat16 ~2, Q8_0
# (8-bit values, one float16 scale per 32) about as much as bfloat16
TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2}


def _model(folder: Path, family: str, *, tie: bool, template: bool = False):
    import transformers as tf

    tok = bpe_tokenizer(folder, TEXT * 3 + Path(__file__).read_text())
    cfg = tiny_config(family, 2, len(tok["model"]["vocab"]), 64, intermediate=96, tie=tie, positions=128, rope_theta=50000.0)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(folder)
    if template:
        (folder / "chat_template.jinja").write_text(CHAT)
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_llama") / "m"
    d.mkdir()
    return d, _model(d, "llama", tie=False, template=True)


def _hf_logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def _transformers_reads(gguf: Path):
    """The model and tokenizer transformers' own GGUF loader makes of the file."""
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate (in splice's test extra)")
    import transformers as tf

    m = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return m, tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0"])
def test_transformers_reads_the_llama_gguf_with_the_source_logits_and_tokens(tmp_path, llama, gguf_type):
    import transformers as tf

    src, model = llama
    f = write_gguf(src, tmp_path / f"m-{gguf_type}.gguf", gguf_type=gguf_type)
    got, tok = _transformers_reads(f)
    assert type(got).__name__ == "LlamaForCausalLM" and got.config.rope_parameters["rope_theta"] == 50000.0
    diff = (_hf_logits(got) - _hf_logits(model)).abs().max().item()
    assert diff <= TOLERANCE[gguf_type], diff
    ours = tf.AutoTokenizer.from_pretrained(src)
    assert tok(TEXT).input_ids == ours(TEXT).input_ids and tok.eos_token == ours.eos_token
    assert tok.chat_template == CHAT


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_families_with_tied_embeddings_read_back_exactly(tmp_path, family):
    d = tmp_path / "m"
    d.mkdir()
    model = _model(d, family, tie=True)
    f = write_gguf(d, tmp_path / "m.gguf", gguf_type="f32")
    got, _ = _transformers_reads(f)
    assert type(got).__name__.lower().startswith(family) and got.config.tie_word_embeddings
    torch.testing.assert_close(_hf_logits(got), _hf_logits(model), rtol=0, atol=1e-6)


def test_splice_reads_its_gguf_back_and_memory_follows_one_tensor(tmp_path, llama, monkeypatch):
    """Its own GGUF input path gives the source tensors back (q/k un-permuted); tensors are read one at a time."""
    from splice.checkpoint.reader import FolderSource

    src, model = llama
    alive, most = weakref.WeakSet(), [0]
    get = FolderSource.get

    def tracked(self, name):
        most[0] = max(most[0], len(alive))
        t = get(self, name)
        alive.add(t)
        return t

    monkeypatch.setattr(FolderSource, "get", tracked)
    f = write_gguf(src, tmp_path / "m.gguf", gguf_type="f32")
    assert most[0] <= 1, most[0]  # the previous tensor is gone when the next is read
    monkeypatch.setattr(FolderSource, "get", get)
    back = open_model(f)
    sd = model.state_dict()
    assert set(back.keys()) == set(sd)
    for k in sd:
        assert torch.equal(back.get(k), sd[k]), k
    assert back.config["rope_theta" if "rope_theta" in back.config else "rope_parameters"]
    out = tmp_path / "again"
    main(["merge", _passthrough(tmp_path, f), "-o", str(out), "-q"])
    from helpers import logits

    torch.testing.assert_close(logits(out, IDS), _hf_logits(model), rtol=1e-5, atol=1e-5)


def _passthrough(tmp_path: Path, model) -> str:
    r = tmp_path / "r.yml"
    r.write_text(f"merge_method: passthrough\nmodels:\n  - model: {model}\n")
    return str(r)


def test_cli_convert_and_merge_write_ggufs(tmp_path, llama, capsys):
    src, model = llama
    assert main(["convert", str(src), "--gguf", str(tmp_path / "c.gguf"), "--gguf-type", "q8_0", "-q"]) == 0
    assert "GGUF q8_0" in capsys.readouterr().out
    r = _passthrough(tmp_path, src)
    assert main(["merge", r, "-o", str(tmp_path / "out"), "--gguf", str(tmp_path / "out.gguf"), "--gguf-type", "f32", "-q"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
    back = open_model(tmp_path / "out.gguf")
    assert torch.equal(back.get("model.layers.1.self_attn.k_proj.weight"), model.state_dict()["model.layers.1.self_attn.k_proj.weight"])


def _errors(capsys) -> list[str]:
    return [l for l in capsys.readouterr().err.splitlines() if l.startswith("splice: error:")]


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_one_line_errors_and_nothing_left_behind(tmp_path, llama, capsys):
    src, _ = llama
    f = tmp_path / "m.gguf"
    f.write_text("precious")
    assert main(["convert", str(src), "--gguf", str(f)]) == 2
    assert _errors(capsys) == [f"splice: error: output {f} exists; pass --force to overwrite it"]
    assert f.read_text() == "precious"
    assert main(["convert", str(src), "--gguf", str(tmp_path / "m.bin")]) == 2
    assert "a GGUF file name ends in .gguf" in _errors(capsys)[0]
    assert main(["convert", str(src), "--gguf", str(tmp_path)]) == 2
    assert "is a folder" in _errors(capsys)[0]
    assert main(["convert", str(src), "--gguf", str(src / "inside.gguf")]) == 2
    assert "lies inside the input" in _errors(capsys)[0]
    assert main(["convert", str(src), "--gguf", str(tmp_path / "x.gguf"), "--gguf-type", "q4"]) == 2
    assert "--gguf-type" in _errors(capsys)[0]
    assert _left(tmp_path) == ["m.gguf"]
    # a GGUF input converted onto itself, even with --force
    write_gguf(src, tmp_path / "in.gguf", gguf_type="f32")
    assert main(["convert", str(tmp_path / "in.gguf"), "--gguf", str(tmp_path / "in.gguf"), "--force"]) == 2
    assert "is the input" in _errors(capsys)[0]
    # --force replaces
    assert main(["convert", str(src), "--gguf", str(f), "--force", "-q"]) == 0
    assert f.read_bytes()[:4] == b"GGUF" and _left(tmp_path) == ["in.gguf", "m.gguf"]


def test_merge_checks_the_gguf_before_any_work(tmp_path, llama, capsys):
    src, _ = llama
    r = _passthrough(tmp_path, src)
    (tmp_path / "taken.gguf").write_text("x")
    assert main(["merge", r, "-o", str(tmp_path / "out"), "--gguf", str(tmp_path / "taken.gguf")]) == 2
    assert _errors(capsys) == [f"splice: error: output {tmp_path / 'taken.gguf'} exists; pass --force to overwrite it"]
    assert main(["merge", r, "-o", str(tmp_path / "out"), "--gguf", str(tmp_path / "out" / "m.gguf")]) == 2
    assert "lies inside the input" in _errors(capsys)[0]
    assert main(["merge", r, "-o", str(tmp_path / "out"), "--gguf", r]) == 2
    assert _left(tmp_path) == ["r.yml", "taken.gguf"]  # no merge was written


def test_unsupported_architecture_and_tokenizer(tmp_path, capsys):
    from helpers import make_model

    gpt2 = make_model(tmp_path / "gpt2", "gpt2", layers=1)
    with pytest.raises(CheckpointError, match=r"GGUF output supports model types llama, qwen2, qwen3, not 'gpt2'"):
        write_gguf(gpt2, tmp_path / "g.gguf")
    word_level = make_model(tmp_path / "wl", "llama", layers=1)  # a WordLevel tokenizer: GGUF has no such model
    f = write_gguf(word_level, tmp_path / "wl.gguf", gguf_type="f32", quiet=False)
    assert "tokenizer model 'WordLevel' is not BPE: the GGUF has no tokenizer" in capsys.readouterr().err
    assert set(open_model(f).keys()) == set(open_model(word_level).keys())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "wl", "wl.gguf"]


def test_a_sentencepiece_style_bpe_is_written_as_a_llama_vocabulary(tmp_path):
    """Byte fallback and ``▁`` (Llama 2, Mistral style): tokenizer.ggml.model llama, <0xNN> tokens as bytes;
    transformers' GGUF tokenizer then encodes like the source, bytes included."""
    import transformers as tf
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", *[f"<0x{i:02X}>" for i in range(256)]]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    tok.train_from_iterator([Path(__file__).read_text()], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d = tmp_path / "m"
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(d)
    cfg = tf.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    f = write_gguf(d, tmp_path / "m.gguf", gguf_type="f32")
    fields = GGUFReader(f).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tok.token_to_id("<0x41>")] == 6 and types[tok.token_to_id("<s>")] == 3
    ours, theirs = tf.AutoTokenizer.from_pretrained(d), tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file=f.name)
    for text in ["splice merges models", "Hello w\u00f6rld \u2713 123", " two  spaces"]:
        assert theirs(text).input_ids == ours(text).input_ids, text
