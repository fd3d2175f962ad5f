"""No remote code: a model folder whose auto_map names its own Python is refused, and that Python never runs.

Each command that loads a tokenizer or a model into transformers (generate, skip with
calibration, moe with prompt-based gates, moe-compress, eval) gets a folder whose custom
code would create a marker file when imported: one error line naming the folder and the
file that asked for the code, exit status 2, no marker, nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import make_model

from splice.cli import main
from splice.errors import CheckpointError

CODE = """import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _with_custom_tokenizer(folder: Path, marker: Path) -> Path:
    """``folder``'s tokenizer_config.json now names a tokenizer class only the folder's own code defines."""
    (folder / "tokenization_evil.py").write_text(CODE.format(marker=str(marker)))
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = "EvilTokenizer"
    tc["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    return folder


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """A tiny Llama whose tokenizer needs custom code, calibration text, and the marker path."""
    root = tmp_path_factory.mktemp("remote")
    marker = root / "MARKER"
    model = _with_custom_tokenizer(make_model(root / "evil", "llama", layers=3, hidden=64), marker)
    cal = root / "cal.txt"
    cal.write_text(" ".join(f"t{i % 90 + 3}" for i in range(400)))
    return model, cal, marker


def _refused(args, capsys, marker: Path, folder: Path, file: str = "tokenizer_config.json") -> str:
    code = main(args)
    errs = [line for line in capsys.readouterr().err.splitlines() if line.startswith("splice: error:")]
    assert code == 2 and len(errs) == 1, errs
    assert str(folder / file) in errs[0] and "own Python code" in errs[0], errs[0]
    assert not marker.exists()
    return errs[0]


def _nothing_written(parent: Path, *names: str) -> None:
    for n in names:
        assert not (parent / n).exists()
    assert not [p.name for p in parent.iterdir() if "splice-tmp" in p.name]


def test_generate_refuses(evil, capsys):
    model, _, marker = evil
    _refused(["generate", str(model), "--prompt", "t5 t6", "--max-new-tokens", "2"], capsys, marker, model)


def test_skip_calibration_refuses(evil, tmp_path, capsys):
    model, cal, marker = evil
    args = ["skip", str(model), "-o", str(tmp_path / "out"), "--drop", "1", "--strategy", "block-influence", "--calibration", str(cal)]
    _refused(args, capsys, marker, model)
    _nothing_written(tmp_path, "out")


def test_moe_hidden_gates_refuse(evil, tmp_path, capsys):
    model, _, marker = evil
    expert = tmp_path / "expert"
    shutil.copytree(model, expert)  # the same weights and (custom) tokenizer: the base's tokenizer is the one loaded
    recipe = {
        "base_model": str(model),
        "gate_mode": "hidden",
        "experts": [
            {"source_model": str(model), "positive_prompts": ["t5 t6 t7"]},
            {"source_model": str(expert), "positive_prompts": ["t50 t51 t52"]},
        ],
    }
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(recipe))
    _refused(["moe", str(tmp_path / "moe.yaml"), "-o", str(tmp_path / "moe"), "-q"], capsys, marker, model)
    _nothing_written(tmp_path, "moe")


def test_moe_compress_refuses(evil, tmp_path, capsys):
    model, cal, marker = evil
    from splice.moe import build_moe

    plain = make_model(tmp_path / "plain", "llama", layers=2, hidden=64)
    recipe = {"base_model": str(plain), "gate_mode": "random", "experts": [{"source_model": str(plain)}] * 2}
    moe = build_moe(recipe, tmp_path / "moe", quiet=True)["out"]
    _with_custom_tokenizer(Path(moe), marker)
    args = ["moe-compress", moe, "-o", str(tmp_path / "small"), "--experts", "1", "--calibration", str(cal), "-q"]
    _refused(args, capsys, marker, Path(moe))
    _nothing_written(tmp_path, "small")


def test_eval_refuses(evil, tmp_path, capsys):
    model, cal, marker = evil
    args = ["eval", str(model), "--domain", f"cal={cal}", "--json", str(tmp_path / "res.json"), "-q"]
    _refused(args, capsys, marker, model)
    _nothing_written(tmp_path, "res.json")


def test_a_model_class_from_the_folder_is_refused(tmp_path):
    from splice.hf import load_causal_lm

    marker = tmp_path / "MARKER"
    folder = make_model(tmp_path / "m", "llama", layers=2)
    (folder / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "evil_lm"  # a type transformers does not know: only the folder's code could build it
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: the model needs the folder's own Python code"):
        load_causal_lm(folder)
    assert not marker.exists()
