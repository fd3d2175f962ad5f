"""fisher end to end: the calibration pass's Fisher is the mean squared per-window gradient, and the merge
is the method on the loaded Fishers; a statistics file without a Fisher is refused in one line."""

from __future__ import annotations

import random

import pytest
import torch
import yaml
from helpers import load_sd, make_model

import splice
from splice.calibration import open_statistics, read_documents, sample_windows
from splice.errors import CheckpointError
from splice.methods import get_method


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fisher")
    base = make_model(root / "base", "llama", seed=0, layers=2)
    fts = [make_model(root / f"ft{i}", "llama", seed=20 + i, layers=2, from_model=base, noise=0.05) for i in range(2)]
    texts, stats = [], []
    for i, ft in enumerate(fts):
        rng = random.Random(i)
        texts.append(root / f"text{i}.txt")
        texts[-1].write_text("\n\n".join(" ".join(f"t{rng.randrange(30 + 30 * i, 60 + 30 * i)}" for _ in range(40)) for _ in range(20)))
        stats.append(root / f"ft{i}.stats.safetensors")
        splice.calibrate(ft, texts[-1], stats[-1], tokens=300, seq_len=32, seed=i, fisher=True, quiet=True)
    return root, fts, texts, stats


def test_fisher_is_the_mean_squared_window_gradient(pair):
    root, fts, texts, stats = pair
    from splice.hf import load_causal_lm

    lm, tok = load_causal_lm(fts[0], with_tokenizer=True)
    wins = sample_windows(tok, read_documents(texts[0]), tokens=300, seq_len=32, seed=0, bos=None, source="t")
    name = "model.layers.1.self_attn.v_proj.weight"
    p = dict(lm.named_parameters())[name]
    expect = torch.zeros(p.shape)
    for w in wins:
        lm.zero_grad()
        ids = torch.tensor([w])
        lm(input_ids=ids, labels=ids).loss.backward()
        expect += p.grad.square()
    st = open_statistics(stats[0])
    assert st.meta["fisher_windows"] == str(len(wins))
    torch.testing.assert_close(st.load(st.key_for(name, "fisher")).float(), expect / len(wins), rtol=1e-4, atol=1e-12)


def test_merge_is_the_method_on_the_loaded_fishers(pair, tmp_path):
    root, fts, texts, stats = pair
    recipe = {
        "merge_method": "fisher",
        "models": [{"model": str(m)} for m in fts],
        "calibration": {str(m): str(s) for m, s in zip(fts, stats)},
    }
    splice.merge(recipe, tmp_path / "out", quiet=True)
    out = load_sd(tmp_path / "out")
    sds = [load_sd(f) for f in fts]
    sts = [open_statistics(s) for s in stats]
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        expect = get_method("fisher")(
            [sd[name].double() for sd in sds], None, statistics=[st.load(st.key_for(name, "fisher")) for st in sts]
        )
        torch.testing.assert_close(out[name].double(), expect, rtol=1e-5, atol=1e-6)


def test_statistics_without_a_fisher_are_refused(pair, tmp_path):
    root, fts, texts, stats = pair
    plain = tmp_path / "plain.safetensors"
    splice.calibrate(fts[1], texts[1], plain, tokens=200, seq_len=32, quiet=True)
    p = tmp_path / "r.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "merge_method": "fisher",
                "models": [{"model": str(m)} for m in fts],
                "calibration": {str(fts[0]): str(stats[0]), str(fts[1]): str(plain)},
            }
        )
    )
    with pytest.raises(CheckpointError, match=r"holds no Fisher; 'fisher' needs one \(splice calibrate --fisher\)") as e:
        splice.merge(p, tmp_path / "out", quiet=True)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
