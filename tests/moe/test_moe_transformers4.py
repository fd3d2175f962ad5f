"""Opt-in: the outputs load in transformers 4.x too, with the same logits as in 5.x.

Set ``SPLICE_TF4_PYTHON`` to a Python whose ``transformers`` is 4.x (and has torch), e.g.::

    python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install "transformers>=4.57,<5"
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/tf4/lib/python3.11/site-packages/zz_main.pth  # reuse torch
    SPLICE_TF4_PYTHON=/tmp/tf4/bin/python .venv/bin/python -m pytest tests/moe -k transformers4
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from helpers import logits, write_tokenizer
from moe_helpers import make_expert, recipe

from splice.moe import build_moe, compress_moe

TF4 = os.environ.get("SPLICE_TF4_PYTHON")

CHECK = r"""
import json, sys, torch, transformers as tf
assert tf.__version__.startswith("4."), tf.__version__
ids = torch.tensor([json.loads(sys.argv[2])])
out = {}
for folder in sys.argv[3:]:
    m, info = tf.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, output_loading_info=True)
    m.eval()
    with torch.no_grad():
        out[folder] = {"logits": m(ids).logits.tolist(), "class": type(m).__name__, "missing": info["missing_keys"], "unexpected": info["unexpected_keys"]}
json.dump(out, open(sys.argv[1], "w"))
"""


@pytest.mark.skipif(not TF4, reason="set SPLICE_TF4_PYTHON to a Python with transformers 4.x")
def test_outputs_load_in_transformers4(tmp_path, moe_donors):
    import transformers as tf

    base, experts = moe_donors
    build_moe(recipe(base, experts, experts_per_token=2), tmp_path / "mixtral", quiet=True)
    r = recipe(base, experts[:2], experts_per_token=2)
    r["shared_experts"] = [{"source_model": str(base), "positive_prompts": ["t40 t41"]}]
    build_moe(r, tmp_path / "qwen2moe", quiet=True)
    torch.manual_seed(0)
    cfg = tf.Qwen3Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "q3")
    write_tokenizer(tmp_path / "q3", 96)
    q3 = [make_expert(tmp_path / "q3", tmp_path / f"q3e{i}", seed=i) for i in range(2)]
    build_moe(recipe(tmp_path / "q3", q3), tmp_path / "qwen3moe", quiet=True)
    (tmp_path / "cal.txt").write_text("t30 t31 t32 t33 t50 t51 t52\n\nt75 t76 t77 t78 t30 t31")
    compress_moe(tmp_path / "mixtral", tmp_path / "compressed", experts=2, calibration=[tmp_path / "cal.txt"], quiet=True)
    ids = [2, 5, 31, 33, 52, 60, 77, 90]
    folders = [str(tmp_path / n) for n in ("mixtral", "qwen2moe", "qwen3moe", "compressed")]
    res = tmp_path / "tf4.json"
    subprocess.run([TF4, "-c", CHECK, str(res), json.dumps(ids), *folders], check=True, capture_output=True)
    got = json.loads(res.read_text())
    want_class = {
        "mixtral": "MixtralForCausalLM",
        "qwen2moe": "Qwen2MoeForCausalLM",
        "qwen3moe": "Qwen3MoeForCausalLM",
        "compressed": "MixtralForCausalLM",
    }
    for f in folders:
        g = got[f]
        assert g["class"] == want_class[f.rsplit("/", 1)[1]] and not g["missing"] and not g["unexpected"], g
        torch.testing.assert_close(torch.tensor(g["logits"]), logits(f, ids), rtol=1e-5, atol=1e-5)
