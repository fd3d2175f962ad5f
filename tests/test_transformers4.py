"""Outputs that transformers 4.x reads exactly as 5.x does: config.json with top-level rope_theta /
rope_scaling beside rope_parameters, a tokenizer class 4.x knows.

The end-to-end test runs a small script under a Python whose transformers is 4.x:
``SPLICE_TF4_PYTHON``, else the first of ``benchmarks/.venv-tf4`` and mergekit 0.1.5's side venv
(``benchmarks/.venv-mergekit``) whose transformers is 4.x. It runs whenever such an interpreter
exists. (mergekit 0.1.5 does not pin transformers 4.x: its side venv may well have 5.x.)
One that reuses this venv's torch::

    python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install --no-deps "transformers==4.57.*" "tokenizers>=0.22,<=0.23.0" "huggingface_hub<1.0"
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/tf4/lib/python3.11/site-packages/zz_main.pth
    SPLICE_TF4_PYTHON=/tmp/tf4/bin/python .venv/bin/python -m pytest tests/test_transformers4.py
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from gguf_helpers import bpe_tokenizer, write_llama_gguf
from helpers import tiny_config

import splice
from splice.checkpoint.compat import config_for_both, tokenizer_config_for_both

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TEXT = "def f(x):\n    return x + 1  # In the beginning, outputs were read by two majors"

CHECK = r"""
import json, sys, torch, transformers as tf
ids = json.loads(sys.argv[2])
out = {"version": tf.__version__}
for folder in sys.argv[4:]:
    m, info = tf.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, output_loading_info=True)
    m.eval()
    tok = tf.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        lg = m(torch.tensor([ids])).logits.tolist()
    out[folder] = {"logits": lg, "missing": info["missing_keys"], "unexpected": info["unexpected_keys"],
                   "rope_theta": m.config.rope_theta, "tokenizer": type(tok).__name__,
                   "encoded": tok(sys.argv[3], add_special_tokens=False).input_ids, "eos": tok.eos_token}
json.dump(out, open(sys.argv[1], "w"))
"""


def _transformers_version(python: str) -> str | None:
    if not Path(python).exists():
        return None
    r = subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def _tf4_python() -> str | None:
    """SPLICE_TF4_PYTHON (which must then have 4.x), else the first benchmark venv with transformers 4.x."""
    env = os.environ.get("SPLICE_TF4_PYTHON")
    if env:
        return env
    for venv in (".venv-tf4", ".venv-mergekit"):
        py = str(_BENCH / venv / "bin" / "python")
        if (_transformers_version(py) or "").startswith("4."):
            return py
    return None


TF4 = _tf4_python()


# -------------------------------------------------------------- the two rewrites, on their own


def test_rope_parameters_get_their_transformers4_keys():
    assert config_for_both({"model_type": "llama", "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}) == {
        "model_type": "llama",
        "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"},
        "rope_theta": 1e5,
    }
    scaled = config_for_both({"rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}})
    assert scaled["rope_theta"] == 5e5 and scaled["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    gemma = config_for_both(
        {
            "model_type": "gemma3_text",
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            },
        }
    )
    assert gemma["rope_theta"] == 1e6 and gemma["rope_local_base_freq"] == 1e4 and gemma["rope_scaling"]["factor"] == 8.0
    nested = config_for_both({"text_config": {"rope_parameters": {"rope_theta": 7.0, "rope_type": "default"}}})
    assert nested["text_config"]["rope_theta"] == 7.0
    old = {"model_type": "llama", "rope_theta": 1e5, "rope_scaling": None}
    assert config_for_both(old) == old  # a 4.x config comes back as it was
    kept = config_for_both({"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}, "rope_theta": 3.0})
    assert kept["rope_theta"] == 3.0  # never overwritten


def test_tokenizer_config_gets_a_class_and_special_tokens_transformers4_reads():
    tf5 = {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers", "extra_special_tokens": ["<a>", "<b>"], "eos_token": "<e>"}
    both = tokenizer_config_for_both(tf5, has_tokenizer_json=True)
    assert both == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "backend": "tokenizers",
        "additional_special_tokens": ["<a>", "<b>"],
        "eos_token": "<e>",
    }
    assert tokenizer_config_for_both(tf5, has_tokenizer_json=False)["tokenizer_class"] == "TokenizersBackend"  # nothing else to read
    named = {"tokenizer_class": "LlamaTokenizerFast", "extra_special_tokens": {"image_token": "<img>"}}
    assert tokenizer_config_for_both(named, True) == named


def test_transformers5_reads_the_rewritten_config_and_tokenizer_as_before(tmp_path):
    """Adding 4.x's keys changes nothing for 5.x: same rope settings, same tokenizer, same logits."""
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
    )
    cfg.rope_parameters = {"rope_theta": 123456.0, "rope_type": "linear", "factor": 2.0}
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    bpe_tokenizer(src, TEXT)
    out = tmp_path / "out"
    splice.merge({"merge_method": "passthrough", "models": [{"model": str(src)}]}, out, quiet=True)
    written = json.loads((out / "config.json").read_text())
    assert written["rope_theta"] == 123456.0 and written["rope_scaling"]["factor"] == 2.0
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    again = tf.AutoConfig.from_pretrained(out)
    assert again.rope_parameters == tf.AutoConfig.from_pretrained(src).rope_parameters
    ids = tf.AutoTokenizer.from_pretrained(out)(TEXT).input_ids
    assert ids == tf.AutoTokenizer.from_pretrained(src)(TEXT).input_ids
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits
        got = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(torch.tensor([ids])).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# -------------------------------------------------------------- end to end, under transformers 4.x


@pytest.mark.skipif(TF4 is None, reason="no Python with transformers 4.x (set SPLICE_TF4_PYTHON, or build benchmarks/.venv-tf4)")
def test_outputs_load_in_transformers4_with_the_logits_and_tokens_of_transformers5(tmp_path):
    """A merge of transformers-5 folders and a folder converted from a GGUF (rope base 100000, where
    4.x's default is 10000) load under 4.x with 5.x's logits and token ids."""
    import transformers as tf

    from splice.checkpoint.gguf import gguf_to_folder

    tok_dir = tmp_path / "tok"
    tok_json = bpe_tokenizer(tok_dir, TEXT + Path(__file__).read_text())
    vocab = len(tok_json["model"]["vocab"])
    cfg = tiny_config("llama", 2, vocab, 64, intermediate=96, tie=True, positions=128, rope_theta=100000.0)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # weights large enough that the rope base moves the logits visibly
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    gguf_file = tmp_path / "m.gguf"
    write_llama_gguf(gguf_file, model, tok_json)
    converted = gguf_to_folder(gguf_file, tmp_path / "converted")

    a = tmp_path / "a"
    model.save_pretrained(a)
    for f in tok_dir.iterdir():
        (a / f.name).write_bytes(f.read_bytes())
    assert json.loads((a / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"  # what 5.x saves
    merged = tmp_path / "merged"
    splice.merge(
        {"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [{"model": str(a)}, {"model": str(converted)}]},
        merged,
        quiet=True,
    )

    ids = tf.AutoTokenizer.from_pretrained(tok_dir)(TEXT, add_special_tokens=False).input_ids[:24]
    folders = [str(converted), str(merged)]
    res = tmp_path / "tf4.json"
    r = subprocess.run([TF4, "-c", CHECK, str(res), json.dumps(ids), TEXT, *folders], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(res.read_text())
    assert got["version"].startswith("4."), got["version"]
    for f in folders:
        g = got[f]
        assert not g["missing"] and not g["unexpected"], g
        assert g["rope_theta"] == 100000.0 and g["tokenizer"] == "PreTrainedTokenizerFast"
        tok5 = tf.AutoTokenizer.from_pretrained(f)
        assert g["encoded"] == tok5(TEXT, add_special_tokens=False).input_ids and g["eos"] == tok5.eos_token
        m5 = tf.AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()
        with torch.no_grad():
            want = m5(torch.tensor([ids])).logits
        torch.testing.assert_close(torch.tensor(g["logits"]), want, rtol=1e-5, atol=1e-5)
    # and the base matters: with 4.x's default base the logits would differ
    with torch.no_grad():
        cfg10k = tf.AutoConfig.from_pretrained(converted)
        cfg10k.rope_parameters = {"rope_theta": 10000.0, "rope_type": "default"}
        m10k = tf.AutoModelForCausalLM.from_pretrained(converted, config=cfg10k, dtype=torch.float32).eval()
        assert not torch.allclose(m10k(torch.tensor([ids])).logits, torch.tensor(got[str(converted)]["logits"]), atol=1e-3)
