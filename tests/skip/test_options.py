"""The skip library checks its own parameters, names them as Python does, and the CLI shows them as its flags."""

import json
import math
import re
import subprocess
import sys

import pytest

from splice.cli import main
from splice.skip import SelfSpeculativeDecoder, SkipError, generate, generate_plain, plan, prune


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"drop": 1, "speedup": 1.2}, "give exactly one of drop=N, ratio=F or speedup=X"),
        ({"ratio": 1.0}, "ratio=1.0: must be in [0, 1)"),
        ({"speedup": math.nan}, "speedup=nan: must be a finite number"),
        ({"drop": -1}, "drop=-1: must be a whole number at least 0"),
        ({"drop": 1, "calibration_tokens": 0}, "calibration_tokens=0: must be a whole number at least 1"),
        ({"drop": 1, "seq_len": 1}, "seq_len=1: must be a whole number at least 2"),
        ({"drop": 1, "seq_len": 2.5}, "seq_len=2.5: must be a whole number"),
    ],
)
def test_plan_checks_its_parameters(skip_models, kw, message):
    models, cal = skip_models
    with pytest.raises(SkipError, match="^" + re.escape(message)):
        plan(str(models["llama"]), "block-influence", calibration=str(cal), **kw)


def test_library_messages_name_parameters_not_flags(skip_models):
    models, _ = skip_models
    with pytest.raises(SkipError, match=r"needs calibration text: pass calibration=FILE$"):
        plan(str(models["llama"]), "angular", drop=1)


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"heal": -1}, "heal=-1: must be a whole number at least 0"),
        ({"heal": 2, "heal_lr": math.nan}, "heal_lr=nan: must be a finite number"),
        ({"heal": 2, "heal_lr": 0.0}, "heal_lr=0.0: must be a number above 0"),
        ({"heal": 2, "heal_batch": 0}, "heal_batch=0: must be a whole number at least 1"),
        ({"heal": 2}, "heal=2 needs calibration text: pass calibration=FILE"),
    ],
)
def test_prune_checks_its_parameters_and_writes_nothing(skip_models, tmp_path, kw, message):
    models, _ = skip_models
    p = plan(str(models["llama"]), "balanced", drop=1)
    with pytest.raises(SkipError, match="^" + re.escape(message)):
        prune(p, tmp_path / "out", **kw)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def llama(skip_models):
    from splice.hf import load_causal_lm

    models, _ = skip_models
    return load_causal_lm(models["llama"], with_tokenizer=True)


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"top_k": -5}, "top_k=-5: must be a whole number at least 0"),
        ({"temperature": -1.0}, "temperature=-1.0: must be a number at least 0"),
        ({"top_p": 0.0}, "top_p=0.0: must be a number above 0 and at most 1"),
        ({"max_new_tokens": 0}, "max_new_tokens=0: must be a whole number at least 1"),
        ({"self_speculative": "auto", "max_draft": 0}, "max_draft=0: must be a whole number at least 1"),
        ({"self_speculative": "auto", "confidence": 2.0}, "confidence=2.0: must be a number at least 0 and at most 1"),
        ({"self_speculative": "auto", "skip": "1"}, "skip=SKIP and self_speculative=SKIP do not go together"),
    ],
)
def test_generation_checks_its_parameters(llama, kw, message):
    model, tok = llama
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(SkipError, match="^" + re.escape(message)):
        generate(model, "t5 t6", tokenizer=tok, **kw)


def test_decoders_check_their_parameters_too(llama):
    model, _ = llama
    with pytest.raises(SkipError, match="^top_k=-1: must be a whole number at least 0"):
        generate_plain(model, [5, 6], 4, top_k=-1)
    with pytest.raises(SkipError, match="^draft_length=0: must be a whole number at least 1"):
        SelfSpeculativeDecoder(model, "auto", draft_length=0)


def test_generate_compares_with_plain_decoding(llama):
    model, tok = llama
    g = generate(model, "t5 t9 t13", 10, tokenizer=tok, self_speculative="2-3", compare=True, ignore_eos=True)
    assert g.identical and g.plain.tokens == g.tokens and len(g.tokens) == 10 and g.speedup > 0
    assert g.text == tok.decode(g.tokens, skip_special_tokens=True)
    d = g.to_dict()
    assert set(d) == {"text", "tokens", "stats", "plain", "speedup"} and d["plain"]["identical"] is True
    alone = generate(model, [5, 9, 13], 10, skip="2-3")
    assert alone.plain is None and alone.identical is None and "plain" not in alone.to_dict() and alone.text is None


def _error_line(args, capsys):
    code = main(args)
    errs = [l for l in capsys.readouterr().err.splitlines() if l.startswith("splice: error:")]
    assert code == 2 and len(errs) == 1, errs
    return errs[0]


@pytest.mark.parametrize(
    "extra,flag",
    [
        (["--calibration-tokens", "0"], "--calibration-tokens 0: must be a whole number at least 1"),
        (["--seq-len", "0"], "--seq-len 0: must be a whole number at least 2"),
        (["--heal", "2", "--heal-batch", "0"], "--heal-batch 0: must be a whole number at least 1"),
        (["--heal", "2", "--heal-lr", "nan"], "--heal-lr nan: must be a finite number"),
    ],
)
def test_cli_shows_the_flags(skip_models, tmp_path, capsys, extra, flag):
    models, cal = skip_models
    args = ["skip", str(models["llama"]), "-o", str(tmp_path / "out"), "--drop", "1", "--calibration", str(cal), *extra]
    assert flag in _error_line(args, capsys)
    assert list(tmp_path.iterdir()) == []


def test_generate_cli_flags_and_binary_prompt_file(skip_models, tmp_path, capsys):
    models, _ = skip_models
    m = str(models["llama"])
    assert "--top-k -5: must be a whole number at least 0" in _error_line(["generate", m, "--prompt", "t5", "--top-k", "-5"], capsys)
    assert "--max-new-tokens 0" in _error_line(["generate", m, "--prompt", "t5", "--max-new-tokens", "0"], capsys)
    binary = tmp_path / "prompt.bin"
    binary.write_bytes(bytes(range(256)))
    assert f"--prompt-file {binary}: is not UTF-8 text" in _error_line(["generate", m, "--prompt-file", str(binary)], capsys)
    code = main(["generate", m, "--prompt", "t5 t9", "--max-new-tokens", "3", "--ignore-eos", "--json"])
    assert code == 0 and len(json.loads(capsys.readouterr().out)["tokens"]) == 3


def test_no_package_rebinds_its_submodules_and_strategies_need_no_torch():
    import importlib
    import pkgutil

    import splice.skip

    for name in splice.skip.__all__:
        getattr(splice.skip, name)
    for info in pkgutil.iter_modules(splice.skip.__path__):
        mod = importlib.import_module(f"splice.skip.{info.name}")
        assert getattr(splice.skip, info.name) is mod, info.name
    assert splice.skip.strategies.make_plan is splice.skip.make_plan
    code = "import sys, splice.skip.strategies as s; s.STRATEGIES.names(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_auto_policy_constants_come_from_its_config(llama):
    from splice.skip import AutoSkip, AutoSkipConfig

    model, _ = llama
    cfg = AutoSkipConfig(verify_cost_prior=2.0)
    with pytest.raises(AttributeError, match="cannot assign to field 'window'"):
        cfg.window = 3  # frozen: one place for the constants
    many = AutoSkip(model).ranked(0.5)
    assert AutoSkip(model).predict(0.95, many)[0] > 1.0
    assert AutoSkip(model, cfg).predict(0.99, many) == (1.0, 0)  # verification as dear as two steps: nothing pays
