"""``splice eval --lm-eval``: named tasks need the Hub (offline here), so every failure is one line that
names the task and points to a local task YAML; a local task file (examples/lm-eval/) runs with its data
file found beside it. lm-evaluation-harness is not in the test venv (it would pull datasets, pyarrow,
pandas, scikit-learn...): the harness is stood in for by a small fake module that fails or records as
the real one does; the real harness runs the example in the last test whenever it is importable."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import yaml
from helpers import make_model

from splice.cli import main
from splice.eval.harness import needs_network

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lm-eval" / "tiny_choice.yaml"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("lmeval") / "m", "llama", layers=1)


def _errors(capsys) -> list[str]:
    return [l for l in capsys.readouterr().err.splitlines() if l.startswith("splice: error:")]


def _fake_harness(monkeypatch, simple_evaluate):
    fake = types.ModuleType("lm_eval")
    utils = types.ModuleType("lm_eval.utils")
    utils.load_yaml_config = lambda path: yaml.safe_load(Path(path).read_text())
    fake.utils = utils
    fake.simple_evaluate = simple_evaluate
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.utils", utils)


def test_harness_not_installed_names_the_task_and_the_local_example(model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    assert main(["eval", str(model), "--lm-eval", "hellaswag"]) == 2
    (line,) = _errors(capsys)
    assert line.startswith("splice: error: --lm-eval hellaswag: lm-evaluation-harness is not installed (pip install lm-eval)")
    assert "(hellaswag) download their datasets from the Hugging Face Hub" in line
    assert "--lm-eval path/to/task.yaml (example: examples/lm-eval/tiny_choice.yaml)" in line


def test_a_dataset_that_needs_the_network_is_one_line(model, monkeypatch, capsys):
    class OfflineModeIsEnabled(ConnectionError):
        pass

    def simple_evaluate(**kw):
        try:
            raise OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/datasets/Rowan/hellaswag: offline mode is enabled.")
        except ConnectionError as e:
            raise RuntimeError("Failed to load dataset") from e  # wrapped, as datasets and the harness do

    _fake_harness(monkeypatch, simple_evaluate)
    assert main(["eval", str(model), "--lm-eval", "hellaswag"]) == 2
    assert _errors(capsys) == [
        "splice: error: --lm-eval hellaswag: the task's dataset must be downloaded from the Hugging Face Hub, which cannot be reached; "
        "give a local task file instead: --lm-eval path/to/task.yaml (example: examples/lm-eval/tiny_choice.yaml)"
    ]


def test_other_harness_failures_and_missing_task_files_are_one_line(model, monkeypatch, capsys, tmp_path):
    def simple_evaluate(**kw):
        raise KeyError("Tasks not found: hellaswg")

    _fake_harness(monkeypatch, simple_evaluate)
    assert main(["eval", str(model), "--lm-eval", "hellaswg"]) == 2
    assert _errors(capsys) == ["splice: error: --lm-eval hellaswg: lm-evaluation-harness failed: KeyError: 'Tasks not found: hellaswg'"]
    assert main(["eval", str(model), "--lm-eval", str(tmp_path / "nope.yaml")]) == 2
    assert _errors(capsys) == [f"splice: error: --lm-eval {tmp_path / 'nope.yaml'}: task file not found"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    assert main(["eval", str(model), "--lm-eval", str(bad)]) == 2
    assert _errors(capsys) == [f"splice: error: {bad}: an lm-eval task file needs a 'task:' name"]


def test_the_example_task_file_is_handed_over_with_its_data_found_beside_it(model, monkeypatch, tmp_path, capsys):
    seen = {}

    def simple_evaluate(**kw):
        seen.update(kw)
        return {"results": {"splice_tiny_choice": {"acc,none": 0.5}}, "versions": {"splice_tiny_choice": 1.0}}

    _fake_harness(monkeypatch, simple_evaluate)
    monkeypatch.chdir(tmp_path)  # not the repository: the data file is found beside the YAML
    assert main(["eval", str(model), "--lm-eval", str(EXAMPLE), "--limit", "4"]) == 0
    assert json.loads(capsys.readouterr().out)[str(model)]["results"]["splice_tiny_choice"]["acc,none"] == 0.5
    (task,) = seen["tasks"]
    assert task["task"] == "splice_tiny_choice" and seen["limit"] == 4
    data = Path(task["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and data == EXAMPLE.parent / "tiny_choice.jsonl"
    rows = [json.loads(l) for l in data.read_text().splitlines()]
    assert len(rows) >= 10
    for r in rows:  # the fields the YAML's templates name
        assert isinstance(r["question"], str) and len(r["choices"]) >= 2 and 0 <= r["answer"] < len(r["choices"])


def test_needs_network_reads_the_cause_chain():
    import socket

    assert needs_network(OSError("[Errno -3] Temporary failure in name resolution"))
    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except OSError as e:
            raise ValueError("could not load") from e
    except ValueError as e:
        assert needs_network(e)
    assert not needs_network(ValueError("doc_to_target: 'label' is undefined"))
