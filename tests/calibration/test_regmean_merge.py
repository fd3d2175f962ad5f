"""regmean end to end on tiny models: calibrate, merge through the streaming engine, compare with the
method on the loaded statistics; and the one-line errors of recipes whose statistics are missing or wrong."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import load_sd, make_model, word_docs

import splice
from splice.calibration import model_fingerprint, open_statistics, save_statistics
from splice.checkpoint.reader import open_model
from splice.cli import main
from splice.errors import CheckpointError, MergeError, RecipeError
from splice.methods import get_method


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """A base, two fine-tunes, each calibrated on its own words (t30-t59 and t60-t95: the test tokenizer's
    special tokens t1 and t2 would split t10-t29)."""
    root = tmp_path_factory.mktemp("regmean")
    base = make_model(root / "base", "llama", seed=0, layers=2)
    fts = [make_model(root / f"ft{i}", "llama", seed=10 + i, layers=2, from_model=base, noise=0.05) for i in range(2)]
    stats = []
    for i, (ft, (lo, hi)) in enumerate(zip(fts, ((30, 60), (60, 96)))):
        text = root / f"text{i}.txt"
        text.write_text(word_docs(30, i, lo, hi, per_doc=40))
        stats.append(root / f"ft{i}.stats.safetensors")
        splice.calibrate(ft, text, stats[-1], tokens=600, seq_len=32, seed=i, quiet=True)
    return root, base, fts, stats


def recipe(tmp_path, fts, stats, **extra) -> str:
    data = {
        "merge_method": "regmean",
        "models": [{"model": str(m)} for m in fts],
        "calibration": {str(m): str(s) for m, s in zip(fts, stats)},
    }
    data.update(extra)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_merge_is_the_method_on_the_loaded_statistics(trio, tmp_path):
    root, base, fts, stats = trio
    splice.merge(recipe(tmp_path, fts, stats), tmp_path / "out", quiet=True)
    out = load_sd(tmp_path / "out")
    sds = [load_sd(f) for f in fts]
    sts = [open_statistics(s) for s in stats]
    rm = get_method("regmean")
    for name in (
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
        "model.embed_tokens.weight",
    ):
        ts = [sd[name].double() for sd in sds]
        expect = rm(ts, None, statistics=[st.load(st.key_for(name)) for st in sts])
        torch.testing.assert_close(out[name].double(), expect, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(out[name], (sds[0][name] + sds[1][name]) / 2, atol=1e-4), name  # not the plain average
    norm = "model.layers.0.input_layernorm.weight"
    torch.testing.assert_close(out[norm], (sds[0][norm] + sds[1][norm]) / 2)  # no statistics: linear
    # each model's own words keep that model's embedding rows
    torch.testing.assert_close(out["model.embed_tokens.weight"][40], sds[0]["model.embed_tokens.weight"][40])
    torch.testing.assert_close(out["model.embed_tokens.weight"][80], sds[1]["model.embed_tokens.weight"][80])


def test_with_a_base_the_same_merge(trio, tmp_path):
    root, base, fts, stats = trio
    splice.merge(recipe(tmp_path, fts, stats), tmp_path / "plain", quiet=True)
    splice.merge(recipe(tmp_path, fts, stats, base_model=str(base)), tmp_path / "based", quiet=True)
    a, b = load_sd(tmp_path / "plain"), load_sd(tmp_path / "based")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_recipe_errors(trio, tmp_path):
    root, base, fts, stats = trio
    a, b = str(fts[0]), str(fts[1])
    cases = [
        (dict(calibration=None), RecipeError, "needs calibration statistics: add 'calibration:'"),
        (dict(calibration={a: str(stats[0])}), RecipeError, f"needs calibration statistics for model {b}"),
        (dict(calibration={a: str(stats[1]), b: str(stats[0])}), CheckpointError, f"was measured on model {b}, not on {a}"),
        (dict(calibration={a: str(stats[0]), b: str(root / "nope.safetensors")}), CheckpointError, "nope.safetensors not found"),
        (dict(calibration={a: str(stats[0]), b + "x": str(stats[1])}), RecipeError, "in calibration"),
        (dict(merge_method="linear"), RecipeError, "uses no calibration statistics; remove 'calibration'"),
    ]
    for extra, err, needle in cases:
        p = recipe(tmp_path, fts, stats)
        data = yaml.safe_load(open(p))
        data.update(extra)
        if data["calibration"] is None:
            del data["calibration"]
        with pytest.raises(err, match=needle) as e:
            splice.merge(data, tmp_path / "out", quiet=True)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "out").exists()


def forged(path, model, gram_of, tokens=100):
    """A statistics file with ``model``'s fingerprint whose Grams are ``gram_of(in_features)`` (every token seen once)."""
    src = open_model(model)
    try:
        fp = model_fingerprint(src)
        linears = [k for k in src.keys() if k.endswith("proj.weight") or k == "lm_head.weight"]
        grams = {f"gram.{k}": gram_of(src.info(k).shape[1]) for k in linears}
        inputs = {k: f"gram.{k}" for k in linears}
    finally:
        src.close()
    counts = {"model.embed_tokens.weight": torch.ones(src.info("model.embed_tokens.weight").shape[0], dtype=torch.float64)}
    save_statistics(path, grams, inputs, counts, {"tokens": str(tokens), "model": str(model), "model_fingerprint": fp})
    return path


def test_statistics_of_the_wrong_shape_or_singular(trio, tmp_path, capsys):
    root, base, fts, stats = trio
    bad = forged(tmp_path / "bad.safetensors", fts[1], lambda n: torch.eye(n + 1, dtype=torch.float64))
    with pytest.raises(MergeError, match=r"have shape \[\d+, \d+\], which does not fit .* they come from another model"):
        splice.merge(recipe(tmp_path, fts, [stats[0], bad]), tmp_path / "out", quiet=True)
    zero = forged(tmp_path / "zero.safetensors", fts[1], lambda n: torch.zeros(n, n, dtype=torch.float64))
    zero0 = forged(tmp_path / "zero0.safetensors", fts[0], lambda n: torch.zeros(n, n, dtype=torch.float64))
    r = recipe(tmp_path, fts, [zero0, zero])
    with pytest.raises(MergeError, match="regmean failed: singular system"):
        splice.merge(r, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
    assert main(["merge", r, "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "singular system" in err[0]
    assert not (tmp_path / "out").exists()


def test_statistics_file_checks(tmp_path):
    from splice.calibration.stats import FORMAT

    p = tmp_path / "x.safetensors"
    save_statistics(p, {}, {}, {}, {"tokens": "5"})
    assert open_statistics(p).meta["format"] == FORMAT
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(p), metadata={"format": "other"})
    with pytest.raises(CheckpointError, match="not a splice statistics file"):
        open_statistics(p)
    save_file({"a": torch.zeros(2)}, str(p), metadata={"format": FORMAT, "inputs": json.dumps({"w": "gram.w"}), "tokens": "3"})
    with pytest.raises(CheckpointError, match="no tensor gram.w"):
        open_statistics(p)
