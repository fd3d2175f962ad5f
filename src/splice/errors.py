"""Errors a user can cause. The CLI prints them as one line (traceback under --verbose).

Library code does not name command-line flags: where a message tells the user
which option to change, it writes ``option("force")`` (or ``option("drop", 8)``).
``str(error)`` renders that in the Python API's words (``force=True``,
``drop=8``); the CLI renders it as the flag (``--force``, ``--drop 8``) when the
command has that flag, and in the API's words otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Container, Mapping
from typing import Any

_MARK = "\x1f"  # unit separator: cannot appear in a user's file names or recipe keys
_OPTION_RE = re.compile(f"{_MARK}([A-Za-z_][A-Za-z0-9_]*){_MARK}([^{_MARK}]*){_MARK}")


def option(name: str, value: Any = None) -> str:
    """A reference to the library option ``name`` (optionally with a value) inside an error message."""
    shown = "" if value is None else str(value)
    return f"{_MARK}{name}{_MARK}{shown}{_MARK}"


def referenced_options(message: str) -> list[str]:
    """The names of the options an unrendered message refers to, in order."""
    return [m.group(1) for m in _OPTION_RE.finditer(message)]


def render_options(message: str, cli_flags: Container[str] | None = None) -> str:
    """Replace option references: as ``--flag value`` for names in ``cli_flags``, else ``name=value``.

    A mapping ``cli_flags`` gives each option's flag (``{"domains": "--domain"}``); any other
    container spells the flag from the name (``allow_pickle`` -> ``--allow-pickle``).
    """

    def sub(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        if cli_flags is not None and name in cli_flags:
            flag = cli_flags[name] if isinstance(cli_flags, Mapping) else "--" + name.replace("_", "-")
            return f"{flag} {value}" if value else flag
        return f"{name}={value or 'True'}"

    return _OPTION_RE.sub(sub, message)


class SpliceError(Exception):
    """A problem with the user's input: a recipe, a model folder, an output path.

    The message must say what is wrong and where (file, tensor, key) in one line.
    """

    def __str__(self) -> str:
        return render_options(super().__str__())

    def cli_message(self, cli_flags: Container[str]) -> str:
        """The message for the command line: option references become the command's flags."""
        return render_options(super().__str__(), cli_flags)


class RecipeError(SpliceError):
    pass


class CheckpointError(SpliceError):
    pass


class MergeError(SpliceError):
    pass
