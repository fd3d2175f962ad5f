"""Writing evaluation results: a file is replaced only with ``force``, and only once it is complete.

Each file is written to a hidden temporary file beside it and renamed over it at the
end, so a crash or Ctrl-C leaves the old results (or nothing), never half a file.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .. import options
from ..errors import SpliceError, option


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


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Create ``path`` by calling ``write`` on a temporary file beside it, then renaming it into place.

    The file gets the user's umask like any other new file; on any error (or Ctrl-C)
    the temporary file is removed and an existing ``path`` is left as it was.

    Args:
        path: the file to create or replace; its folder is created if missing.
        write: fills the open binary file.
    Returns:
        The path.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.splice-tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``write_atomic`` for UTF-8 text."""
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


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
