"""Output safety and file faults: one line, exit 2, nothing written, inputs untouched.

Outputs that would destroy inputs (with or without --force, through a symlink or ``..``),
side files that link out of their model, configs that disagree with their tensors, a
full disk, outputs that cannot be created, malformed safetensors headers (and a seeded
fuzz over them), signals while worker threads run, stale staging folders after SIGKILL,
the umask and the parent folders a failed write made.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import make_model

import splice
from splice.checkpoint.writer import OWNER_FILE, TEMP_MARK
from splice.cli import main
from splice.errors import CheckpointError, SpliceError

# ------------------------------------------------------------------ helpers


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its content's hash (links by target), to compare before and after."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(args: list[str], capsys) -> tuple[int, list[str], str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, [l for l in err.splitlines() if l.startswith("splice: error:")], err


def fails_cleanly(args: list[str], root: Path, capsys, *needles: str) -> str:
    """``args`` exits 2 with one error line holding ``needles``, no traceback, and ``root`` unchanged."""
    before = snapshot(root)
    code, lines, err = run_cli(args, capsys)
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert snapshot(root) == before, "the command changed files it must not touch"
    return lines[0]


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def linear(*models) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if TEMP_MARK in p.name or ".splice-old-" in p.name]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder holding two tiny Llamas, a Mixtral built from them, calibration text and a merge recipe."""
    from splice.moe import build_moe

    root = tmp_path_factory.mktemp("world")
    a = make_model(root / "a", "llama", seed=0, layers=2, hidden=32)
    b = make_model(root / "b", "llama", seed=1, layers=2, hidden=32, from_model=a)
    moe_recipe = {"base_model": str(a), "gate_mode": "random", "experts": [{"source_model": str(a)}, {"source_model": str(b)}]}
    mixtral = root / "mixtral"
    build_moe(moe_recipe, mixtral, quiet=True)
    (root / "text.txt").write_text("\n\n".join(" ".join(f"t{(i * 7 + j) % 90}" for j in range(40)) for i in range(6)))
    write_recipe(root / "merge.yaml", linear(a, b))
    write_recipe(root / "moe.yaml", moe_recipe)
    return root


def commands(root: Path, out: str) -> dict[str, list[str]]:
    """The four commands that write a model, reading the world's inputs and writing ``out``."""
    return {
        "merge": ["merge", str(root / "merge.yaml"), "-o", out, "-q"],
        "skip": ["skip", str(root / "a"), "-o", out, "--drop", "1", "-q"],
        "moe": ["moe", str(root / "moe.yaml"), "-o", out, "-q"],
        "moe-compress": ["moe-compress", str(root / "mixtral"), "-o", out, "--experts", "1", "--calibration", str(root / "text.txt"), "-q"],
    }


# ------------------------------------------------------------------ outputs that would destroy inputs (13.1)

COMMANDS = ("merge", "skip", "moe", "moe-compress")


def _input_of(command: str) -> str:
    return {"merge": "a", "skip": "a", "moe": "a", "moe-compress": "mixtral"}[command]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("force", [False, True])
def test_output_equal_to_an_input_is_refused(world, capsys, command, force):
    out = str(world / _input_of(command))
    args = commands(world, out)[command] + (["--force"] if force else [])
    fails_cleanly(args, world, capsys, "is the input", out)


@pytest.mark.parametrize("command", COMMANDS)
def test_output_holding_the_inputs_is_refused(world, capsys, command):
    fails_cleanly(commands(world, str(world))[command] + ["--force"], world, capsys, "contains the input")


@pytest.mark.parametrize("command", COMMANDS)
def test_output_inside_an_input_is_refused(world, capsys, command):
    out = world / _input_of(command) / "merged"
    fails_cleanly(commands(world, str(out))[command] + ["--force"], world, capsys, "lies inside the input")


@pytest.mark.parametrize("command", COMMANDS)
def test_current_folder_is_refused(world, capsys, monkeypatch, command):
    monkeypatch.chdir(world)
    fails_cleanly(commands(world, ".")[command] + ["--force"], world, capsys, "current folder")


@pytest.mark.parametrize("command", COMMANDS)
def test_empty_output_is_an_error(world, capsys, monkeypatch, command):
    monkeypatch.chdir(world)
    fails_cleanly(commands(world, "")[command] + ["--force"], world, capsys, "output path is empty")


@pytest.mark.parametrize("command", COMMANDS)
def test_home_folder_and_root_are_refused(world, capsys, monkeypatch, command):
    monkeypatch.setenv("HOME", str(world))
    fails_cleanly(commands(world, str(world))[command] + ["--force"], world, capsys, "home folder")
    fails_cleanly(commands(world, "/")[command] + ["--force"], world, capsys, "filesystem root")


@pytest.mark.parametrize("command", COMMANDS)
def test_output_reaching_an_input_through_a_symlink_or_dotdot_is_refused(world, tmp_path, capsys, command):
    link = tmp_path / "link"
    link.symlink_to(world / _input_of(command), target_is_directory=True)
    fails_cleanly(commands(world, str(link))[command] + ["--force"], world, capsys, "is the input")
    dotdot = f"{world}/nowhere/../{_input_of(command)}"
    fails_cleanly(commands(world, dotdot)[command] + ["--force"], world, capsys, "is the input")


def test_input_reached_through_a_symlink_or_dotdot_is_protected(world, tmp_path, capsys):
    """The recipe names the models through a symlink and through ``..``; the output is the real folder."""
    (tmp_path / "models").symlink_to(world, target_is_directory=True)
    r = write_recipe(tmp_path / "r.yaml", linear(tmp_path / "models" / "a", f"{world}/a/../b"))
    for victim in ("a", "b"):
        fails_cleanly(["merge", str(r), "-o", str(world / victim), "-q", "--force"], world, capsys, "is the input")


def test_recipe_file_and_calibration_text_are_inputs_too(world, tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    r = write_recipe(tmp_path / "sub" / "r.yaml", linear(world / "a", world / "b"))
    fails_cleanly(["merge", str(r), "-o", str(tmp_path / "sub"), "-q", "--force"], tmp_path, capsys, "contains the input", "r.yaml")
    (tmp_path / "cal").mkdir()
    text = (tmp_path / "cal" / "text.txt").write_bytes((world / "text.txt").read_bytes())
    args = ["moe-compress", str(world / "mixtral"), "-o", str(tmp_path / "cal"), "--experts", "1"]
    fails_cleanly(args + ["--calibration", str(tmp_path / "cal" / "text.txt"), "-q", "--force"], tmp_path, capsys, "contains the input")
    assert text > 0


def test_library_call_is_refused_too(world):
    before = snapshot(world)
    with pytest.raises(CheckpointError, match="is the input"):
        splice.merge(world / "merge.yaml", world / "b", force=True, quiet=True)
    with pytest.raises(CheckpointError, match="contains the input"):
        splice.merge(world / "merge.yaml", world, force=True, quiet=True)
    with pytest.raises(CheckpointError, match="output path is empty"):
        splice.merge(world / "merge.yaml", "", force=True, quiet=True)
    assert snapshot(world) == before


# ------------------------------------------------------------------ inputs that are wrong in other ways (13.3, 13.5, 13.6)


@pytest.fixture
def pair(tmp_path):
    a = make_model(tmp_path / "a", "llama", seed=0)
    b = make_model(tmp_path / "b", "llama", seed=1, from_model=a)
    return a, b


def test_side_file_linking_out_of_its_model_is_refused(pair, tmp_path, capsys):
    a, b = pair
    secret = tmp_path / "secret.txt"
    secret.write_text("private key material")
    (a / "tokenizer.model").symlink_to(secret)
    r = write_recipe(tmp_path / "r.yaml", linear(a, b))
    fails_cleanly(
        ["merge", str(r), "-o", str(tmp_path / "out"), "-q"], tmp_path, capsys, str(a / "tokenizer.model"), "outside its model folder"
    )
    moe = {
        "base_model": str(a),
        "gate_mode": "random",
        "experts_per_token": 1,
        "experts": [{"source_model": str(a)}, {"source_model": str(b)}],
    }
    moe = write_recipe(tmp_path / "moe.yaml", moe)
    fails_cleanly(["moe", str(moe), "-o", str(tmp_path / "out"), "-q"], tmp_path, capsys, "tokenizer.model", "outside its model folder")


def test_side_file_linking_inside_its_model_is_copied(pair, tmp_path):
    a, b = pair
    (a / "tokenizer.json").rename(a / "real-tokenizer.json")
    (a / "tokenizer.json").symlink_to("real-tokenizer.json")
    splice.merge(write_recipe(tmp_path / "r.yaml", linear(a, b)), tmp_path / "out", quiet=True)
    out = tmp_path / "out" / "tokenizer.json"
    assert not out.is_symlink() and out.read_bytes() == (a / "real-tokenizer.json").read_bytes()


@pytest.mark.parametrize("declared", [2, 6])
def test_config_layer_count_disagreeing_with_the_tensors(pair, tmp_path, capsys, declared):
    a, b = pair
    cfg = json.loads((b / "config.json").read_text())
    cfg["num_hidden_layers"] = declared
    (b / "config.json").write_text(json.dumps(cfg))
    r = write_recipe(tmp_path / "r.yaml", linear(a, b))
    line = fails_cleanly(["merge", str(r), "-o", str(tmp_path / "out"), "-q"], tmp_path, capsys, str(b))
    assert f"num_hidden_layers = {declared}" in line and "4 layers" in line


def test_reference_model_without_config_is_refused(pair, tmp_path, capsys):
    a, b = pair
    (a / "config.json").unlink()
    r = write_recipe(tmp_path / "r.yaml", linear(a, b))
    fails_cleanly(["merge", str(r), "-o", str(tmp_path / "out"), "-q"], tmp_path, capsys, str(a), "no config.json")


def test_corrupt_tokenizer_json_under_union(tmp_path, capsys):
    a = make_model(tmp_path / "a", "llama", seed=0)
    b = make_model(tmp_path / "b", "llama", seed=1, from_model=a, extra_tokens=["<extra>"])
    (b / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": [')
    r = write_recipe(tmp_path / "r.yaml", {**linear(a, b), "base_model": str(a), "tokenizer_source": "union"})
    fails_cleanly(["merge", str(r), "-o", str(tmp_path / "out"), "-q"], tmp_path, capsys, str(b / "tokenizer.json"))


# ------------------------------------------------------------------ file faults (13.14)


def test_disk_full_while_writing(pair, tmp_path, capsys, monkeypatch):
    a, b = pair
    r = write_recipe(tmp_path / "r.yaml", linear(a, b))
    real, calls = os.pwrite, [0]

    def full(fd, data, offset):
        calls[0] += 1
        if calls[0] > 5:  # the headers and a few tensors go through, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    for workers in ("1", "2"):
        calls[0] = 0
        fails_cleanly(["merge", str(r), "-o", str(tmp_path / "out"), "-q", "--workers", workers], tmp_path, capsys, "disk is full")


def test_output_under_a_file(pair, tmp_path, capsys):
    a, b = pair
    r = write_recipe(tmp_path / "r.yaml", linear(a, b))
    (tmp_path / "plain").write_text("not a folder")
    fails_cleanly(["merge", str(r), "-o", str(tmp_path / "plain" / "out"), "-q"], tmp_path, capsys, "plain")
    fails_cleanly(["merge", str(r), "-o", str(tmp_path / "plain" / "x" / "out"), "-q"], tmp_path, capsys, "is a file")
    fails_cleanly(["merge", str(r), "-o", str(tmp_path / "plain"), "-q", "--force"], tmp_path, capsys, "not a folder")


def test_output_without_permission(pair, tmp_path, capsys, monkeypatch):
    """EACCES from mkdir (simulated: the tests may run as root, who is never refused)."""
    a, b = pair
    r = write_recipe(tmp_path / "r.yaml", linear(a, b))
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.mkdir

    def mkdir(path, mode=0o777, *args, **kw):
        if str(path).startswith(str(locked)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, mode, *args, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)
    fails_cleanly(["merge", str(r), "-o", str(locked / "out"), "-q"], tmp_path, capsys, "Permission denied", str(locked))
    fails_cleanly(["merge", str(r), "-o", str(locked / "deep" / "out"), "-q"], tmp_path, capsys, "Permission denied")


def _rewrite_header(file: Path, edit) -> None:
    """Replace the JSON header of a safetensors file with ``edit(header)`` (bytes or a dict)."""
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    new = edit(header)
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _shifted(entry: dict, by: int) -> list[int]:
    start, end = entry["data_offsets"]
    return [start + by, end + by]


HEADER_FAULTS = {
    "metadata-list": (lambda h: {**h, "__metadata__": ["format", "pt"]}, "__metadata__"),
    "deep-nesting": (lambda h: b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "negative-dimension": (lambda h: {**h, _first(h): {**h[_first(h)], "shape": [-2, -48]}}, "invalid shape"),
    "offsets-past-the-end": (lambda h: {**h, _first(h): {**h[_first(h)], "data_offsets": _shifted(h[_first(h)], 10**12)}}, "ends at byte"),
    "offsets-reversed": (lambda h: {**h, _first(h): {**h[_first(h)], "data_offsets": [400, 0]}}, "invalid data_offsets"),
    "dtype-unknown": (lambda h: {**h, _first(h): {**h[_first(h)], "dtype": "F7"}}, "unknown dtype"),
    "entry-not-object": (lambda h: {**h, _first(h): [1, 2, 3]}, "corrupted header entry"),
    "not-an-object": (lambda h: b"[1, 2]", "not a JSON object"),
}


@pytest.mark.parametrize("fault", sorted(HEADER_FAULTS))
def test_malformed_safetensors_header(pair, tmp_path, capsys, fault):
    a, b = pair
    edit, needle = HEADER_FAULTS[fault]
    _rewrite_header(b / "model.safetensors", edit)
    r = write_recipe(tmp_path / "r.yaml", linear(a, b))
    fails_cleanly(["merge", str(r), "-o", str(tmp_path / "out"), "-q"], tmp_path, capsys, str(b / "model.safetensors"), needle)


def _mutate(raw: bytes, rng: random.Random) -> bytes:
    """One random mutation of header bytes: a byte changed, bytes inserted or removed, a value replaced."""
    kind = rng.randrange(4)
    if kind == 0:
        i = rng.randrange(len(raw))
        return raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1 :]
    if kind == 1:
        i = rng.randrange(len(raw))
        return raw[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4))) + raw[i:]
    if kind == 2:
        i = rng.randrange(len(raw))
        return raw[:i] + raw[i + rng.randrange(1, 8) :]
    header = json.loads(raw)
    name = rng.choice(list(header))
    weird = rng.choice([None, -1, 0, 2**70, 1.5, "F32", "x", [], [1, -1], [0, 10**9], {}, [[1]], True])
    if name == "__metadata__" or rng.random() < 0.2:
        header[name] = weird
    else:
        header[name] = {**header[name], rng.choice(["dtype", "shape", "data_offsets", "extra"]): weird}
    return json.dumps(header).encode()


FUZZ_CASES = 300  # header mutations read back (about a second)
FUZZ_MERGES = 12  # of them, also merged through the CLI (a few seconds)


def test_fuzzed_safetensors_headers_fail_in_one_line_and_leave_nothing(tmp_path, capsys):
    from splice.checkpoint.reader import open_model

    a = make_model(tmp_path / "a", "llama", seed=0, layers=1, hidden=16, tokenizer=False)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    good = (a / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header, data = good[8 : 8 + n], good[8 + n :]
    r = write_recipe(tmp_path / "r.yaml", linear(a, b))
    rng = random.Random(1234)
    outcomes = {"read": 0, "refused": 0}
    merged = {"read": 0, "refused": 0}  # cases also merged through the CLI, by how the read went
    for case in range(FUZZ_CASES):
        raw = _mutate(header, rng)
        lied = rng.random() < 0.1  # sometimes the length prefix lies too
        length = len(raw) + (rng.randrange(-16, 16) if lied else 0)
        (b / "model.safetensors").write_bytes(struct.pack("<Q", max(0, length)) + raw + data)
        try:
            src = open_model(b)
            for k in src.keys():
                src.get(k)
            src.close()
            how = "read"
        except SpliceError as e:
            assert "\n" not in str(e) and str(b) in str(e), (case, str(e))
            how = "refused"
        outcomes[how] += 1
        if merged[how] < FUZZ_MERGES // 2:
            merged[how] += 1
            out = tmp_path / "out"
            before = snapshot(tmp_path)
            code, lines, err = run_cli(["merge", str(r), "-o", str(out), "-q"], capsys)
            assert "Traceback" not in err and leftovers(tmp_path) == [], (case, err)
            if code == 0:
                shutil.rmtree(out)
            else:
                assert code == 2 and len(lines) == 1, (case, err)
            assert snapshot(tmp_path) == before
    assert outcomes["read"] > 0 and outcomes["refused"] > FUZZ_CASES // 2, outcomes
    assert merged == {"read": FUZZ_MERGES // 2, "refused": FUZZ_MERGES // 2}


# ------------------------------------------------------------------ signals and stale staging folders (13.12)

_SLOW_MERGE = """
import dataclasses, time
from splice.methods import METHODS
linear = METHODS.get('linear')
def slow(*a, **k):
    open({started!r}, 'w').close()
    time.sleep(0.2)
    return linear.fn(*a, **k)
METHODS._entries['linear'] = dataclasses.replace(linear, fn=slow)
from splice.cli import main
raise SystemExit(main(['merge', {recipe!r}, '-o', {out!r}, '-q', '--workers', '2']))
"""


def _start_slow_merge(tmp_path: Path, recipe: Path) -> subprocess.Popen:
    code = _SLOW_MERGE.format(started=str(tmp_path / "started"), recipe=str(recipe), out=str(tmp_path / "out"))
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "started").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert (tmp_path / "started").exists(), "the merge never started"
    time.sleep(0.1)  # both workers busy
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_while_workers_run_leave_nothing(llama_trio, tmp_path, sig):
    _, (a, b, _) = llama_trio
    p = _start_slow_merge(tmp_path, write_recipe(tmp_path / "r.yaml", linear(a, b)))
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_after_sigkill_the_next_run_removes_the_stale_staging_folder(llama_trio, tmp_path):
    _, (a, b, _) = llama_trio
    r = write_recipe(tmp_path / "r.yaml", linear(a, b))
    p = _start_slow_merge(tmp_path, r)
    p.kill()
    p.communicate(timeout=60)
    stale = [tmp_path / n for n in leftovers(tmp_path)]
    assert len(stale) == 1 and json.loads((stale[0] / OWNER_FILE).read_text())["pid"] == p.pid
    # a staging folder of a live process (this one) beside the same target is left alone
    live = tmp_path / f".out{TEMP_MARK}{os.getpid()}-live"
    live.mkdir()
    from splice.checkpoint.writer import make_temp_folder

    mine = make_temp_folder(tmp_path, "other")
    splice.merge(r, tmp_path / "out", quiet=True)
    assert not stale[0].exists()
    assert live.exists() and mine.exists()  # unknown owner, live owner: kept
    assert (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / OWNER_FILE).exists()


# ------------------------------------------------------------------ permissions and parent folders (13.13)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_follows_the_umask(pair, tmp_path, umask):
    a, b = pair
    r = write_recipe(tmp_path / "r.yaml", linear(a, b))
    old = os.umask(umask)
    try:
        splice.merge(r, tmp_path / "new" / "out", quiet=True)
    finally:
        os.umask(old)
    out = tmp_path / "new" / "out"
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    assert ((tmp_path / "new").stat().st_mode & 0o777) == 0o777 & ~umask
    for f in out.iterdir():
        assert (f.stat().st_mode & 0o777) == 0o666 & ~umask, f.name


def test_failed_merge_removes_the_parent_folders_it_made_and_only_those(pair, tmp_path, capsys):
    a, b = pair
    from safetensors.torch import load_file, save_file

    sd = load_file(b / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, b / "model.safetensors", metadata={"format": "pt"})
    r = write_recipe(tmp_path / "r.yaml", linear(a, b))
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "x" / "y" / "out"
    fails_cleanly(["merge", str(r), "-o", str(out), "-q"], tmp_path, capsys, "NaN or Inf", "layers.1.mlp.up_proj")
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []


@pytest.mark.parametrize(("option", "value"), [("workers", -1), ("workers", 0), ("threads", 0), ("workers", 1.5)])
def test_writer_counts_are_whole_numbers(pair, tmp_path, capsys, option, value):
    a, b = pair
    r = write_recipe(tmp_path / "r.yaml", linear(a, b))
    with pytest.raises(SpliceError, match=f"{option}={value}: must be a whole number"):
        splice.merge(r, tmp_path / "out", quiet=True, **{option: value})
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    if isinstance(value, int):
        fails_cleanly(
            ["merge", str(r), "-o", str(tmp_path / "out"), "-q", f"--{option}", str(value)], tmp_path, capsys, f"--{option} {value}"
        )
