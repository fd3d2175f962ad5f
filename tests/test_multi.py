"""Multi-stage recipes (mergekit-multi): stages in dependency order, the target to -o, intermediates
kept or removed, finished stages reused by key, and one-line errors before any work."""

from pathlib import Path

import pytest
import torch
from helpers import load_sd, make_model

import splice
from splice.cli import main
from splice.errors import SpliceError
from splice.multi import STAGE_MARKER, is_multi_stage, plan_stages


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    base = make_model(root / "base", "llama", seed=0, layers=2)
    return (
        base,
        make_model(root / "a", "llama", seed=1, layers=2, from_model=base),
        make_model(root / "b", "llama", seed=2, layers=2, from_model=base),
    )


def _two_stage(base, a, b, weight_a=1.0):
    """Stage 'ab' averages a and b; the final (unnamed) stage averages 'ab' with the base."""
    return (
        f"name: ab\nmerge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: {weight_a}}}\n"
        f"  - model: {b}\n    parameters: {{weight: 1.0}}\n"
        "---\n"
        f"merge_method: linear\nmodels:\n  - model: ab\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {base}\n    parameters: {{weight: 1.0}}\n"
    )


def _write(tmp_path, text, name="multi.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _expected(base, a, b, weight_a=1.0):
    sa, sb, s0 = load_sd(a), load_sd(b), load_sd(base)
    return {k: ((weight_a * sa[k] + sb[k]) / (weight_a + 1) + s0[k]) / 2 for k in s0}


def _assert_close(out, want):
    got = load_sd(out)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def _run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    return code, [l for l in err.splitlines() if l.startswith("splice: error:")], err


def test_two_stages_run_in_order_and_the_default_intermediate_folder_is_removed(tmp_path, models, capsys):
    base, a, b = models
    r = _write(tmp_path, _two_stage(base, a, b))
    assert is_multi_stage(str(r)) and is_multi_stage(r)
    out = tmp_path / "out"
    assert main(["merge", str(r), "-o", str(out), "-q"]) == 0
    _assert_close(out, _expected(base, a, b))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yaml", "out"]  # intermediates removed
    assert "invalid YAML" not in capsys.readouterr().err


def test_python_api_dispatches_and_reports_the_stages(tmp_path, models):
    base, a, b = models
    r = _write(tmp_path, _two_stage(base, a, b))
    s = splice.merge(r, tmp_path / "out", quiet=True)
    assert [(st["name"], st["status"]) for st in s["stages"]] == [("ab", "merged"), (None, "merged")]
    assert s["out"] == str((tmp_path / "out").resolve())
    _assert_close(tmp_path / "out", _expected(base, a, b))


def test_stage_option_writes_that_stage_only(tmp_path, models, capsys):
    base, a, b = models
    r = _write(tmp_path, _two_stage(base, a, b))
    out = tmp_path / "ab-only"
    assert main(["merge", str(r), "-o", str(out), "--stage", "ab", "-q"]) == 0
    sa, sb = load_sd(a), load_sd(b)
    _assert_close(out, {k: (sa[k] + sb[k]) / 2 for k in sa})
    assert "warning" not in capsys.readouterr().err  # leaving later stages out was asked for


def test_resume_reuses_a_finished_stage_and_a_changed_stage_is_redone(tmp_path, models):
    base, a, b = models
    inter = tmp_path / "stages"
    r = _write(tmp_path, _two_stage(base, a, b))
    s1 = splice.merge(r, tmp_path / "out1", quiet=True, intermediate_dir=inter)
    assert [st["status"] for st in s1["stages"]] == ["merged", "merged"]
    stage = inter / "ab"
    assert (stage / STAGE_MARKER).exists()  # a given intermediate folder is kept
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in stage.iterdir()}

    s2 = splice.merge(r, tmp_path / "out2", quiet=True, intermediate_dir=inter)
    assert [st["status"] for st in s2["stages"]] == ["reused", "merged"]
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in stage.iterdir()} == before  # not recomputed
    _assert_close(tmp_path / "out2", _expected(base, a, b))

    r = _write(tmp_path, _two_stage(base, a, b, weight_a=3.0))  # the first stage changed
    s3 = splice.merge(r, tmp_path / "out3", quiet=True, intermediate_dir=inter)
    assert [st["status"] for st in s3["stages"]] == ["merged", "merged"]
    _assert_close(tmp_path / "out3", _expected(base, a, b, weight_a=3.0))
    assert sorted(p.name for p in inter.iterdir()) == ["ab"]  # no building folder left

    s4 = splice.merge(r, tmp_path / "out4", quiet=True, intermediate_dir=inter, seed=5)  # another seed: another key
    assert [st["status"] for st in s4["stages"]] == ["merged", "merged"]


def test_a_failed_later_stage_keeps_the_finished_ones_and_a_rerun_resumes(tmp_path, models, capsys):
    base, a, b = models
    wide = make_model(tmp_path / "wide", "llama", seed=3, layers=2, hidden=64)  # cannot merge with 'ab'
    text = _two_stage(base, a, b)
    r = _write(tmp_path, text.replace(f"model: {base}", f"model: {wide}"))
    out = tmp_path / "out"
    code, lines, _ = _run_cli(["merge", str(r), "-o", str(out), "-q"], capsys)
    assert code == 2 and len(lines) == 1
    assert "the unnamed stage (document 2)" in lines[0] and "shape mismatch" in lines[0]
    assert "finished stages are kept in" in lines[0] and "rerun reuses them" in lines[0]
    inter = tmp_path / ".out.splice-stages"
    assert (inter / "ab" / STAGE_MARKER).exists() and not out.exists()

    r = _write(tmp_path, text)  # fixed: the finished first stage is reused, then everything removed
    s = splice.merge(r, out, quiet=True)
    assert [st["status"] for st in s["stages"]] == ["reused", "merged"]
    _assert_close(out, _expected(base, a, b))
    assert not inter.exists()


def test_stages_run_in_dependency_order_not_file_order(tmp_path, models):
    base, a, b = models
    text = (
        f"merge_method: linear\nmodels: [{{model: second, parameters: {{weight: 1.0}}}}, {{model: {base}, parameters: {{weight: 1.0}}}}]\n"
        f"---\nname: second\nmerge_method: linear\nmodels: [{{model: first, parameters: {{weight: 1.0}}}}, {{model: {b}, parameters: {{weight: 1.0}}}}]\n"
        f"---\nname: first\nmerge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1.0}}}}]\n"
        f"---\nname: unused\nmerge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1.0}}}}]\n"
    )
    plan = plan_stages(text, tmp_path / "out")
    assert [st.name for st in plan.order] == ["first", "second", None]
    assert plan.order[1].recipe.models[0].model == str((tmp_path / ".out.splice-stages" / "first").resolve())


def test_stage_names_in_slices_base_model_and_tokenizer_source_are_resolved(tmp_path, models):
    base, a, b = models
    text = (
        f"name: s1\nmerge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1.0}}}}]\n---\n"
        "merge_method: slerp\nbase_model: s1\ntokenizer_source: s1\nparameters: {t: 0.5}\n"
        f"slices:\n  - sources:\n    - {{model: s1, layer_range: [0, 2]}}\n    - {{model: {b}, layer_range: [0, 2]}}\n"
    )
    plan = plan_stages(text, tmp_path / "out", intermediate_dir=tmp_path / "i")
    r = plan.target.recipe
    s1 = str((tmp_path / "i" / "s1").resolve())
    assert r.base_model == s1 and r.tokenizer_source == s1 and r.slices[0].sources[0].model == s1
    assert plan.target.uses == ["s1"]


def _stage(name, model, uses=None):
    head = f"name: {name}\n" if name else ""
    return f"{head}merge_method: linear\nmodels: [{{model: {uses or model}, parameters: {{weight: 1.0}}}}]\n"


@pytest.mark.parametrize(
    "docs,extra,expected",
    [
        (
            [_stage("x", "A", uses="y"), _stage("y", "A", uses="x"), _stage(None, "A", uses="x")],
            [],
            r"multi.yaml:\d+: the stages use each other in a cycle \('x' -> 'y' -> 'x'\)",
        ),
        ([_stage("x", "A", uses="x"), _stage(None, "A", uses="x")], [], r"cycle \('x' -> 'x'\)"),
        (
            [_stage("x", "A"), _stage("x", "A"), _stage(None, "A", uses="x")],
            [],
            r"multi.yaml:\d+: stage name 'x' is used twice \(documents 1 and 2\)",
        ),
        ([_stage(None, "A"), _stage(None, "A")], [], r"documents 1 and 2 both have no 'name'"),
        (
            [_stage("first", "A"), _stage("second", "A")],
            ["--stage", "frist"],
            r"unknown stage 'frist' \(valid: .*\); did you mean 'first'\?",
        ),
        ([_stage("a/b", "A"), _stage(None, "A")], [], r"multi.yaml:1: name: stage name 'a/b' must be a plain folder name"),
        (
            [_stage("x", "A"), "merge_method: linear\nmodles: []\n"],
            [],
            r"multi.yaml:\d+: modles: unknown key 'modles'.*did you mean 'models'\?",
        ),
        ([_stage("x", "A"), _stage(None, "A", uses="x")], ["--intermediate-dir", ""], r"--intermediate-dir is empty"),
    ],
)
def test_errors_before_any_work(tmp_path, models, capsys, docs, extra, expected):
    base = models[0]
    r = _write(tmp_path, "---\n".join(d.replace("model: A", f"model: {base}") for d in docs))
    code, lines, err = _run_cli(["merge", str(r), "-o", str(tmp_path / "out"), "-q", *extra], capsys)
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err and "invalid YAML" not in err
    import re

    assert re.search(expected, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yaml"]  # nothing written


def test_missing_input_of_a_later_stage_is_found_before_the_first_stage_runs(tmp_path, models, capsys):
    base, a, _ = models
    r = _write(
        tmp_path, _stage("s1", str(a)) + "---\n" + f"merge_method: linear\nmodels: [{{model: s1}}, {{model: {tmp_path / 'nope'}}}]\n"
    )
    code, lines, _ = _run_cli(["merge", str(r), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code == 2 and len(lines) == 1 and "nope" in lines[0] and "not found" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yaml"]


def test_output_and_intermediate_folders_must_not_collide(tmp_path, models, capsys):
    base, a, b = models
    r = _write(tmp_path, _two_stage(base, a, b))
    inter = tmp_path / "i"
    code, lines, _ = _run_cli(["merge", str(r), "-o", str(inter / "ab"), "--intermediate-dir", str(inter), "-q"], capsys)
    assert code == 2 and len(lines) == 1 and "is the folder of stage 'ab'" in lines[0]
    code, lines, _ = _run_cli(["merge", str(r), "-o", str(tmp_path / "o"), "--intermediate-dir", str(tmp_path / "o" / "i"), "-q"], capsys)
    assert code == 2 and len(lines) == 1 and "--intermediate-dir" in lines[0] and "inside the output" in lines[0]
    foreign = inter / "ab"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep")
    code, lines, _ = _run_cli(["merge", str(r), "-o", str(tmp_path / "o"), "--intermediate-dir", str(inter), "-q"], capsys)
    assert code == 2 and len(lines) == 1 and "is not a stage folder splice wrote" in lines[0]
    assert (foreign / "mine.txt").read_text() == "keep" and not (tmp_path / "o").exists()


def test_existing_output_is_refused_before_the_first_stage(tmp_path, models, capsys):
    base, a, b = models
    r = _write(tmp_path, _two_stage(base, a, b))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, lines, _ = _run_cli(["merge", str(r), "-o", str(out), "-q"], capsys)
    assert code == 2 and len(lines) == 1 and "--force" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yaml", "out"] and (out / "keep.txt").read_text() == "precious"


def test_single_recipe_tools_name_a_multi_stage_file(tmp_path, models, capsys):
    base, a, b = models
    r = _write(tmp_path, _two_stage(base, a, b))
    code, lines, err = _run_cli(["plan", str(r)], capsys)
    assert code == 2 and len(lines) == 1 and "multi-stage recipe (2 YAML documents)" in lines[0] and "invalid YAML" not in err
    from splice.moe import load_moe_recipe

    with pytest.raises(SpliceError, match=r"multi.yaml:\d+: a MoE recipe is one YAML document; this file holds 2"):
        load_moe_recipe(r)


def test_trailing_document_separator_is_not_a_stage(tmp_path, models):
    base, a, b = models
    r = _write(tmp_path, _stage(None, str(a)) + "---\n")
    assert not is_multi_stage(r)
    assert Path(splice.merge(r, tmp_path / "out", quiet=True)["out"]).exists()


def test_one_document_with_multi_stage_options_runs_as_a_plain_merge(tmp_path, models):
    base, a, b = models
    r = _write(tmp_path, _stage("only", str(a)))
    s = splice.merge(r, tmp_path / "out", quiet=True, stage="only")
    assert [st["status"] for st in s["stages"]] == ["merged"]
    _assert_close(tmp_path / "out", load_sd(a))
    with pytest.raises(SpliceError, match=r"^output .* exists and is not empty; pass force=True to overwrite it$"):
        splice.merge(r, tmp_path / "out", quiet=True, intermediate_dir=tmp_path / "i")
    assert not (tmp_path / "i").exists()


def test_a_stage_interrupted_while_building_is_redone(tmp_path, models):
    base, a, b = models
    inter = tmp_path / "stages"
    (inter / ".ab.building").mkdir(parents=True)
    (inter / ".ab.building" / "model.safetensors").write_bytes(b"half a file")  # killed mid-stage
    r = _write(tmp_path, _two_stage(base, a, b))
    s = splice.merge(r, tmp_path / "out", quiet=True, intermediate_dir=inter)
    assert [st["status"] for st in s["stages"]] == ["merged", "merged"]
    assert sorted(p.name for p in inter.iterdir()) == ["ab"]
    _assert_close(tmp_path / "out", _expected(base, a, b))


@pytest.mark.mergekit
def test_matches_mergekit_multi(tmp_path, models):
    import os
    import subprocess

    from mergekit_side import mergekit_bin, missing

    multi = mergekit_bin("mergekit-multi")
    if multi is None:
        missing("no mergekit-multi")

    base, a, b = models
    text = (
        f"name: ab\nmerge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 1.0}}}}\n"
        f"  - {{model: {base}, parameters: {{weight: 3.0}}}}\n---\n"
        "merge_method: slerp\nbase_model: ab\nparameters: {t: [0, 0.5, 1]}\n"
        f"slices:\n  - sources: [{{model: ab, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 2]}}]\n"
    )
    r = _write(tmp_path, text)
    splice.merge(r, tmp_path / "ours", quiet=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [str(multi), str(r), "--out-path", str(tmp_path / "theirs"), "-I", str(tmp_path / "mk-stages"), "--no-copy-tokenizer"]
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    ours, theirs = load_sd(tmp_path / "ours"), load_sd(tmp_path / "theirs")
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k].float(), theirs[k].float(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_output_over_a_model_only_an_earlier_stage_reads_is_refused_even_with_force(tmp_path, models, capsys):
    """The target stage reads 'ab' and the base; -o over model a (read only by stage 'ab') must be refused too."""
    import shutil

    base, a, b = models
    a_copy = shutil.copytree(a, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in a_copy.iterdir()}
    r = _write(tmp_path, _two_stage(base, a_copy, b))
    code, lines, _ = _run_cli(["merge", str(r), "-o", str(a_copy), "-q", "--force"], capsys)
    assert code == 2 and len(lines) == 1 and "is the input" in lines[0]
    assert {p.name: p.read_bytes() for p in a_copy.iterdir()} == before
