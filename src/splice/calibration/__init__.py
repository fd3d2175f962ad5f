"""Calibration statistics for data-aware merges: measured once per model (``collect.calibrate``), stored as
a safetensors file (``stats``), read by the engine for the methods that take them (``regmean``).

    splice.calibrate("models/code", "code/train.jsonl", "code.stats.safetensors", tokens=16384, seed=0)

The names below load their module on first use, so the CLI's parser (which reads the
defaults in ``text``) stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "calibrate": "collect",
    "DEFAULT_TOKENS": "text",
    "DEFAULT_SEQ_LEN": "text",
    "DEFAULT_BATCH_SIZE": "text",
    "FORMAT": "stats",
    "Statistics": "stats",
    "model_fingerprint": "stats",
    "open_statistics": "stats",
    "save_statistics": "stats",
    "read_documents": "text",
    "sample_windows": "text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
