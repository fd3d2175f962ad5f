"""Bad input: a clear one-line error, a non-zero exit, and nothing left behind."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_model

import splice
from splice.cli import main
from splice.errors import SpliceError


def _recipe(tmp_path, data, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _linear(*models):
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}


def _no_leftovers(parent: Path):
    return [p.name for p in parent.iterdir() if ".splice-tmp-" in p.name or ".splice-old-" in p.name]


def _run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("splice: error:")]
    return code, lines, err


def test_existing_output_is_refused_without_force(tmp_path, llama_trio, capsys):
    _, (a, b, _) = llama_trio
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = _recipe(tmp_path, _linear(a, b))
    code, lines, _ = _run_cli(["merge", str(r), "-o", str(out), "-q"], capsys)
    assert code != 0 and len(lines) == 1 and "--force" in lines[0]
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["merge", str(r), "-o", str(out), "-q", "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert _no_leftovers(tmp_path) == []


def test_missing_model(tmp_path, llama_trio, capsys):
    _, (a, _, _) = llama_trio
    r = _recipe(tmp_path, _linear(a, tmp_path / "nope"))
    code, lines, _ = _run_cli(["merge", str(r), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code != 0 and len(lines) == 1 and "nope" in lines[0] and "not found" in lines[0]
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path) == []


def test_shape_mismatch_names_tensor_models_and_shapes(tmp_path, capsys):
    a = make_model(tmp_path / "a", "llama", hidden=32)
    b = make_model(tmp_path / "b", "llama", hidden=64)
    r = _recipe(tmp_path, _linear(a, b))
    code, lines, _ = _run_cli(["merge", str(r), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code != 0 and len(lines) == 1
    assert "shape mismatch" in lines[0] and str(a) in lines[0] and str(b) in lines[0] and "[" in lines[0]
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path) == []


def test_missing_tensor(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    a = make_model(tmp_path / "a", "llama")
    b = make_model(tmp_path / "b", "llama", seed=3)
    sd = load_file(b / "model.safetensors")
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, b / "model.safetensors", metadata={"format": "pt"})
    r = _recipe(tmp_path, _linear(a, b))
    code, lines, _ = _run_cli(["merge", str(r), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code != 0 and len(lines) == 1 and "model.layers.2.mlp.up_proj.weight" in lines[0] and "not found" in lines[0]
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tmp_path, capsys):
    a = make_model(tmp_path / "a", "llama")
    b = make_model(tmp_path / "b", "llama", seed=3)
    f = b / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    r = _recipe(tmp_path, _linear(a, b))
    code, lines, _ = _run_cli(["merge", str(r), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code != 0 and len(lines) == 1 and "truncated" in lines[0] and "model.safetensors" in lines[0]
    f.write_bytes(b"\x05\x00")
    code, lines, _ = _run_cli(["merge", str(r), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code != 0 and len(lines) == 1 and "model.safetensors" in lines[0]
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path) == []


def test_nan_produced_by_merge_is_an_error_and_leaves_nothing(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    a = make_model(tmp_path / "a", "llama")
    b = make_model(tmp_path / "b", "llama", seed=3)
    sd = load_file(b / "model.safetensors")
    sd["model.layers.3.self_attn.v_proj.weight"][0, 0] = float("inf")
    save_file(sd, b / "model.safetensors", metadata={"format": "pt"})
    r = _recipe(tmp_path, _linear(a, b))
    code, lines, _ = _run_cli(["merge", str(r), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code != 0 and len(lines) == 1 and "NaN or Inf" in lines[0] and "layers.3.self_attn.v_proj" in lines[0]
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path) == []


def test_invalid_recipe_via_cli_is_one_line_and_verbose_shows_traceback(tmp_path, capsys):
    r = tmp_path / "bad.yaml"
    r.write_text("merge_method: linear\nmodels: [{model: a, parameters: {wieght: 1}}]\n")
    code, lines, err = _run_cli(["merge", str(r), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code == 2 and len(lines) == 1 and "wieght" in lines[0] and "bad.yaml:2" in lines[0]
    assert "Traceback" not in err
    with pytest.raises(SpliceError, match="wieght"):
        main(["merge", str(r), "-o", str(tmp_path / "out"), "-q", "--verbose"])


def test_pickle_refused_unless_allowed(tmp_path, llama_trio, capsys):
    _, (a, _, _) = llama_trio
    p = tmp_path / "pkl"
    p.mkdir()
    from helpers import load_sd

    torch.save(load_sd(a), p / "pytorch_model.bin")
    (p / "config.json").write_text((Path(a) / "config.json").read_text())
    r = _recipe(tmp_path, _linear(a, p))
    code, lines, _ = _run_cli(["merge", str(r), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code != 0 and len(lines) == 1 and "--allow-pickle" in lines[0]
    assert main(["merge", str(r), "-o", str(tmp_path / "out"), "-q", "--allow-pickle"]) == 0


def test_interrupt_leaves_no_output(tmp_path, llama_trio):
    """A crash in the middle of a merge (here: a method raising) leaves nothing behind."""
    from splice.methods import registry

    _, (a, b, _) = llama_trio
    r = _recipe(tmp_path, _linear(a, b))
    orig = registry.METHODS.get("linear")
    calls = {"n": 0}

    def boom(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return orig.fn(*args, **kw)

    registry.METHODS._entries["linear"] = registry.MergeMethod(**{**orig.__dict__, "fn": boom})
    try:
        with pytest.raises(KeyboardInterrupt):
            splice.merge(r, tmp_path / "out", quiet=True, workers=1)
    finally:
        registry.METHODS._entries["linear"] = orig
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path) == []


def test_sigint_in_subprocess_leaves_nothing(tmp_path, llama_trio):
    """Real Ctrl-C: the CLI exits 130 and the output folder never appears."""
    import signal
    import time

    _, (a, b, _) = llama_trio
    r = _recipe(tmp_path, _linear(a, b))
    code = (
        "import time, splice.methods.linear as L\n"
        "f = L.linear\n"
        "def slow(*a, **k):\n"
        f"    open({str(tmp_path / 'started')!r}, 'w').close()\n"
        "    time.sleep(0.2)\n    return f(*a, **k)\n"
        "import splice.methods.registry as R\n"
        "R.METHODS._entries['linear'] = R.MergeMethod(**{**R.METHODS.get('linear').__dict__, 'fn': slow})\n"
        "from splice.cli import main\n"
        f"raise SystemExit(main(['merge', {str(r)!r}, '-o', {str(tmp_path / 'out')!r}, '-q']))\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "started").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert (tmp_path / "started").exists(), "the merge never started"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path) == []
