"""The statistics cache: the same model, text and settings are measured once; any change measures again."""

from __future__ import annotations

import pytest
import yaml
from helpers import load_sd, make_model, word_docs

import splice
import splice.hf
from splice.calibration import open_statistics
from splice.calibration.cache import cache_dir
from splice.cli import main
from splice.errors import RecipeError


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    base = make_model(root / "base", "llama", seed=0, layers=1)
    fts = [make_model(root / f"ft{i}", "llama", seed=20 + i, layers=1, from_model=base, noise=0.05) for i in range(2)]
    texts = []
    for i in range(2):
        texts.append(root / f"text{i}.txt")
        texts[-1].write_text(word_docs(12, i))
    return root, fts, texts


@pytest.fixture
def loads(monkeypatch):
    """How many times a model was loaded to be measured (the calibration pass's first step)."""
    calls = []
    real = splice.hf.load_causal_lm

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(splice.hf, "load_causal_lm", counting)
    return calls


def test_same_request_reuses_the_file_a_changed_one_measures_again(pair, tmp_path, loads):
    root, fts, texts = pair
    kw = dict(tokens=200, seq_len=32, seed=0, quiet=True, cache=tmp_path)
    first = splice.calibrate(fts[0], texts[0], **kw)
    again = splice.calibrate(fts[0], texts[0], **kw)
    assert not first["cached"] and again["cached"] and again["out"] == first["out"] and len(loads) == 1
    assert again["tokens"] == first["tokens"] == 200 and again["grams"] == first["grams"]
    other_text = splice.calibrate(fts[0], texts[1], **kw)
    other_seed = splice.calibrate(fts[0], texts[0], **{**kw, "seed": 1})
    other_budget = splice.calibrate(fts[0], texts[0], **{**kw, "tokens": 150})
    other_model = splice.calibrate(fts[1], texts[0], **kw)
    with_fisher = splice.calibrate(fts[0], texts[0], **kw, fisher=True)
    outs = {r["out"] for r in (first, other_text, other_seed, other_budget, other_model, with_fisher)}
    assert len(outs) == 6 and len(loads) == 6 and not any(r["cached"] for r in (other_text, other_budget, with_fisher))
    assert open_statistics(with_fisher["out"]).fisher and not open_statistics(first["out"]).fisher
    # the text is identified by its bytes, not its name: edited in place, it is measured again
    edited = root / "edited.txt"
    edited.write_text(word_docs(12, 0))
    assert splice.calibrate(fts[0], edited, **kw)["cached"]
    edited.write_text(word_docs(12, 5))
    assert not splice.calibrate(fts[0], edited, **kw)["cached"]
    # a damaged cache file is measured again and replaced
    with open(first["out"], "r+b") as f:
        f.write(b"\0" * 16)
    redo = splice.calibrate(fts[0], texts[0], **kw)
    assert not redo["cached"] and redo["out"] == first["out"] and open_statistics(redo["out"]).tokens == 200
    assert not list(tmp_path.glob(".*splice-tmp*"))  # written atomically: no temporary file left


def recipe(tmp_path, fts, texts, **spec) -> str:
    data = {
        "merge_method": "regmean",
        "models": [{"model": str(m)} for m in fts],
        "calibration": {str(m): {"text": str(t), "tokens": 200, "seq_len": 32, **spec} for m, t in zip(fts, texts)},
    }
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_a_second_merge_reuses_the_statistics_of_the_first(pair, tmp_path, loads):
    root, fts, texts = pair
    r = recipe(tmp_path, fts, texts)
    splice.merge(r, tmp_path / "a", quiet=True)
    assert len(loads) == 2 and len(list(cache_dir().glob("*.safetensors"))) >= 2
    assert main(["merge", r, "-o", str(tmp_path / "b"), "-q"]) == 0
    assert len(loads) == 2  # nothing measured again
    a, b = load_sd(tmp_path / "a"), load_sd(tmp_path / "b")
    assert all((a[k] == b[k]).all() for k in a)
    # the same as statistics files named in the recipe
    files = []
    for i, (m, t) in enumerate(zip(fts, texts)):
        files.append(tmp_path / f"{i}.safetensors")
        splice.calibrate(m, t, files[-1], tokens=200, seq_len=32, quiet=True)
    data = yaml.safe_load(open(r))
    data["calibration"] = {str(m): str(f) for m, f in zip(fts, files)}
    splice.merge(data, tmp_path / "c", quiet=True)
    c = load_sd(tmp_path / "c")
    assert all((a[k] == c[k]).all() for k in a)
    # another seed is another request
    splice.merge(recipe(tmp_path, fts, texts, seed=3), tmp_path / "d", quiet=True)
    assert len(loads) == 6


def test_calibration_mapping_errors(pair, tmp_path):
    root, fts, texts = pair
    a = str(fts[0])
    for spec, needle in (
        ({"tokens": 10}, "needs 'text:'"),
        ({"text": str(texts[0]), "tokns": 10}, "did you mean 'tokens'"),
        ({"text": str(texts[0]), "tokens": 0}, "tokens"),
        ({"text": str(root / "missing.txt")}, "missing.txt"),
    ):
        data = yaml.safe_load(open(recipe(tmp_path, fts, texts)))
        data["calibration"][a] = spec
        with pytest.raises(splice.errors.SpliceError, match=needle) as e:
            splice.merge(data, tmp_path / "out", quiet=True)
        assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
        if needle != "missing.txt":
            assert isinstance(e.value, RecipeError) and "calibration" in str(e.value)


def test_cli_calibrate_without_out_uses_the_cache(pair, capsys):
    root, fts, texts = pair
    args = ["calibrate", str(fts[1]), "--text", str(texts[1]), "--tokens", "120", "--seq-len", "32", "--seed", "7", "-q"]
    assert main(args) == 0
    assert "wrote " + str(cache_dir()) in capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("reused " + str(cache_dir()))
