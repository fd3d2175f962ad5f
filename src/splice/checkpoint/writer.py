"""The output folder on disk: where it may go, a staging folder beside it, shards laid out up front.

``check_output`` decides whether a path may receive a model (never an input, the
current folder, the home folder or a filesystem root; an existing non-empty folder
only with ``force``). ``StagedFolder`` is the temporary folder beside the target that
everything is written to: it records its owner (pid, host) so a later run can remove
it if that process died, lays out every shard's header before the first tensor is
computed, takes each tensor at its offset (``os.pwrite``, from any thread, in any
order), and is renamed into place only when complete. ``abort`` removes it and any
parent folders it created.

The engine's ``write_checkpoint`` (``splice.engine.write``) is the one caller.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, option
from .safetensors_io import plan_layout, tensor_bytes, tensor_nbytes

DEFAULT_SHARD_SIZE = 5 * 1000**3
TEMP_MARK = ".splice-tmp-"  # in the name of every staging folder: .<target>.splice-tmp-<pid>-<random>
OWNER_FILE = ".splice-owner.json"  # inside a staging folder: who is writing it
_HASH_CHUNK = 1 << 24  # bytes read at a time when hashing a written shard (memory vs. read calls)


def parse_size(value: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    s = str(value).strip().upper().replace(" ", "")
    units = {
        "KIB": 1024,
        "MIB": 1024**2,
        "GIB": 1024**3,
        "TIB": 1024**4,
        "KB": 1000,
        "MB": 1000**2,
        "GB": 1000**3,
        "TB": 1000**4,
        "K": 1000,
        "M": 1000**2,
        "G": 1000**3,
        "B": 1,
    }
    unit = next((u for u in sorted(units, key=len, reverse=True) if s.endswith(u)), "")
    try:
        n = int(float(s[: len(s) - len(unit)]) * units.get(unit, 1))
    except (ValueError, OverflowError):
        n = 0
    if n <= 0:
        raise CheckpointError(f"invalid size {value!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    return n


# ------------------------------------------------------------------ where an output may go


def _resolved(path: str | os.PathLike) -> Path:
    """Absolute, with symlinks and ``..`` resolved (the path need not exist)."""
    return Path(os.path.expanduser(os.fspath(path))).resolve()


def _cwd() -> Path | None:
    try:
        return Path.cwd().resolve()
    except OSError:  # the current folder was deleted
        return None


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError):  # no HOME and no password entry
        return None


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _with_lora_parts(inputs: Iterable[str | os.PathLike | None]) -> list[str | os.PathLike]:
    """``inputs`` without None, a ``model+adapter`` reference (not itself a path) as its two folders."""
    out: list[str | os.PathLike] = []
    for given in inputs:
        if given is None:
            continue
        text = os.fspath(given)
        if "+" in text and not os.path.lexists(os.path.expanduser(text)):
            out.extend(part for part in text.split("+") if part)
        else:
            out.append(given)
    return out


def check_output(out: str | os.PathLike, force: bool = False, *, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The resolved output folder, or a one-line error if ``out`` may not receive a model.

    Refused with or without ``force``: an empty path; a path that is, contains or lies
    inside one of ``inputs`` (model folders or files, recipes, calibration text); a path
    that is or contains the current folder or the home folder; a filesystem root; an
    existing file. An existing non-empty folder is refused unless ``force``.

    Args:
        out: the output folder as the user gave it.
        force: allow replacing an existing non-empty folder.
        inputs: every path the operation reads.

    Returns:
        ``out`` resolved (symlinks and ``..`` followed).
    """
    if not os.fspath(out).strip():
        raise CheckpointError("the output path is empty; name the folder to write the model to")
    target = _check_place(out, inputs)
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise CheckpointError(f"output {out} exists and is not a folder")
        if any(target.iterdir()) and not force:
            raise CheckpointError(f"output {out} exists and is not empty; pass {option('force')} to overwrite it")
    return target


def check_output_file(out: str | os.PathLike, force: bool = False, *, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """``check_output`` for an output that is one file (a ``.gguf``): the same refusals, except that
    an existing folder is refused and an existing file is replaced only with ``force``."""
    if not os.fspath(out).strip():
        raise CheckpointError("the output path is empty; name the file to write the model to")
    target = _check_place(out, inputs, "file")
    if target.is_dir():
        raise CheckpointError(f"output {out} is a folder; name the file to write")
    if (target.exists() or target.is_symlink()) and not force:
        raise CheckpointError(f"output {out} exists; pass {option('force')} to overwrite it")
    return target


def _check_place(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], noun: str = "folder") -> Path:
    """``out`` resolved, refused if it is a root, over the current or home folder, or an input (either way round)."""
    target = _resolved(out)
    if target.parent == target:
        raise CheckpointError(f"output {out}: refusing to write a model over the filesystem root {target}")
    for what, place in (("the current folder", _cwd()), ("your home folder", _home())):
        if place is not None and _within(place, target):
            raise CheckpointError(f"output {out}: refusing to write a model over {what} ({place})")
    for given in _with_lora_parts(inputs):
        inp = _resolved(given)
        if _within(inp, target) or _within(target, inp):
            relation = "is" if inp == target else ("contains" if _within(inp, target) else "lies inside")
            raise CheckpointError(f"output {out} {relation} the input {given}; choose a {noun} outside the inputs")
    return target


# ------------------------------------------------------------------ staging folders and their owners


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(owner: dict) -> bool:
    """Whether the process that made a staging folder may still be writing it (unknown: yes)."""
    pid, host = owner.get("pid"), owner.get("host")
    if not isinstance(pid, int) or pid <= 0 or host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    started = _start_time(pid)
    return started is None or owner.get("started") in (None, started)


def remove_stale_temp_folders(parent: Path) -> list[Path]:
    """Remove staging folders in ``parent`` left by processes that died (a SIGKILL, a power cut).

    Only folders whose owner record names a process on this host that no longer runs are
    removed; a folder without a readable record may be one a live process is creating.
    """
    removed = []
    try:
        candidates = [p for p in parent.iterdir() if TEMP_MARK in p.name and p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    for folder in candidates:
        try:
            owner = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and not _owner_alive(owner):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _os_error(what: str, path: Path, e: OSError) -> CheckpointError:
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        reason += " (the disk is full)"
    return CheckpointError(f"cannot {what} {path}: {reason}")


def make_parents(folder: Path) -> list[Path]:
    """Create ``folder``'s missing parents (the user's umask applies); returns those created, outermost first."""
    created: list[Path] = []
    for p in reversed(folder.parents):
        if p.is_dir():
            continue
        try:
            p.mkdir()
        except FileExistsError:
            if p.is_dir():  # made by someone else meanwhile: not ours to remove
                continue
            remove_created(created)
            raise CheckpointError(f"cannot create the output folder {folder}: {p} is a file") from None
        except OSError as e:
            remove_created(created)
            raise _os_error("create the output folder", folder, e) from None
        created.append(p)
    return created


def remove_created(folders: list[Path]) -> None:
    """Remove the folders ``make_parents`` created, innermost first, where they are still empty."""
    for p in reversed(folders):
        with contextlib.suppress(OSError):
            p.rmdir()


def make_temp_folder(parent: Path, name: str) -> Path:
    """A new staging folder ``.<name>.splice-tmp-<pid>-<random>`` in ``parent``, with its owner recorded.

    Created with ``mkdir`` (mode 0777 less the umask, like any other tool's folders).
    """
    pid = os.getpid()
    while True:
        tmp = parent / f".{name}{TEMP_MARK}{pid}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise _os_error("create a folder in", parent, e) from None
    owner = {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid)}
    try:
        (tmp / (OWNER_FILE + ".part")).write_text(json.dumps(owner), encoding="utf-8")
        os.replace(tmp / (OWNER_FILE + ".part"), tmp / OWNER_FILE)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error("write to", tmp, e) from None
    return tmp


def _stage_beside(target: Path) -> tuple[Path, list[Path]]:
    """Make ``target``'s missing parents, remove dead runs' staging folders there and make a new one.

    Returns the staging folder and the parent folders created (for ``remove_created``).
    """
    created = make_parents(target)
    remove_stale_temp_folders(target.parent)
    try:
        return make_temp_folder(target.parent, target.name), created
    except BaseException:
        remove_created(created)
        raise


@contextlib.contextmanager
def temp_folder(beside: str | os.PathLike) -> Iterator[Path]:
    """A staging folder beside ``beside`` for intermediate results (removed on exit, as are the parents it created)."""
    tmp, created = _stage_beside(_resolved(beside))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_created(created)


# ------------------------------------------------------------------ the staged output


class StagedFolder:
    """The temporary folder one output is written to. ``layout`` once, ``write`` per tensor (any thread,
    any order), ``finish_tensors``, the side files, then ``commit``; ``abort`` on any failure.
    """

    def __init__(self, target: Path, *, force: bool = False):
        self.out = target
        self.force = force
        self.tmp, self._created = _stage_beside(target)
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (shard index, offset, nbytes)
        self._expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._fds: list[int] = []
        self._files: list[str] = []
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self._weight_map: dict[str, str] = {}
        self.total_bytes = 0

    # -- tensors
    def layout(self, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], shard_size: int) -> None:
        """Plan every shard (headers final from the start) and create the files at full size."""
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for e in entries:
            n = tensor_nbytes(e[1], e[2])
            if shards[-1] and size + n > shard_size:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += n
            self.total_bytes += n
        count = len(shards)
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            prefix, offsets = plan_layout(shard, {"format": "pt"})
            end = len(prefix)
            for name, dt, shape in shard:
                n = tensor_nbytes(dt, shape)
                self._where[name] = (i, offsets[name], n)
                self._weight_map[name] = fname
                end = max(end, offsets[name] + n)
            path = self.tmp / fname
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
            except OSError as e:
                raise _os_error("write", self.out / fname, e) from None
            self._fds.append(fd)
            self._files.append(fname)
            self._pwrite(i, prefix, 0)
            try:
                os.ftruncate(fd, end)
            except OSError as e:
                raise _os_error("write", self.out / fname, e) from None
        self._expected = {name: (dt, tuple(shape)) for name, dt, shape in entries}

    def _pwrite(self, shard: int, data: bytes | memoryview, offset: int) -> None:
        pos = 0
        try:
            while pos < len(data):
                pos += os.pwrite(self._fds[shard], data[pos:], offset + pos)
        except OSError as e:
            raise _os_error("write", self.out / self._files[shard], e) from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Put one planned tensor (its planned dtype and shape, on the CPU) at its offset."""
        dt, shape = self._expected[name]
        if tensor.dtype != dt or tuple(tensor.shape) != shape:
            raise CheckpointError(f"internal: tensor {name} is {tensor.dtype}{tuple(tensor.shape)}, planned {dt}{shape}")
        shard, off, n = self._where[name]
        buf = tensor_bytes(tensor)
        if len(buf) != n:
            raise CheckpointError(f"internal: tensor {name} has {len(buf)} bytes, planned {n}")
        self._pwrite(shard, buf, off)
        with self._lock:
            self._written.add(name)

    def finish_tensors(self) -> None:
        """Check every planned tensor was written, flush the shards, write the index of a sharded model."""
        missing = set(self._expected) - self._written
        if missing:
            raise CheckpointError(f"internal: {len(missing)} planned tensors were never written, e.g. {sorted(missing)[0]}")
        for i, fd in enumerate(self._fds):
            try:
                os.fsync(fd)
            except OSError as e:
                raise _os_error("write", self.out / self._files[i], e) from None
        self._close()
        if len(self._files) > 1:
            self.write_json(
                "model.safetensors.index.json",
                {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self._weight_map.items()))},
            )

    def file_hashes(self) -> dict[str, str]:
        """SHA-256 of each weight file (after ``finish_tensors``)."""
        out = {}
        for fname in self._files:
            h = hashlib.sha256()
            with open(self.tmp / fname, "rb") as f:
                for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
                    h.update(chunk)
            out[fname] = h.hexdigest()
        return out

    # -- other files
    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(data, indent=2, sort_keys=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        try:
            (self.tmp / name).write_text(text, encoding="utf-8")
        except OSError as e:
            raise _os_error("write", self.out / name, e) from None

    def copy_file(self, src: Path, name: str) -> None:
        try:
            shutil.copyfile(src, self.tmp / name)
        except OSError as e:
            raise _os_error("copy", src, e) from None

    # -- the end
    def commit(self) -> Path:
        """Move the finished folder into place (replacing an existing output only with ``force``)."""
        check_output(self.out, force=self.force)
        (self.tmp / OWNER_FILE).unlink()
        try:
            if self.out.exists():
                old = self.out.parent / f".{self.out.name}.splice-old-{os.getpid()}"
                os.rename(self.out, old)
                os.rename(self.tmp, self.out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(self.tmp, self.out)
        except OSError as e:
            raise _os_error("move the finished model to", self.out, e) from None
        return self.out

    def abort(self) -> None:
        """Remove the staging folder and the parent folders this output created."""
        self._close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        remove_created(self._created)

    def _close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
