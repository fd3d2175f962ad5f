"""Minimal safetensors file access: header parsing, zero-copy mmap reads, positional writes.

We parse the format ourselves (8-byte little-endian header length, JSON header,
raw little-endian data) so that a read is a view into a memory map (no copy until
the engine converts dtype) and a write can go to its final offset from any
thread, in any order.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``dtype`` and ``shape`` as stored."""
    return dtype_size(dtype) * math.prod(shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header. Raises CheckpointError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupted or truncated safetensors header")
            header = json.loads(f.read(n))
    except RecursionError:
        raise CheckpointError(f"{path}: corrupted safetensors header (nested too deeply)") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: corrupted safetensors header (__metadata__ is not an object of strings)")
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, h in header.items():
        dt, shape, start, end = _header_entry(path, name, h)
        if end - start != tensor_nbytes(dt, shape):
            raise CheckpointError(f"{path}: tensor {_brief(name, 120)} has inconsistent size in header")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated file: tensor {_brief(name, 120)} ends at byte {base + end} but the file has {size}")
        infos[name] = TensorInfo(name, dt, shape, path, base + start, base + end)
    return infos, dict(meta)


def _brief(x: Any, limit: int = 60) -> str:
    """``repr(x)`` cut to ``limit`` characters (a corrupt header can hold anything)."""
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _header_entry(path: Path, name: str, h: Any) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, each checked; a one-line error otherwise."""
    if not isinstance(h, dict) or not {"dtype", "shape", "data_offsets"} <= set(h):
        raise CheckpointError(f"{path}: tensor {_brief(name, 120)} has a corrupted header entry (needs dtype, shape and data_offsets)")
    dt = DTYPES.get(h["dtype"]) if isinstance(h["dtype"], str) else None
    if dt is None:
        raise CheckpointError(f"{path}: tensor {_brief(name, 120)} has an unknown dtype {_brief(h['dtype'])} (known: {', '.join(DTYPES)})")
    shape, offsets = h["shape"], h["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise CheckpointError(f"{path}: tensor {_brief(name, 120)} has an invalid shape {_brief(shape)} (dimensions must be integers >= 0)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]:
        raise CheckpointError(f"{path}: tensor {_brief(name, 120)} has invalid data_offsets {_brief(offsets)} (two integers, start <= end)")
    return dt, tuple(shape), offsets[0], offsets[1]


class TensorFile:
    """Reads tensors of one file with positional reads into buffers the tensor owns.

    Unlike a memory map, a tensor read this way leaves the process's memory as
    soon as it is dropped, so peak RSS is the tensors in flight, not the inputs.
    Thread-safe: ``os.preadv`` has no shared file position.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        out = torch.empty(info.shape, dtype=info.dtype)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        pos = 0
        while pos < info.nbytes:
            n = os.preadv(self._fd, [buf[pos:]], info.start + pos)
            if n <= 0:
                raise CheckpointError(f"{self.path}: unexpected end of file reading tensor {info.name!r}")
            pos += n
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def plan_layout(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """Header bytes and each tensor's absolute offset for a file holding ``entries`` in order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offsets: dict[str, int] = {}
    pos = 0
    for name, dt, shape in entries:
        nbytes = tensor_nbytes(dt, shape)
        header[name] = {"dtype": DTYPE_NAMES[dt], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[name] = pos
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    return prefix, {k: v + len(prefix) for k, v in offsets.items()}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a contiguous CPU tensor, without a copy where possible."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
