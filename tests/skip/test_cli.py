"""The CLI: plans, pruned checkpoints, generation, and one-line errors that leave nothing behind."""

import json

import torch
from safetensors.torch import save_file

from splice.cli import main


def _run(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    errs = [l for l in cap.err.splitlines() if l.startswith("splice: error:")]
    return code, cap.out, errs


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if "splice-tmp" in p.name or "splice-old" in p.name]


def test_skip_plan_only_and_write(skip_models, tmp_path, capsys):
    models, cal = skip_models
    m = str(models["llama"])
    code, out, _ = _run(
        [
            "skip",
            m,
            "--plan-only",
            "--speedup",
            "1.3",
            "--strategy",
            "block-influence",
            "--calibration",
            str(cal),
            "--calibration-tokens",
            "300",
            "-q",
        ],
        capsys,
    )
    assert code == 0 and "block-influence plan" in out and "predicted decode speedup" in out and "*layer" in out
    assert list(tmp_path.iterdir()) == []
    code, out, _ = _run(["skip", m, "-o", str(tmp_path / "fast"), "--speedup", "1.5", "-q"], capsys)
    assert code == 0 and "wrote" in out
    cfg = json.loads((tmp_path / "fast" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3  # 6 layers: 2 give 1.46x by the cost model, 3 give 1.9x
    code, out, _ = _run(["skip", m, "--plan-only", "--drop", "2", "--json"], capsys)
    assert code == 0 and json.loads(out)["plan"]["drop_layers"] == [2, 4]


def test_generate_self_speculative_compare(skip_models, capsys):
    models, _ = skip_models
    code, out, _ = _run(
        [
            "generate",
            str(models["llama"]),
            "--prompt",
            "t5 t9 t13",
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--self-speculative",
            "auto",
            "--compare",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    r = json.loads(out)
    assert r["plain"]["identical"] and len(r["tokens"]) == 12 and r["speedup"] > 0
    assert 0 <= r["stats"]["acceptance"] <= 1
    code, out, _ = _run(["generate", str(models["llama"]), "--prompt", "t5 t9", "--max-new-tokens", "4", "--skip", "2-3", "-q"], capsys)
    assert code == 0 and out.strip()


def _bad(args, capsys, *needles):
    code, _, errs = _run(args, capsys)
    assert code == 2 and len(errs) == 1, errs
    for n in needles:
        assert n in errs[0], errs[0]
    return errs[0]


def test_bad_input_is_one_line_and_writes_nothing(skip_models, tmp_path, capsys):
    models, cal = skip_models
    m = str(models["llama"])
    out = tmp_path / "out"
    o = ["-o", str(out)]
    _bad(["skip", m, *o, "--drop", "9"], capsys, "--drop 9", "6 layers")
    _bad(["skip", m, *o, "--drop", "6", "--strategy", "angular", "--calibration", str(cal)], capsys, "at most 5")
    _bad(["skip", m, *o, "--speedup", "0.8"], capsys, "at least 1")
    _bad(["skip", m, *o, "--drop", "2", "--strategy", "angular"], capsys, "needs calibration", "--calibration")
    _bad(["skip", m, *o, "--drop", "2", "--strategy", "ffn", "--calibration", str(tmp_path / "nope.txt")], capsys, "nope.txt", "not found")
    _bad(["skip", m, *o, "--drop", "2", "--strategy", "fastest"], capsys, "unknown skip strategy")
    _bad(["skip", m, "--drop", "2"], capsys, "-o OUT")
    _bad(["skip", m, *o, "--drop", "1", "--heal", "5"], capsys, "--heal", "calibration")
    assert not out.exists() and _leftovers(tmp_path) == []

    odd = tmp_path / "odd"
    odd.mkdir()
    save_file({"encoder.weight": torch.zeros(4, 4), "decoder.weight": torch.zeros(4, 4)}, str(odd / "model.safetensors"))
    (odd / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    _bad(["skip", str(odd), *o, "--drop", "1"], capsys, "cannot find its decoder layers", "odd")
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _bad(["skip", m, *o, "--drop", "1"], capsys, "--force")
    assert (out / "keep.txt").read_text() == "mine"
    _bad(["generate", m, "--prompt", "t5", "--self-speculative", "2-9"], capsys, "layer 9 does not exist")
    assert _leftovers(tmp_path) == []


def test_zoo_tiny_base_self_speculative_is_lossless(tiny_zoo):
    from splice.hf import load_causal_lm
    from splice.skip import SelfSpeculativeDecoder, generate_plain

    path = tiny_zoo[0] / "models" / "base"
    m, tok = load_causal_lm(path, with_tokenizer=True, bypass_zero_mlps=True)
    for prompt in ["The king said", "def main():", "In the beginning"]:
        ids = tok(prompt)["input_ids"]
        plain = generate_plain(m, ids, 24)
        for skip in ("auto", "mlp1-2"):
            assert SelfSpeculativeDecoder(m, skip).generate(ids, 24).tokens == plain.tokens


def test_help_imports_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = (
        "import sys, splice.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numba') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
