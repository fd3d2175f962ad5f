"""The statistics cache: a calibration measured once is reused by every later merge or search.

A cached statistics file is named by a hash of everything its numbers depend on
(``cache_key``): the model's fingerprint, the calibration text's sha256, the token budget,
the seed, the window length and batch size, and what was collected (Grams and token
counts, plus the Fisher with ``fisher``). The same request therefore finds the same file,
and any change (another text, budget, seed, a retrained model) misses and measures anew.

The folder is ``CACHE_SUBDIR`` under splice's cache (``$SPLICE_CACHE``, else
``$XDG_CACHE_HOME/splice``, else ``~/.cache/splice``), the same root the zoo and GGUF
tokenizers use. Files are written atomically (``save_statistics``), so two merges calibrating the
same model at once both end with a whole file, and a crash leaves none.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import CheckpointError
from .stats import FORMAT, open_statistics

CACHE_SUBDIR = "stats"


def cache_dir() -> Path:
    """The statistics cache folder (``$SPLICE_CACHE/stats``, by default ``~/.cache/splice/stats``)."""
    from ..checkpoint.gguf import cache_root

    return cache_root() / CACHE_SUBDIR


def cache_key(fingerprint: str, text_sha256: str, *, tokens: int, seed: int, seq_len: int, batch_size: int, fisher: bool) -> dict:
    """What a statistics file's numbers depend on, as the metadata a cached file carries (strings)."""
    return {
        "cache_format": FORMAT,
        "model_fingerprint": fingerprint,
        "text_sha256": text_sha256,
        "tokens_asked": str(tokens),
        "seed": str(seed),
        "seq_len_asked": str(seq_len),
        # Fisher runs one window per forward; without it the batch only changes the order of float64 sums
        "batch_size": str(1 if fisher else batch_size),
        "collected": "grams,tokens,fisher" if fisher else "grams,tokens",
    }


def cache_path(key: dict, folder: Path | None = None) -> Path:
    """The file a key names: the sha256 of the key, in ``folder`` (default ``cache_dir()``)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return (folder or cache_dir()) / f"{digest}.safetensors"


def cached(key: dict, folder: Path | None = None) -> Path | None:
    """The cached file for ``key`` if there is a whole one whose metadata carries ``key``; else None."""
    p = cache_path(key, folder)
    if not p.is_file():
        return None
    try:
        st = open_statistics(p)
    except CheckpointError:  # a damaged file is measured again (and replaced)
        return None
    return p if all(st.meta.get(k) == v for k, v in key.items()) else None
