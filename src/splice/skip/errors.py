"""``SkipError`` and the checks of numeric parameters that raise it. Torch-free.

The checks are splice.options' (the CLI's too), and messages name parameters through
``splice.errors.option``, so a Python caller reads ``seq_len=0: must be a whole number at
least 2`` and the command line ``--seq-len 0: ...``.
"""

from __future__ import annotations

import math

from .. import options
from ..errors import SpliceError


class SkipError(SpliceError):
    """A bad request to ``splice skip`` / ``splice generate`` (one line: what and where)."""


def check_int(name: str, value: object, low: int) -> int:
    """``value`` as an int of at least ``low``; else a ``SkipError`` naming parameter ``name`` (splice.options' check)."""
    try:
        return options.integer(value, name, minimum=low)
    except options.OptionError as e:
        raise SkipError(e.args[0]) from None


def check_float(name: str, value: object, low: float, high: float = math.inf, *, low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``); else a ``SkipError``."""
    bounds = {"above": low} if low_open else {"minimum": low}
    if high < math.inf:
        bounds["maximum"] = high
    try:
        return options.real(value, name, **bounds)
    except options.OptionError as e:
        raise SkipError(e.args[0]) from None
