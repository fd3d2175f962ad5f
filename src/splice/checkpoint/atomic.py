"""Writing a file so that readers see the old file or the whole new one, never half of it.

The file is written to a hidden temporary file beside it and renamed over it at the end
(the rename is atomic within one file system), so a crash or Ctrl-C leaves the old file,
or nothing. Results, statistics files, caches and study files all write this way.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


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
