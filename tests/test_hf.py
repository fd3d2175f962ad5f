"""splice.hf.load_causal_lm: one loader for folders, single files and built-from-config models, with one-line errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import load_sd, logits, make_model, tiny_config
from safetensors.torch import save_file

from splice.errors import CheckpointError
from splice.hf import dtype_kwargs, load_causal_lm

IDS = (1, 5, 7, 9)


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor([list(IDS)])).logits


def test_folder_loads_like_transformers_with_its_tokenizer(tmp_path):
    folder = make_model(tmp_path / "m", "llama", layers=2)
    model, tok = load_causal_lm(folder, with_tokenizer=True)
    assert not model.training and tok("t5 t6")["input_ids"] == [5, 6]
    torch.testing.assert_close(_logits(model), logits(folder), rtol=0, atol=0)
    assert load_causal_lm(folder, dtype=torch.float64).dtype == torch.float64
    assert load_causal_lm(folder, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="unknown dtype 'float33'"):
        load_causal_lm(folder, dtype="float33")


def test_one_file_beside_another_model_loads_that_file(tmp_path):
    a = make_model(tmp_path / "a", "llama", seed=1, layers=2)
    b = make_model(tmp_path / "b", "llama", seed=2, layers=2)
    shutil.copy(b / "model.safetensors", a / "other.safetensors")  # a's folder: a's config, a's weights, and b's file
    model = load_causal_lm(a / "other.safetensors")  # built from a's config, filled from the file
    torch.testing.assert_close(_logits(model), logits(b), rtol=0, atol=0)


def _single_file(tmp_path, sd, name="w.safetensors"):
    folder = make_model(tmp_path / "ref", "llama", layers=2, tokenizer=False)
    (folder / "model.safetensors").unlink()
    save_file(sd, str(folder / name))
    return folder / name


def test_built_from_config_checks_every_tensor(tmp_path):
    sd = load_sd(make_model(tmp_path / "src", "llama", layers=2))
    ok = dict(sd, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})  # stored by older checkpoints
    f = _single_file(tmp_path, ok)
    torch.testing.assert_close(_logits(load_causal_lm(f)), logits(tmp_path / "src"), rtol=0, atol=0)
    f.unlink()
    save_file(dict(sd, **{"model.extra.weight": torch.ones(2)}), str(f))
    with pytest.raises(CheckpointError, match=r"tensor 'model.extra.weight' is not part of a 'llama' model"):
        load_causal_lm(f)
    save_file(dict(sd, **{"model.norm.weight": torch.ones(7)}), str(f))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \[7\], a 'llama' model expects \[32\]"):
        load_causal_lm(f)
    save_file({k: v for k, v in sd.items() if k != "model.norm.weight"}, str(f))
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' missing for a 'llama' model"):
        load_causal_lm(f)


def test_missing_tokenizer_is_one_line(tmp_path):
    folder = make_model(tmp_path / "m", "llama", layers=2, tokenizer=False)
    with pytest.raises(CheckpointError, match=r"no tokenizer files found$"):
        load_causal_lm(folder, with_tokenizer=True)
    other = make_model(tmp_path / "t", "llama", layers=2)
    _, tok = load_causal_lm(folder, with_tokenizer=True, tokenizer=other)
    assert tok.eos_token == "t1"


def test_dtype_keyword_works_with_the_installed_transformers():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama", layers=1), **dtype_kwargs(torch.float16))
    assert model.dtype == torch.float16
