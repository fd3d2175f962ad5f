"""The command line's promise for bad options and paths: one line, exit status 2, nothing written.

Every numeric option of every subcommand is checked by ``splice.options`` (through
``cli/common.py``'s argparse types), so the cases below fail before any model is read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_sd

from splice import options
from splice.cli import build_parser, error_line, main
from splice.errors import SpliceError, option


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders): what "nothing written" compares."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _refused(args: list[str], capsys, root: Path, *needles: str) -> str:
    """Run the CLI; assert exit 2, exactly one line on stderr (no usage block), nothing on stdout,
    the needles in the line, and nothing created or changed under ``root``."""
    before = _tree(root)
    code = main(args)
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert code == 2, (code, cap.err)
    assert len(lines) == 1 and lines[0].startswith("splice: error: "), cap.err
    assert cap.out == ""
    for n in needles:
        assert n in lines[0], lines[0]
    assert _tree(root) == before
    return lines[0]


@pytest.fixture
def work(tmp_path, llama_trio):
    """A folder holding a recipe, a text file, a binary file and a folder, plus the tiny models."""
    base, fts = llama_trio
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in fts[:2]]})
    )
    (tmp_path / "text.txt").write_text("t5 t9 t13 t17 " * 50)
    (tmp_path / "binary.txt").write_bytes(b"t5 t9 \xff\xfe\x00\x01 t13")
    (tmp_path / "DIR").mkdir()
    return {"root": tmp_path, "recipe": str(recipe), "model": str(base), "out": str(tmp_path / "out")}


# (command line with {recipe}, {model}, {out}, {root} filled in; what the line must say)
BAD_NUMBERS = [
    ("merge {recipe} -o {out} --workers -1", "--workers -1: must be a whole number at least 1"),
    ("merge {recipe} -o {out} --workers 0", "--workers 0: must be a whole number at least 1"),
    ("merge {recipe} -o {out} --threads -1", "--threads -1: must be a whole number at least 1"),
    ("merge {recipe} -o {out} --workers x", "--workers x: must be a whole number"),
    ("merge {recipe} -o {out} --device banana", "--device banana: must be cpu, cuda or cuda:N"),
    ("merge {recipe} -o {out} --shard-size infGB", "--shard-size infGB: must be a size"),
    ("merge {recipe} -o {out} --shard-size nanGB", "--shard-size nanGB: must be a size"),
    ("merge {recipe} -o {out} --shard-size 0", "--shard-size 0: must be a size of at least 1 byte"),
    ("merge {recipe} -o {out} --seed -1", "--seed -1: must be a whole number at least 0"),
    ("skip {model} -o {out} --drop 1 --seq-len 0", "--seq-len 0: must be a whole number at least 2"),
    ("skip {model} -o {out} --drop 1 --seq-len -4", "--seq-len -4: must be a whole number at least 2"),
    ("skip {model} -o {out} --drop 1 --heal-batch 0", "--heal-batch 0: must be a whole number at least 1"),
    ("skip {model} -o {out} --drop 1 --heal-lr nan", "--heal-lr nan: must be a finite number"),
    ("skip {model} -o {out} --drop 1 --heal-lr 0", "--heal-lr 0: must be a number above 0"),
    ("skip {model} -o {out} --drop 1 --calibration-tokens 0", "--calibration-tokens 0: must be a whole number at least 1"),
    ("skip {model} -o {out} --drop 0", "--drop 0: must be a whole number at least 1"),
    ("skip {model} -o {out} --ratio 1.5", "--ratio 1.5: must be a number above 0 and below 1"),
    ("skip {model} -o {out} --drop 1 --heal 2 --calibration {root}/binary.txt", "--calibration", "binary.txt: is not UTF-8 text"),
    ("eval {model} --domain a={root}/text.txt --seq-len 0", "--seq-len 0: must be a whole number at least 2"),
    ("eval {model} --domain a={root}/text.txt --batch-size 0", "--batch-size 0: must be a whole number at least 1"),
    ("eval {model} --domain a={root}/text.txt --tokens -5", "--tokens -5: must be a whole number at least 1"),
    ("eval {model} --domain a={root}/text.txt --json {root}/DIR", "--json", "DIR: is a folder; give a file name"),
    ("eval {model} --domain a={root}/text.txt --json {root}/text.txt/r.json", "text.txt is a file"),
    ("eval {model} --domain a={root}/nope.txt", "--domain", "nope.txt: file not found"),
    ("eval {model} --domain nofile", "--domain nofile: expected NAME=FILE"),
    ("generate {model} --prompt t5 --threads -1", "--threads -1: must be a whole number at least 1"),
    ("generate {model} --prompt t5 --top-k -5", "--top-k -5: must be a whole number at least 0"),
    ("generate {model} --prompt t5 --top-p 0", "--top-p 0: must be a number above 0 and at most 1"),
    ("generate {model} --prompt t5 --temperature nan", "--temperature nan: must be a finite number"),
    ("generate {model} --prompt t5 --max-new-tokens 0", "--max-new-tokens 0: must be a whole number at least 1"),
    ("generate {model} --prompt-file {root}/binary.txt", "--prompt-file", "binary.txt: is not UTF-8 text (byte 6)"),
    ("generate {model} --prompt-file {root}/DIR", "--prompt-file", "DIR: is not a file"),
    ("moe {recipe} -o {out} --calibrate -3", "--calibrate -3: must be a whole number at least 0"),
    ("moe {recipe} -o {out} --calibration-lr inf", "--calibration-lr inf: must be a finite number"),
    ("moe {recipe} -o {out} --balance -0.1", "--balance -0.1: must be a number at least 0"),
    ("moe-compress {model} -o {out} --experts 2 --calibration {root}/text.txt --tokens 0", "--tokens 0: must be a whole number at least 1"),
    ("moe-compress {model} -o {out} --experts 0 --calibration {root}/text.txt", "--experts 0: must be a whole number at least 1"),
    ("moe-compress {model} -o {out} --experts 2 --calibration {root}/binary.txt", "binary.txt: is not UTF-8 text"),
    ("calibrate {model} --text {root}/text.txt -o {out} --tokens 0", "--tokens 0: must be a whole number at least 1"),
    ("calibrate {model} --text {root}/text.txt -o {out} --seq-len 1", "--seq-len 1: must be a whole number at least 2"),
    ("calibrate {model} --text {root}/binary.txt -o {out}", "--text", "binary.txt: is not UTF-8 text"),
    ("calibrate {model} --text {root}/nope.txt -o {out}", "--text", "nope.txt: file not found"),
    ("calibrate {model} --text {root}/text.txt -o {root}/DIR", "--out", "DIR: is a folder; give a file name"),
    ("calibrate {model} --text {root}/text.txt -o {out} --tokens 100000", "fewer than the 100000 asked for"),
    ("demo --out {out} --tokens 0", "--tokens 0: must be a whole number at least 1"),
    ("demo --out {out} --search-budget 0", "--search-budget 0: must be a whole number at least 1"),
    ("demo --out {out} --parts moe,skp", "--parts moe,skp: unknown part 'skp' (valid parts: merge, search, moe, skip)"),
    ("zoo build --out {out} --threads 0", "--threads 0: must be a whole number at least 1"),
]

# argparse's own complaints, made one line by the parser's error()
BAD_COMMAND_LINES = [
    ("merge {recipe}", "the following arguments are required: -o/--out"),
    ("merge {recipe} -o", "--out expected one argument"),
    ("merge {recipe} -o {out} --workers", "--workers expected one argument"),
    ("mege {recipe}", "invalid choice: 'mege'"),
    ("generate {model} --prompt t5 --prompt-file {root}/text.txt", "not allowed with argument --prompt"),
    ("merge {recipe} -o ''", "--out '': the output path is empty"),
]


@pytest.mark.parametrize("case", BAD_NUMBERS + BAD_COMMAND_LINES, ids=lambda case: case[0])
def test_bad_option_is_one_line_exit_2_and_writes_nothing(work, capsys, case):
    line, *needles = case
    args = [a.format(**work) for a in line.split()]
    args = ["" if a == "''" else a for a in args]
    _refused(args, capsys, work["root"], *needles)
    assert not Path(work["out"]).exists()


def test_library_option_objects_use_the_same_checks(tmp_path, llama_trio):
    import splice
    from splice.engine import MergeOptions
    from splice.moe.build import MoEOptions

    with pytest.raises(options.OptionError, match=r"^workers=-1: must be a whole number at least 1$"):
        MergeOptions(workers=-1)
    with pytest.raises(options.OptionError, match=r"^shard_size=infGB: must be a size"):
        MergeOptions(shard_size="infGB")
    with pytest.raises(options.OptionError, match=r"^device=banana: must be cpu, cuda or cuda:N$"):
        MergeOptions(device="banana")
    with pytest.raises(options.OptionError, match=r"^calibrate=-3: must be a whole number at least 0$"):
        MoEOptions(calibrate=-3)
    with pytest.raises(options.OptionError, match=r"^calibration_lr=nan: must be a finite number$"):
        MoEOptions(calibration_lr=float("nan"))
    _, fts = llama_trio
    recipe = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in fts[:2]]}
    with pytest.raises(options.OptionError, match=r"^threads=0: must be a whole number at least 1$"):
        splice.merge(recipe, tmp_path / "out", threads=0)  # keyword options are checked too
    assert list(tmp_path.iterdir()) == []
    if not torch.cuda.is_available():
        with pytest.raises(SpliceError, match=r"^device=cuda:1 was asked for but no CUDA device is available$"):
            MergeOptions(device="cuda:1")


def test_library_eval_checks_its_settings(tmp_path):
    from splice.eval import evaluate

    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(options.OptionError, match=r"^seq_len=1: must be a whole number at least 2$"):
        evaluate(["m"], {"a": str(tmp_path / "a.txt")}, seq_len=1)
    with pytest.raises(options.OptionError, match=r"^max_tokens=0: must be a whole number at least 1$"):
        evaluate(["m"], {"a": str(tmp_path / "a.txt")}, max_tokens=0)
    with pytest.raises(SpliceError, match=r"^no model to evaluate"):
        evaluate([], {"a": str(tmp_path / "a.txt")})
    with pytest.raises(SpliceError, match=r"^nothing to evaluate on"):
        evaluate(["m"])


@pytest.mark.parametrize(
    "check, value, bounds, result",
    [
        (options.size, "5GB", {}, 5 * 10**9),
        (options.size, "2GiB", {}, 2 * 1024**3),
        (options.size, "500m", {}, 500 * 10**6),
        (options.size, "1e9", {}, 10**9),
        (options.size, 4096, {}, 4096),
        (options.integer, " 7 ", {"minimum": 2}, 7),
        (options.real, "0.25", {"above": 0, "below": 1}, 0.25),
        (options.real, 1, {"minimum": 0, "maximum": 1}, 1.0),
        (options.device, "cuda:3", {}, "cuda:3"),
        (options.seed, str(2**64 - 1), {}, 2**64 - 1),
    ],
)
def test_validators_accept_and_convert(check, value, bounds, result):
    assert check(value, "x", **bounds) == result


@pytest.mark.parametrize(
    "check, value, bounds, problem",
    [
        (options.size, "-5GB", {}, "must be a size such as 5GB"),
        (options.size, "0.4B", {}, "must be a size of at least 1 byte"),
        (options.size, True, {}, "must be a size such as 5GB"),
        (options.integer, "3.0", {}, "must be a whole number"),
        (options.integer, 2.0, {}, "must be a whole number"),
        (options.integer, True, {}, "must be a whole number"),
        (options.integer, 11, {"minimum": 1, "maximum": 10}, "must be a whole number at least 1 and at most 10"),
        (options.real, "inf", {}, "must be a finite number"),
        (options.real, "1", {"above": 0, "below": 1}, "must be a number above 0 and below 1"),
        (options.real, "x", {}, "must be a number"),
        (options.device, "cuda:", {}, "must be cpu, cuda or cuda:N"),
        (options.device, "mps", {}, "must be cpu, cuda or cuda:N"),
        (options.seed, 2**64, {}, "must be a whole number at least 0 and at most 18446744073709551615"),
        (options.output_file, "", {}, "must be a path"),
    ],
)
def test_validators_refuse_with_the_option_named(check, value, bounds, problem):
    with pytest.raises(options.OptionError, match=r"^x=") as e:
        check(value, "x", **bounds)
    assert e.value.problem.startswith(problem), e.value.problem
    assert e.value.name == "x"


def test_text_file_refuses_a_character_cut_at_the_end(tmp_path):
    f = tmp_path / "cut.txt"
    f.write_bytes("caf\u00e9".encode()[:-1])
    with pytest.raises(options.OptionError, match=r"is not UTF-8 text \(it ends inside a character\)"):
        options.text_file(f, "prompt_file")
    f.write_bytes("caf\u00e9 \u2014 ok".encode())
    assert options.text_file(f, "prompt_file") == f


# -- eval --json and demo --out: no overwrite without --force, written whole ------------------------


def test_eval_json_is_not_replaced_without_force(tiny_zoo, tmp_path, capsys):
    d, m = tiny_zoo
    base = str(d / "models" / "base")
    text = str(d / m["domains"]["news"]["heldout_file"])
    out = tmp_path / "r.json"
    out.write_text('{"mine": true}\n')
    args = ["eval", base, "--domain", f"news={text}", "--tokens", "64", "--seq-len", "32", "--json", str(out), "-q"]
    _refused(args, capsys, tmp_path, f"results file {out} exists; pass --force to replace it")
    assert main([*args, "--force"]) == 0
    res = json.loads(out.read_text())
    assert res["models"]["base"]["domains"]["news"]["tokens"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left beside it


def test_demo_refuses_an_earlier_result_before_any_work(tiny_zoo, tmp_path, capsys):
    d, _ = tiny_zoo
    out = tmp_path / "demo"
    out.mkdir()
    (out / "leaderboard.json").write_text('{"earlier": true}\n')
    _refused(
        ["demo", "--zoo-dir", str(d), "--out", str(out), "-q"], capsys, tmp_path, f"output {out} exists and is not empty; pass --force"
    )


# -- bad zoo, demo and eval paths --------------------------------------------------------------------


@pytest.fixture
def not_zoos(tmp_path):
    """A missing folder, a file, a non-empty folder that is not a zoo, and a zoo with a broken manifest."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_bytes(b"\xff{not json")
    return tmp_path


BAD_ZOO_PATHS = [
    ("zoo info {root}/missing", "dir", "missing: folder not found"),
    ("zoo info {root}/file", "file: is not a folder"),
    ("zoo info {root}/mine", "mine: not a built zoo (no manifest.json"),
    ("zoo info {root}/broken", "manifest.json: cannot read the zoo's manifest"),
    ("zoo build --out {root}/file", "--out", "file: is a file, not a folder"),
    ("zoo build --out {root}/mine", "mine: the folder is not empty and holds no zoo"),
    ("eval m --zoo {root}/missing", "--zoo", "missing: folder not found"),
    ("eval m --zoo {root}/file", "--zoo", "file: is not a folder"),
    ("eval m --zoo {root}/mine", "mine: not a built zoo"),
    ("eval m --zoo {root}/broken", "cannot read the zoo's manifest"),
    ("demo --out {root}/file", "--out", "file: is a file, not a folder"),
    ("demo --zoo-dir {root}/file --out {root}/new", "--zoo-dir", "file: is a file, not a folder"),
    ("demo --zoo-dir {root}/mine --out {root}/new", "mine: the folder is not empty and holds no zoo"),
    ("demo --zoo-dir {root}/broken --out {root}/new", "broken"),
    ("demo --zoo-dir {root}/mine --out {root}/mine", "mine exists and is not empty; pass --force"),
]


@pytest.mark.parametrize("case", BAD_ZOO_PATHS, ids=lambda case: case[0])
def test_bad_zoo_demo_and_eval_paths_are_one_line(not_zoos, capsys, case):
    line, *needles = case
    args = [a.format(root=not_zoos) for a in line.split()]
    _refused(args, capsys, not_zoos, *needles)


def test_demo_refuses_a_method_it_cannot_run(tiny_zoo, tmp_path, capsys):
    d, _ = tiny_zoo
    _refused(
        ["demo", "--zoo-dir", str(d), "--out", str(tmp_path / "new"), "--methods", "ties,tyes", "-q"],
        capsys,
        tmp_path,
        "--methods ties,tyes: the demo cannot run tyes on 3 experts",
    )


def test_resolve_inputs_fills_in_the_zoo(tiny_zoo):
    from splice.eval import resolve_inputs

    d, m = tiny_zoo
    r = resolve_inputs(["merged"], {"news": "mine.txt"}, zoo=d)
    assert r["models"] == ["merged", str(d / "models" / "base"), *(str(d / "models" / e) for e in m["experts"])]
    assert r["domains"]["news"] == "mine.txt" and set(r["domains"]) == set(m["domains"])
    assert set(r["tasks"]) == set(m["tasks"])
    assert r["base"] == str(d / "models" / "base") and r["general"] == m["general_domain"]
    assert r["experts"] == {e: str(d / "models" / e) for e in m["experts"]}
    own = resolve_inputs(["merged"], zoo=d, base="b")  # a base given: the zoo's experts are not assumed
    assert own["models"] == ["merged", "b"] and own["experts"] == {} and own["general"] is None
    assert resolve_inputs(["x"], base="b")["models"] == ["b", "x"]


# -- advice about options the command does not have ---------------------------------------------------


def _pickle_only(tmp_path, model) -> Path:
    p = tmp_path / "pickled"
    p.mkdir()
    torch.save(load_sd(model), p / "pytorch_model.bin")
    (p / "config.json").write_text((Path(model) / "config.json").read_text())
    return p


def test_moe_compress_on_pickle_weights_says_it_reads_safetensors_only(tmp_path, llama_trio, capsys):
    base, _ = llama_trio
    p = _pickle_only(tmp_path, base)
    (tmp_path / "cal.txt").write_text("t5 t9 t13")
    line = _refused(
        ["moe-compress", str(p), "-o", str(tmp_path / "out"), "--experts", "1", "--calibration", str(tmp_path / "cal.txt")],
        capsys,
        tmp_path,
        "only pickle weights (.bin/.pt) found; splice moe-compress reads .safetensors weights only",
    )
    assert "pickle" in line and "--allow-pickle" not in line and "allow_pickle" not in line


def test_error_line_renders_only_the_commands_own_flags():
    def parser_of(*argv):
        return build_parser().parse_args(list(argv)).command_parser

    merge, plan, ev = parser_of("merge", "r.yaml", "-o", "o"), parser_of("plan", "r.yaml"), parser_of("eval")
    err = SpliceError(f"x.bin: pickle weights; pass {option('allow_pickle')} to load them")
    assert error_line(err, merge) == "x.bin: pickle weights; pass --allow-pickle to load them"
    assert error_line(err, plan) == "x.bin: pickle weights; pass --allow-pickle to load them"
    assert (
        error_line(err, ev)
        == "x.bin: pickle weights; splice eval reads .safetensors weights only (convert the .bin/.pt files to .safetensors first)"
    )
    odd = SpliceError(f"{option('frobnicate', 3)} is too many; try {option('max_tokens', 2)}")
    assert (
        error_line(odd, ev)
        == "frobnicate=3 is too many; splice eval has no flag for frobnicate (an option of the Python API); try --tokens 2"
    )
    assert str(odd) == "frobnicate=3 is too many; try max_tokens=2"


# -- no heavy imports for --help; no home cache -------------------------------------------------------


def test_help_of_every_command_imports_neither_torch_nor_transformers_nor_numba():
    code = (
        "import sys\n"
        "import splice.cli, splice.cli.common, splice.options, splice.errors, splice.eval, splice.eval.results\n"
        "from splice.cli import build_parser, main\n"
        "commands = list(build_parser()._subparsers._group_actions[0].choices)\n"
        "codes = [main(['--help'])] + [main([c, '--help']) for c in commands] + [main(['zoo', a, '--help']) for a in ('build', 'info')]\n"
        "print(len(commands) == len(splice.cli.COMMANDS) > 10, set(codes))\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numba', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    last = out.strip().splitlines()
    assert last[-1] == "[]", out
    assert last[-2] == "True {0}", out  # every command in COMMANDS is there, and each --help exits 0


def test_no_test_uses_the_home_caches():
    import huggingface_hub.constants as hub

    from splice.zoo import default_zoo_dir

    home = Path.home().resolve()
    for path in (default_zoo_dir("tiny"), Path(hub.HF_HUB_CACHE), Path(hub.HF_HOME)):
        assert home not in path.resolve().parents, path


@pytest.mark.parametrize("line", ["zoo build --out {dir}", "eval m --zoo {dir}", "demo --zoo-dir {dir} --out {root}/new", "zoo info {dir}"])
def test_an_unreadable_zoo_folder_is_one_line(tmp_path, monkeypatch, capsys, line):
    # tests run as root, which reads any folder: the operating system's refusal is simulated
    locked = tmp_path / "locked"
    locked.mkdir()
    real_iterdir, real_stat = Path.iterdir, Path.stat

    def iterdir(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    def stat(self, **kw):
        if locked in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, **kw)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    monkeypatch.setattr(Path, "stat", stat)
    args = line.format(dir=locked, root=tmp_path).split()
    _refused(args, capsys, tmp_path, "locked", "cannot be read (Permission denied)")
