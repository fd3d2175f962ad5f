"""The calibration pass: seeded windows across documents, Grams equal to X^T X of the real inputs, the
statistics file's keys and provenance, and one-line errors for bad text, counts and outputs."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import make_model

from splice.calibration import calibrate as calibrate_fn
from splice.calibration import open_statistics, read_documents, sample_windows
from splice.cli import main
from splice.errors import SpliceError
from splice.options import OptionError


def words(n: int, seed: int, vocab: int = 96) -> str:
    rng = random.Random(seed)
    return " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(n))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    model = make_model(root / "m", "llama", seed=3, layers=2)
    text = root / "text.txt"
    text.write_text("\n\n".join(words(60, s) for s in range(30)))
    return root, model, text


def test_grams_are_the_inputs_x_transpose_x(setup, tmp_path):
    root, model, text = setup
    out = tmp_path / "s.safetensors"
    s = calibrate_fn(model, text, out, tokens=500, seed=1, seq_len=32, quiet=True)
    assert s["tokens"] == 500
    st = open_statistics(out)
    assert st.tokens == 500 and st.meta["seed"] == "1" and st.meta["model"] == str(model)
    assert len(st.meta["model_fingerprint"]) == 64 and len(st.meta["text_sha256"]) == 64
    # one Gram per distinct input: q/k/v share one, gate/up share one
    qkv = "gram.model.layers.0.self_attn.q_proj+k_proj+v_proj"
    assert {st.inputs[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"} == {qkv}
    assert st.inputs["model.layers.1.mlp.gate_proj.weight"] == st.inputs["model.layers.1.mlp.up_proj.weight"]
    assert st.inputs["model.layers.1.mlp.down_proj.weight"] == "gram.model.layers.1.mlp.down_proj"
    assert len(set(st.inputs.values())) == 2 * 4 + 1  # per layer qkv, o, gate+up, down; and the untied head
    # the head's input is the final norm's output: the last hidden state
    from splice.hf import load_causal_lm

    lm, tok = load_causal_lm(model, with_tokenizer=True)
    wins = sample_windows(tok, read_documents(text), tokens=500, seq_len=32, seed=1, bos=None, source="t")
    expect = torch.zeros(32, 32, dtype=torch.float64)
    counts = torch.zeros(96, dtype=torch.float64)
    with torch.no_grad():
        for w in wins:
            h = lm(input_ids=torch.tensor([w]), output_hidden_states=True).hidden_states[-1][0].double()
            expect += h.T @ h
            counts += torch.bincount(torch.tensor(w), minlength=96).double()
    torch.testing.assert_close(st.load(st.key_for("lm_head.weight")), expect / 500, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(st.load(st.key_for("model.embed_tokens.weight")), counts / 500)


def test_same_seed_same_bytes_other_seed_other_windows(setup, tmp_path):
    root, model, text = setup
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    for p, seed in ((a, 4), (b, 4), (c, 5)):
        calibrate_fn(model, text, p, tokens=300, seed=seed, seq_len=32, quiet=True)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_windows_are_drawn_across_documents():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"d{i}": i for i in range(50)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="d0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="d0")
    docs = [" ".join([f"d{i}"] * 100) for i in range(50)]  # document i is token i, 100 times
    wins = sample_windows(tok, docs, tokens=400, seq_len=20, seed=0, bos=None, source="t")
    assert sum(len(w) for w in wins) == 400
    assert len({w[0] for w in wins}) >= 8  # not the first 400 tokens (documents 0-3)
    assert sample_windows(tok, docs, tokens=400, seq_len=20, seed=0, bos=None, source="t") == wins
    with_bos = sample_windows(tok, docs, tokens=400, seq_len=20, seed=0, bos=49, source="t")
    assert all(w[0] == 49 and len(w) <= 20 for w in with_bos)


def test_jsonl_documents(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "a b"}) + "\n\n" + json.dumps({"text": "c"}) + "\n")
    assert read_documents(p) == ["a b", "c"]
    p.write_text('{"txt": 1}\n')
    with pytest.raises(SpliceError, match=r"d.jsonl:1: expected a JSON object"):
        read_documents(p)


def test_bad_text_and_counts_are_one_line_errors(setup, tmp_path):
    root, model, text = setup
    out = tmp_path / "s.safetensors"
    (tmp_path / "bin.txt").write_bytes(b"t5 t6 \xff\xfe t7")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "short.txt").write_text(words(40, 1))
    cases = [
        (dict(text=tmp_path / "missing.txt"), OptionError, "file not found"),
        (dict(text=tmp_path / "bin.txt"), OptionError, "not UTF-8 text"),
        (dict(text=tmp_path / "empty.txt"), SpliceError, "is empty"),
        (dict(text=tmp_path / "short.txt"), SpliceError, "fewer than the 500 asked for"),
        (dict(tokens=0), OptionError, "tokens"),
        (dict(tokens="many"), OptionError, "tokens"),
        (dict(seq_len=1), OptionError, "seq_len"),
    ]
    for kw, err, needle in cases:
        args = {"text": text, "tokens": 500, **kw}
        with pytest.raises(err, match=needle) as e:
            calibrate_fn(model, args.pop("text"), out, quiet=True, **args)
        assert "\n" not in str(e.value)
        assert not out.exists()


def test_output_rules(setup, tmp_path, capsys):
    root, model, text = setup
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(SpliceError, match="exists; pass force=True"):
        calibrate_fn(model, text, out, tokens=100, quiet=True)
    assert out.read_bytes() == b"old"
    with pytest.raises(SpliceError, match="is the input"):
        calibrate_fn(model, text, text, tokens=100, quiet=True, force=True)
    with pytest.raises(SpliceError, match="lies inside the input"):
        calibrate_fn(model, text, model / "s.safetensors", tokens=100, quiet=True)
    calibrate_fn(model, text, out, tokens=100, quiet=True, force=True)
    assert open_statistics(out).tokens == 100
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_cli(setup, tmp_path, capsys):
    root, model, text = setup
    out = tmp_path / "cli.safetensors"
    assert main(["calibrate", str(model), "--text", str(text), "--tokens", "200", "--seq-len", "32", "-o", str(out), "-q"]) == 0
    assert "wrote" in capsys.readouterr().out and open_statistics(out).tokens == 200
    for args, needle in (
        (["--tokens", "0"], "--tokens 0: must be"),
        (["--tokens", "200"], "exists; pass --force"),
        (["--tokens", "100000", "--force"], "fewer than the 100000 asked for"),
    ):
        code = main(["calibrate", str(model), "--text", str(text), "-o", str(out), "-q", *args])
        err = capsys.readouterr().err.splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], err
