"""Checks for the options a user passes: numbers, sizes, devices and paths, in one place.

Every validator takes ``(value, name)``, returns the value in its working type
(``int``, ``float``, bytes, ``Path``) and raises :class:`OptionError` naming the
option through :func:`splice.errors.option` when the value is unusable. Values
may arrive as Python objects (the library's option objects call these in
``__post_init__``) or as the text of a command-line argument (``cli/common.py``
wraps them as argparse ``type=`` functions), so each accepts both.

Torch-free and cheap to import: the CLI's parser uses it for ``splice --help``.
"""

from __future__ import annotations

import codecs
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import SpliceError, option

T = TypeVar("T")

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # what a written GGUF stores its (2-D) tensors as
SEED_MAX = 2**64 - 1  # torch's generators take seeds in [0, 2**64)
TEXT_CHECK_CHUNK = 1 << 20  # bytes decoded at a time when checking that a file is UTF-8 text

_SIZE_UNITS = {
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "B": 1,
    "": 1,
}
_SIZE_RE = re.compile(r"^([0-9]*\.?[0-9]+(?:E[+-]?[0-9]+)?)([KMGT]I?B?|B|)$")
_DEVICE_RE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")


class OptionError(SpliceError):
    """An option's value is unusable. ``problem`` says why, without the option's name or value."""

    def __init__(self, name: str, value: Any, problem: str):
        self.name, self.value, self.problem = name, value, problem
        super().__init__(f"{option(name, _shown(value))}: {problem}")


def _shown(value: Any) -> str:
    text = str(value)
    return text if text and not any(c.isspace() for c in text) else repr(text)


def optional(check: Callable[..., T], value: Any, name: str, **bounds: Any) -> T | None:
    """``None`` stays ``None`` (the option's "not set"); anything else goes through ``check``.

    Args:
        check: one of the validators below.
        value, name: the value and the option it belongs to.
        bounds: passed on to ``check`` (e.g. ``minimum=2``).
    Returns:
        None, or what ``check`` returns.
    """
    return None if value is None else check(value, name, **bounds)


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _range_words(minimum, maximum, above, below) -> str:
    low = f"at least {_number(minimum)}" if minimum is not None else f"above {_number(above)}" if above is not None else None
    high = f"at most {_number(maximum)}" if maximum is not None else f"below {_number(below)}" if below is not None else None
    return " and ".join(w for w in (low, high) if w)


def integer(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """A whole number in ``[minimum, maximum]`` (either bound may be open).

    Args:
        value: an ``int`` or its decimal text; ``bool`` and floats are refused.
        name: the option's name, for the error.
        minimum, maximum: inclusive bounds, or None.
    Returns:
        The number as ``int``.
    """
    if isinstance(value, str):
        try:
            number = int(value.strip(), 10)
        except ValueError:
            raise OptionError(name, value, "must be a whole number") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise OptionError(name, value, "must be a whole number")
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise OptionError(name, value, f"must be a whole number {_range_words(minimum, maximum, None, None)}")
    return number


def positive_int(value: Any, name: str) -> int:
    """A whole number >= 1 (a count, a length, a number of threads)."""
    return integer(value, name, minimum=1)


def non_negative_int(value: Any, name: str) -> int:
    """A whole number >= 0 (a number of steps where 0 means "none")."""
    return integer(value, name, minimum=0)


def seed(value: Any, name: str = "seed") -> int:
    """A random seed: a whole number in [0, 2**64)."""
    return integer(value, name, minimum=0, maximum=SEED_MAX)


def real(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> float:
    """A finite number in a range: ``minimum``/``maximum`` are inclusive, ``above``/``below`` exclusive.

    Args:
        value: an ``int``, a ``float`` or its text; NaN, infinities and ``bool`` are refused.
        name: the option's name, for the error.
    Returns:
        The number as ``float``.
    """
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise OptionError(name, value, "must be a number") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise OptionError(name, value, "must be a number")
    if not math.isfinite(number):
        raise OptionError(name, value, "must be a finite number")
    if (
        (minimum is not None and number < minimum)
        or (maximum is not None and number > maximum)
        or (above is not None and number <= above)
        or (below is not None and number >= below)
    ):
        raise OptionError(name, value, f"must be a number {_range_words(minimum, maximum, above, below)}")
    return number


def positive_real(value: Any, name: str) -> float:
    """A finite number > 0 (a learning rate, a speed-up)."""
    return real(value, name, above=0)


def size(value: Any, name: str) -> int:
    """A size in bytes: ``5GB``, ``500MB``, ``2GiB``, ``1e9`` or an ``int``; at least one byte.

    Args:
        value: text with an optional unit (KB, MB, GB, TB: powers of 1000; KiB ... TiB: of 1024), or an int.
        name: the option's name, for the error.
    Returns:
        The size in bytes, as ``int``.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise OptionError(name, value, "must be at least 1 byte")
        return value
    bad = OptionError(name, value, "must be a size such as 5GB, 500MB or 2GiB")
    if not isinstance(value, str):
        raise bad
    m = _SIZE_RE.match(value.strip().upper().replace(" ", ""))
    if not m:
        raise bad
    unit = m.group(2) if m.group(2).endswith("B") or not m.group(2) else m.group(2) + "B"  # 5G is 5GB
    number = float(m.group(1)) * _SIZE_UNITS[unit]
    if not math.isfinite(number) or number < 1:
        raise OptionError(name, value, "must be a size of at least 1 byte, such as 5GB or 500MB")
    return int(number)


def device(value: Any, name: str = "device") -> str:
    """Where to compute: ``cpu``, ``cuda`` or ``cuda:N`` (whether CUDA is present is checked where torch is)."""
    if not isinstance(value, str) or not _DEVICE_RE.match(value.strip()):
        raise OptionError(name, value, "must be cpu, cuda or cuda:N")
    return value.strip()


def _path(value: Any, name: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise OptionError(name, value, "must be a path")
    return Path(os.path.expanduser(str(value)))


def _unreadable(name: str, value: Any, e: OSError) -> OptionError:
    return OptionError(name, value, f"cannot be read ({e.strerror or e})")


def text_file(value: Any, name: str) -> Path:
    """An existing, readable file of UTF-8 text (a prompt, a calibration text).

    Returns:
        The path.
    """
    path = _path(value, name)
    try:
        if not path.exists():
            raise OptionError(name, value, "file not found")
        if not path.is_file():
            raise OptionError(name, value, "is not a file")
        _check_utf8(path, name, value)
    except OSError as e:
        raise _unreadable(name, value, e) from None
    return path


def _check_utf8(path: Path, name: str, value: Any) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(TEXT_CHECK_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise OptionError(name, value, f"is not UTF-8 text (byte {offset + e.start})") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise OptionError(name, value, "is not UTF-8 text (it ends inside a character)") from None


def existing_folder(value: Any, name: str) -> Path:
    """An existing folder whose entries can be listed (a zoo, a model folder).

    Returns:
        The path.
    """
    path = _path(value, name)
    try:
        if not path.exists():
            raise OptionError(name, value, "folder not found")
        if not path.is_dir():
            raise OptionError(name, value, "is not a folder")
        next(path.iterdir(), None)
    except OSError as e:
        raise _unreadable(name, value, e) from None
    return path


def _check_parents(path: Path, name: str, value: Any) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OptionError(name, value, f"cannot be created: {parent} is a file")
            return


def output_file(value: Any, name: str) -> Path:
    """A path a file will be written to: not an existing folder, not inside a file.

    Whether an existing file may be replaced is the writer's decision (``force``).

    Returns:
        The path.
    """
    path = _path(value, name)
    try:
        if str(value).endswith(("/", os.sep)) or path.is_dir():
            raise OptionError(name, value, "is a folder; give a file name")
        _check_parents(path, name, value)
    except OSError as e:
        raise _unreadable(name, value, e) from None
    return path


def output_folder(value: Any, name: str) -> Path:
    """A path a folder will be written to: not an existing file, not inside a file.

    Whether an existing folder may be reused is the writer's decision (``force``).

    Returns:
        The path.
    """
    if isinstance(value, (str, os.PathLike)) and not str(value).strip():
        raise OptionError(name, value, "the output path is empty; name the folder to write to")
    path = _path(value, name)
    try:
        if path.exists() and not path.is_dir():
            raise OptionError(name, value, "is a file, not a folder")
        _check_parents(path, name, value)
    except OSError as e:
        raise _unreadable(name, value, e) from None
    return path
