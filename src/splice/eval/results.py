"""Writing evaluation results: a file is replaced only with ``force``, and only once it is complete.

Each file is written to a hidden temporary file beside it and renamed over it at the
end, so a crash or Ctrl-C leaves the old results (or nothing), never half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import options
from ..checkpoint.atomic import write_atomic, write_text_atomic
from ..errors import SpliceError, option

__all__ = ["check_results_file", "write_atomic", "write_json", "write_text_atomic"]


def check_results_file(path: str | os.PathLike, force: bool = False, *, name: str = "path") -> Path:
    """Refuse a results path that is a folder, lies inside a file, or exists (unless ``force``).

    Args:
        path: where the results will go.
        force: allow replacing an existing file.
        name: the option ``path`` came from, for the error.
    Returns:
        The path.
    """
    p = options.output_file(path, name)
    if p.exists() and not force:
        raise SpliceError(f"results file {p} exists; pass {option('force')} to replace it")
    return p


def write_json(res: dict, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write results as indented JSON; an existing file is replaced only with ``force``.

    Args:
        res: JSON-ready results (what ``evaluate`` returns).
        path: the file.
        force: allow replacing an existing file.
    Returns:
        The path.
    """
    p = check_results_file(path, force)
    return write_text_atomic(p, json.dumps(res, indent=2) + "\n")
