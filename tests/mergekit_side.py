"""mergekit 0.1.5 as the reference, run in its own venv (``benchmarks/.venv-mergekit``).

mergekit is never importable in splice's venv (it pins other transformers and
torch builds), so parity tests reach it in one of two ways:

- ``mergekit_yaml()`` / ``mergekit_bin(name)``: its command-line tools, for
  end-to-end runs on recipe files;
- ``side()``: one long-lived side-venv Python per test session (importing
  mergekit costs seconds, so it is paid once). It calls mergekit's merge-method
  objects on tensors we send it through a temporary safetensors file
  (``merge``), and runs whole recipes the way ``mergekit-yaml`` does
  (``run_yaml``: the same ``MergeConfiguration`` and ``run_merge`` calls). A
  test compares the results with splice's own in this process.

Where the side venv is looked up: ``$SPLICE_MERGEKIT_PYTHON``, else the Python
next to ``$SPLICE_MERGEKIT_YAML``, else ``benchmarks/.venv-mergekit/bin/python``.
``make test`` builds that venv once and sets both variables, and also sets
``SPLICE_REQUIRE_MERGEKIT=1``: then a missing mergekit fails the test run
instead of skipping the parity tests.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SETUP_HINT = "build it with 'bash benchmarks/setup_mergekit.sh' (make test does)"


def mergekit_python() -> Path | None:
    """The side venv's Python, or None when it is not built."""
    env = os.environ.get("SPLICE_MERGEKIT_PYTHON")
    if env:
        return Path(env) if Path(env).exists() else None
    yaml_cmd = os.environ.get("SPLICE_MERGEKIT_YAML")
    candidates = [Path(yaml_cmd).parent / "python"] if yaml_cmd else []
    candidates.append(ROOT / "benchmarks" / ".venv-mergekit" / "bin" / "python")
    return next((p for p in candidates if p.exists()), None)


def mergekit_bin(name: str) -> Path | None:
    """A mergekit command (``mergekit-yaml``, ``mergekit-moe``, ``mergekit-multi``) from the side venv."""
    env = os.environ.get("SPLICE_MERGEKIT_YAML")
    if env and (Path(env).parent / name).exists():
        return Path(env).parent / name
    py = mergekit_python()
    if py is not None and (py.parent / name).exists():
        return py.parent / name
    return None


def mergekit_yaml() -> Path | None:
    return mergekit_bin("mergekit-yaml")


def required() -> bool:
    return os.environ.get("SPLICE_REQUIRE_MERGEKIT", "") not in ("", "0")


def missing(what: str) -> None:
    """Skip (or, under ``SPLICE_REQUIRE_MERGEKIT=1``, fail) a test that needs the side venv."""
    msg = f"mergekit 0.1.5 side venv not found ({what}); {SETUP_HINT}"
    if required():
        pytest.fail(msg)
    pytest.skip(msg)


# The server: reads one JSON request per line, answers one JSON line marked "@@".
#   {"kind": "fn", "inputs": file, "output": file, "fn": "module:attr", "registry": name|null,
#    "n": count, "base_index": int|null, "parameters": {...}}
#   {"kind": "yaml", "config": file, "output": folder, "options": {MergeOptions fields}}
#   {"kind": "moe_accepts", "config": file}  ->  "accepted": whether mergekit-moe would go on to build it
SERVER = r"""
import importlib, json, sys, traceback
import torch
from safetensors.torch import load_file, save_file

def resolve(spec):
    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj

def run_fn(req):
    from mergekit.merge_methods.base import TensorGroup
    tensors = load_file(req["inputs"])
    xs = [tensors[f"t{i}"] for i in range(req["n"])]
    fn = resolve(req["fn"])
    if req.get("registry"):
        fn = fn(req["registry"])
    group = TensorGroup.from_tensors(xs, base_index=req.get("base_index"))
    (out,) = fn((group,), parameters=req.get("parameters") or {})
    save_file({"out": out.contiguous()}, req["output"])

def run_yaml(req):
    # what mergekit-yaml's main() does, without paying for the import again
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    options = MergeOptions(**req.get("options", {}))
    options.apply_global_options()
    with open(req["config"], encoding="utf-8") as f:
        source = f.read()
    try:
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(source)), req["output"], options=options, config_source=source)
    finally:
        cache = LoaderCache()
        cache.flush_all()
        cache.loaders.clear()  # each recipe starts as a fresh mergekit-yaml would

def moe_accepts(req):
    # mergekit-moe's own checks before it builds anything: the schema, then is_bad_config
    import yaml
    from mergekit.moe.config import MoEMergeConfig, is_bad_config
    with open(req["config"], encoding="utf-8") as f:
        config = MoEMergeConfig.model_validate(yaml.safe_load(f))
    return {"accepted": not is_bad_config(config, allow_all_same=req.get("allow_all_same", False))}

KINDS = {"fn": run_fn, "yaml": run_yaml, "moe_accepts": moe_accepts}
print("@@" + json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    try:
        answer = KINDS[req["kind"]](req) or {}
        print("@@" + json.dumps({"ok": True, **answer}), flush=True)
    except BaseException:
        print("@@" + json.dumps({"error": traceback.format_exc()}), flush=True)
"""


class MergekitError(AssertionError):
    """mergekit itself failed on a request (its traceback is the message)."""


class MergekitSide:
    """mergekit 0.1.5 in a long-lived side-venv process: its merge-method objects and its recipe runner."""

    def __init__(self, python: Path):
        self._dir = tempfile.TemporaryDirectory(prefix="splice-mergekit-")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
        self._proc = subprocess.Popen([str(python), "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if not self._reply().get("ready"):
            self.close()
            raise RuntimeError(f"the mergekit side venv at {python} did not start (is mergekit 0.1.5 installed there?)")
        self._n = 0

    def merge(self, fn: str, tensors: list[torch.Tensor], *, base_index: int | None = None, parameters=None, registry=None):
        """Run ``fn((TensorGroup.from_tensors(tensors, base_index=...),), parameters=...)`` in mergekit.

        Args:
            fn: "module:attr" of a mergekit merge method object, e.g.
                "mergekit.merge_methods.slerp:slerp_merge_method"; with ``registry``,
                a lookup function ("mergekit.merge_methods.registry:get") called with that name.
            tensors: the group's tensors, in input order.
            base_index: which of them is the base, if any.
            parameters: mergekit's parameter mapping (lists are per input, as mergekit takes them).

        Returns:
            mergekit's output tensor.
        """
        from safetensors.torch import load_file, save_file

        self._n += 1
        src = Path(self._dir.name) / f"in{self._n}.safetensors"
        dst = Path(self._dir.name) / f"out{self._n}.safetensors"
        save_file({f"t{i}": t.contiguous() for i, t in enumerate(tensors)}, str(src))
        req = {"kind": "fn", "inputs": str(src), "output": str(dst), "fn": fn, "n": len(tensors), "base_index": base_index}
        req.update(parameters=parameters or {}, registry=registry)
        try:
            self._ask(req, f"{fn} {registry or ''}")
        finally:
            src.unlink(missing_ok=True)
        out = load_file(str(dst))["out"]
        dst.unlink(missing_ok=True)
        return out

    def run_yaml(self, config: Path, out: Path, **options) -> Path:
        """Run a recipe file as ``mergekit-yaml CONFIG OUT --no-copy-tokenizer`` would.

        Args:
            config: the recipe file.
            out: the output folder.
            options: MergeOptions fields (default: ``copy_tokenizer=False, quiet=True``).

        Returns:
            ``out``. A failure raises MergekitError with mergekit's traceback.
        """
        opts = {"copy_tokenizer": False, "quiet": True, **options}
        self._ask({"kind": "yaml", "config": str(config), "output": str(out), "options": opts}, f"run on {config}")
        return out

    def moe_accepts(self, config: Path) -> bool:
        """Whether mergekit-moe 0.1.5 accepts an MoE recipe (its schema and its ``is_bad_config`` checks)."""
        try:
            return self._ask({"kind": "moe_accepts", "config": str(config)}, f"moe check of {config}")["accepted"]
        except MergekitError as e:
            if "ValidationError" in str(e):
                return False
            raise

    def _ask(self, req: dict, what: str) -> dict:
        if self._proc.poll() is not None:
            raise RuntimeError("the mergekit side process has exited")
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        reply = self._reply()
        if "error" in reply:
            raise MergekitError(f"mergekit {what} failed:\n{reply['error']}")
        return reply

    def _reply(self) -> dict:
        """The next answer line (marked "@@"; anything else mergekit prints is passed over)."""
        for line in self._proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        return {"error": "the mergekit side process exited"}

    def close(self):
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._dir.cleanup()


_SIDE: MergekitSide | None = None


def side() -> MergekitSide:
    """The session's one MergekitSide (skipped, or failed under SPLICE_REQUIRE_MERGEKIT, without the side venv)."""
    global _SIDE
    if _SIDE is None:
        py = mergekit_python()
        if py is None:
            missing("no Python at $SPLICE_MERGEKIT_PYTHON or benchmarks/.venv-mergekit")
        _SIDE = MergekitSide(py)
        atexit.register(_SIDE.close)
    return _SIDE


@pytest.fixture
def mergekit():
    return side()
