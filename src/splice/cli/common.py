"""Flags every command shares, in one place. Imports nothing heavy: ``splice --help`` stays fast."""

from __future__ import annotations

import argparse


def add_common(p: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` and ``-v/--verbose``, on every command."""
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")


def add_output(p: argparse.ArgumentParser, *, required: bool = True, what: str = "output folder") -> None:
    """``-o/--out`` and ``--force``, for commands that write a model."""
    p.add_argument("-o", "--out", required=required, help=what)
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
