"""``SkipError`` and the checks of numeric parameters that raise it. Torch-free.

Messages name parameters through ``splice.errors.option``, so a Python caller reads
``seq_len=0: must be at least 2`` and the command line ``--seq-len 0: must be at least 2``.
"""

from __future__ import annotations

import math

from ..errors import SpliceError, option


class SkipError(SpliceError):
    """A bad request to ``splice skip`` / ``splice generate`` (one line: what and where)."""


def check_int(name: str, value: object, low: int) -> int:
    """``value`` as an int of at least ``low``; else a ``SkipError`` naming parameter ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SkipError(f"{option(name, value)}: must be a whole number")
    if value < low:
        raise SkipError(f"{option(name, value)}: must be at least {low}")
    return value


def check_float(name: str, value: object, low: float, high: float = math.inf, *, low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``); else a ``SkipError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SkipError(f"{option(name, value)}: must be a finite number")
    if value < low or (low_open and value == low) or value > high:
        if high < math.inf:
            rule = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        else:
            rule = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise SkipError(f"{option(name, value)}: must be {rule}")
    return float(value)
