"""With no writable home and a read-only install, importing the kernels still works (one warning).

The tests run as any user (root included, whom file modes do not stop), so the read-only
file system is simulated: in a subprocess, numba's check that a cache folder is writable
fails for every folder outside the one left writable, exactly as it fails on a read-only
install with a read-only home.  NUMBA_CACHE_DIR is unset, as a user would have it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

SRC = Path(__file__).resolve().parents[2] / "src"

SCRIPT = """
import os, sys
import numpy as np
import numba.core.caching as caching

writable = os.environ.get("WRITABLE")
real_check = caching._CacheLocator.ensure_cache_path

def read_only_file_system(self):
    path = os.path.realpath(self.get_cache_path())
    if not writable or not path.startswith(os.path.realpath(writable) + os.sep):
        raise PermissionError(30, "Read-only file system", path)
    real_check(self)

caching._CacheLocator.ensure_cache_path = read_only_file_system
from splice.methods import _kernels

assert _kernels.AVAILABLE
print(type(_kernels.gta._cache).__name__, getattr(_kernels.gta._cache, "_cache_path", "-"))
out = np.zeros(4, np.uint32)
_kernels._load_block(np.arange(4, dtype=np.uint16), 0, 4, np.uint32(16), out)  # compiles one small kernel
assert out.tolist() == [0, 1 << 16, 2 << 16, 3 << 16]
"""


def _run(tmp_path: Path, writable: Path | None) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), TMPDIR=str(tmp_path / "tmp"), PYTHONPATH=str(SRC))
    (tmp_path / "tmp").mkdir()
    if writable is not None:
        env["WRITABLE"] = str(writable)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)


def test_read_only_install_and_home_cache_in_a_private_temporary_folder(tmp_path):
    p = _run(tmp_path, writable=tmp_path / "tmp")
    assert p.returncode == 0, p.stderr
    private = tmp_path / "tmp" / f"splice-numba-{os.getuid()}"
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: numba finds no writable cache folder (read-only install and home); compiled kernels are cached in {private}"
    ]
    kind, path = p.stdout.split()
    assert kind == "FunctionCache" and Path(path).parent == private
    assert any(private.rglob("_kernels._load_block-*.nbi"))  # the compiled helper was cached there
    assert not (tmp_path / "home" / ".cache").exists()
    assert oct(private.stat().st_mode & 0o777) == oct(0o700)


def test_nothing_writable_compiles_without_a_cache(tmp_path):
    p = _run(tmp_path, writable=None)
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: numba finds no writable cache folder (read-only install and home); kernels are compiled again in every process (a few seconds)"
    ]
    assert p.stdout.split()[0] == "NullCache"


def test_a_temporary_folder_another_user_could_write_is_not_used(tmp_path, monkeypatch):
    import tempfile

    from splice.methods import _kernels

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"splice-numba-{os.getuid()}"
    assert _kernels._private_cache_dir() == str(planted)  # made here, mode 0700: used
    planted.chmod(0o777)  # world-writable: compiled code in it could be anyone's
    assert _kernels._private_cache_dir() is None
    planted.rmdir()
    planted.symlink_to(tmp_path, target_is_directory=True)  # a link planted in its place
    assert _kernels._private_cache_dir() is None
