"""Write a model folder atomically: sharded safetensors laid out up front, filled in any order.

The writer is told every output tensor (name, dtype, shape) before the first
one is computed, so each shard's header is final from the start and each tensor
is written straight to its offset (``os.pwrite``) by whichever thread computed
it. Everything goes to a temporary folder beside the target, renamed into place
only when complete; an error or Ctrl-C removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, option
from .safetensors_io import dtype_size, plan_layout, tensor_bytes

DEFAULT_SHARD_SIZE = 5 * 1000**3


def parse_size(value: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    if isinstance(value, int):
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
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            num = s[: -len(u)]
            try:
                n = int(float(num) * units[u])
            except ValueError:
                break
            if n <= 0:
                break
            return n
    try:
        n = int(s)
        if n > 0:
            return n
    except ValueError:
        pass
    raise CheckpointError(f"invalid size {value!r} (examples: 5GB, 500MB, 2GiB, 1000000)")


def check_output(out: Path, force: bool) -> None:
    """Refuse an existing non-empty output unless ``force``."""
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"output {out} exists and is not a folder")
        if any(out.iterdir()) and not force:
            raise CheckpointError(f"output {out} exists and is not empty; pass {option('force')} to overwrite it")


class CheckpointWriter:
    """Use as a context manager; call ``layout`` once, ``write`` per tensor, then ``commit``."""

    def __init__(self, out: str | os.PathLike, *, force: bool = False, shard_size: int | str = DEFAULT_SHARD_SIZE):
        self.out = Path(out).resolve()
        self.force = force
        self.shard_size = parse_size(shard_size)
        check_output(self.out, force)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.splice-tmp-", dir=self.out.parent))
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (fd index, offset, nbytes)
        self._fds: list[int] = []
        self._files: list[str] = []
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self._weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._done = False

    # -- tensors
    def layout(self, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for e in entries:
            n = dtype_size(e[1])
            for s in e[2]:
                n *= s
            if shards[-1] and size + n > self.shard_size:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += n
            self.total_bytes += n
        count = len(shards)
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            prefix, offsets = plan_layout(shard, {"format": "pt"})
            path = self.tmp / fname
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            end = len(prefix)
            for name, dt, shape in shard:
                n = dtype_size(dt)
                for s in shape:
                    n *= s
                self._where[name] = (len(self._fds), offsets[name], n)
                self._weight_map[name] = fname
                end = max(end, offsets[name] + n)
            os.pwrite(fd, prefix, 0)
            os.ftruncate(fd, end)
            self._fds.append(fd)
            self._files.append(fname)
        self._expected = {name: (dt, tuple(shape)) for name, dt, shape in entries}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dt, shape = self._expected[name]
        if tensor.dtype != dt or tuple(tensor.shape) != shape:
            raise CheckpointError(f"internal: tensor {name} is {tensor.dtype}{tuple(tensor.shape)}, planned {dt}{shape}")
        fdi, off, n = self._where[name]
        buf = tensor_bytes(tensor)
        if len(buf) != n:
            raise CheckpointError(f"internal: tensor {name} has {len(buf)} bytes, planned {n}")
        pos = 0
        while pos < n:
            pos += os.pwrite(self._fds[fdi], buf[pos:], off + pos)
        with self._lock:
            self._written.add(name)

    # -- other files
    def write_json(self, name: str, data: Any) -> None:
        with open(self.tmp / name, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")

    def write_text(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text, encoding="utf-8")

    def copy_file(self, src: Path, name: str | None = None) -> None:
        shutil.copyfile(src, self.tmp / (name or src.name))

    def file_hashes(self) -> dict[str, str]:
        """SHA-256 of each weight file (call after all tensors are written)."""
        out = {}
        for fname in self._files:
            h = hashlib.sha256()
            with open(self.tmp / fname, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            out[fname] = h.hexdigest()
        return out

    def finish_tensors(self) -> None:
        missing = set(self._expected) - self._written
        if missing:
            raise CheckpointError(f"internal: {len(missing)} planned tensors were never written, e.g. {sorted(missing)[0]}")
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        if len(self._files) > 1:
            self.write_json(
                "model.safetensors.index.json",
                {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self._weight_map.items()))},
            )

    def commit(self) -> Path:
        if self._fds:
            self.finish_tensors()
        if self.out.exists():
            check_output(self.out, self.force)
            old = self.out.parent / f".{self.out.name}.splice-old-{os.getpid()}"
            os.rename(self.out, old)
            os.rename(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out)
        self._done = True
        return self.out

    def abort(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()
