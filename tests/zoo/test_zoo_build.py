"""The tiny zoo: plain HF folders that load and generate, held-out text never trained on, cached rebuilds."""

import json
import time

import pytest
import torch

from splice.zoo.build import read_jsonl, split_documents
from splice.zoo.corpora import troff_to_text


def test_manifest_describes_sources_sizes_licences_and_seeds(tiny_zoo):
    d, m = tiny_zoo
    assert m["tier"] == "tiny" and m["seed"] == 0
    assert len(m["experts"]) >= 3
    assert m["general_domain"] not in m["experts"]
    for name, dom in m["domains"].items():
        assert dom["source"] and dom["licence"] and dom["unit"]
        assert dom["train_chars"] > 50_000 and dom["heldout_chars"] > 5_000, name
        assert (d / dom["heldout_file"]).stat().st_size > 0
    for name, info in m["models"].items():
        assert (d / info["path"] / "model.safetensors").exists(), name
        assert (d / info["path"] / "config.json").exists()
        assert (d / info["path"] / "tokenizer.json").exists()
    assert m["tasks"]["bbc_topics"]["items"] >= 50
    # the file on disk is what build_zoo returned, except the seconds of whichever run wrote it last
    # and its thread count (another test, or another pytest worker with other torch threads, may
    # rerun the cached build, which rewrites last_run_seconds with ~0 s)
    on_disk = json.loads((d / "manifest.json").read_text())
    assert set(on_disk["last_run_seconds"]) == set(m["last_run_seconds"])
    per_run = {"last_run_seconds", "torch_threads"}
    assert {k: v for k, v in on_disk.items() if k not in per_run} == {k: v for k, v in m.items() if k not in per_run}
    # the experts are tuned the way the tier says (tiny: upper-half MLPs, with replay of the base's mix)
    tier = m["tier_config"]
    for dom in m["experts"]:
        info = m["models"][dom]
        assert info["trainable"] == tier["expert_trainable"] and info["replay"] == tier["expert_replay"]


def test_models_load_with_transformers_and_generate(tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, m = tiny_zoo
    for name, info in m["models"].items():
        path = d / info["path"]
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("def main():\n    ", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] == ids.shape[1] + 12 or out[0, -1] == tok.eos_token_id, name
        assert isinstance(tok.decode(out[0]), str)


def test_heldout_never_overlaps_training(tiny_zoo):
    d, m = tiny_zoo
    for name in m["domains"]:
        train = read_jsonl(d / "data" / name / "train.jsonl")
        held = read_jsonl(d / "data" / name / "heldout.jsonl")
        assert train and held
        assert not {r["id"] for r in train} & {r["id"] for r in held}, name
        train_texts = {r["text"] for r in train}
        assert not any(r["text"] in train_texts for r in held), name
        # the held-out .txt is exactly the held-out documents
        txt = (d / m["domains"][name]["heldout_file"]).read_text(encoding="utf-8")
        assert txt == "\n\n".join(r["text"] for r in held) + "\n"
    news_train = {r["id"] for r in read_jsonl(d / "data" / "news" / "train.jsonl")}
    task = read_jsonl(d / m["tasks"]["bbc_topics"]["path"])
    assert not {it["id"] for it in task} & news_train


def test_split_is_by_document_and_deterministic():
    docs = [(f"d{i}", "x" * (100 + i)) for i in range(200)]
    a = split_documents(docs, 0, "dom", 2_000, 10_000, 1_000)
    b = split_documents(docs, 0, "dom", 2_000, 10_000, 1_000)
    c = split_documents(docs, 1, "dom", 2_000, 10_000, 1_000)
    assert a == b and a != c
    train, held = a
    assert not {i for i, _ in train} & {i for i, _ in held}


def test_experts_beat_the_base_on_their_own_domain(tiny_zoo):
    from splice.eval import evaluate

    d, m = tiny_zoo
    doms = {e: str(d / m["domains"][e]["heldout_file"]) for e in m["experts"]}
    models = [str(d / m["models"]["base"]["path"])] + [str(d / m["models"][e]["path"]) for e in m["experts"]]
    res = evaluate(models, doms, max_tokens=1024, seq_len=128, quiet=True)
    base = res["models"]["base"]["domains"]
    for e in m["experts"]:
        assert res["models"][e]["domains"][e]["loss"] < base[e]["loss"], e


def test_rebuild_is_cached(tiny_zoo):
    from splice.zoo import build_zoo

    d, m = tiny_zoo
    st = (d / "models" / "base" / "model.safetensors").stat().st_mtime_ns
    t0 = time.time()
    m2 = build_zoo("tiny", d, seed=0, quiet=True)
    assert time.time() - t0 < 60  # nothing is retrained or re-evaluated
    assert (d / "models" / "base" / "model.safetensors").stat().st_mtime_ns == st
    assert m2["models"]["base"]["key"] == m["models"]["base"]["key"]


def test_unknown_tier_is_a_one_line_error(tmp_path):
    from splice.errors import SpliceError
    from splice.zoo import build_zoo

    with pytest.raises(SpliceError, match="unknown zoo tier 'huge'"):
        build_zoo("huge", tmp_path)


def test_troff_rendering_keeps_prose():
    src = '.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH DESCRIPTION\n.B ls\nlists \\fBfiles\\fR.\n.\\" comment\n'
    text = troff_to_text(src)
    assert "NAME" in text and "ls - list directory contents" in text and "lists files." in text
    assert "comment" not in text and "\\f" not in text


def test_merged_experts_beat_the_base_on_an_expert_domain(tiny_zoo, tmp_path):
    import splice
    from splice.eval import evaluate

    d, m = tiny_zoo
    base = str(d / "models" / "base")
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(d / "models" / e), "parameters": {"weight": 1.0}} for e in m["experts"]],
        "parameters": {},
        "dtype": "float32",
    }
    splice.merge(recipe, tmp_path / "soup", quiet=True)
    doms = {e: str(d / m["domains"][e]["heldout_file"]) for e in m["experts"]}
    res = evaluate([base, str(tmp_path / "soup")], doms, max_tokens=1024, seq_len=128, quiet=True)
    gains = [res["models"]["base"]["domains"][e]["loss"] - res["models"]["soup"]["domains"][e]["loss"] for e in m["experts"]]
    assert max(gains) > 0, gains
    assert torch.isfinite(torch.tensor(gains)).all()


def test_upper_mlp_experts_change_only_the_upper_half_mlps(tiny_zoo):
    """An ``upper_mlp`` expert differs from its base exactly in the MLPs of the upper half of the layers."""
    from safetensors.torch import load_file

    from splice import architecture as arch

    d, m = tiny_zoo
    if m["tier_config"]["expert_trainable"] != "upper_mlp":
        pytest.fail("the tiny tier's experts are expected to tune only the upper-half MLPs")
    base = load_file(d / m["models"]["base"]["path"] / "model.safetensors")
    n = json.loads((d / m["models"]["base"]["path"] / "config.json").read_text())["num_hidden_layers"]
    for dom in m["experts"]:
        ex = load_file(d / m["models"][dom]["path"] / "model.safetensors")
        assert set(ex) == set(base)
        changed = {k for k in base if not torch.equal(base[k], ex[k])}
        tuned = {k for k in base if (r := arch.classify(k)).layer is not None and r.layer >= n // 2 and r.kind == "mlp"}
        assert changed == tuned, (dom, sorted(changed ^ tuned))
