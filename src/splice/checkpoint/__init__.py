"""Reading and writing Hugging Face model folders, tensor by tensor.

The names below load their module on first use, so light modules of this package
(``atomic``, used by ``splice.eval.results`` under ``--help``) import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"ModelSource": "reader", "open_model": "reader", "SideFiles": "side_files"}

__all__ = ["ModelSource", "SideFiles", "open_model"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
