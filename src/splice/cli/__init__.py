"""The command line: a skin over the library. Each command group has one module here; the
list below is every command, in the order ``splice --help`` shows them.

Building the parser imports nothing heavy (no torch, transformers or numba), so
``splice --help`` is instant; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from . import calibrate, convert, merge, moe, search, skip, zoo
from .common import Parser, command_flags

COMMANDS = (
    merge.add_merge,
    merge.add_plan,
    merge.add_methods,
    convert.add_convert,
    calibrate.add_calibrate,
    moe.add_moe,
    moe.add_moe_compress,
    skip.add_skip,
    skip.add_generate,
    zoo.add_zoo,
    zoo.add_eval,
    search.add_search,
    zoo.add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="splice", description="Compose new language models out of existing checkpoints.")
    parser.add_argument("--version", action="version", version=f"splice {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


# What a command that has no flag for a library option says where the library's message
# advises that option ("pass allow_pickle=True"): {prog} is the command, e.g. "splice eval".
WITHOUT_FLAG = {
    "allow_pickle": "{prog} reads .safetensors weights only (convert the .bin/.pt files to .safetensors first)",
}
WITHOUT_FLAG_DEFAULT = "{prog} has no flag for {name} (an option of the Python API)"


def error_line(err: Exception, parser: argparse.ArgumentParser | None) -> str:
    """A library error as the command line says it: option references become this command's
    flags; advice to use an option the command lacks becomes what the command can do instead.

    The message's clauses (split at "; ") are rendered one by one: a clause that advises a
    missing option is replaced by the note for it, or, if it is the first clause (the
    diagnosis itself), kept in the Python API's words with the note after it.
    """
    from ..errors import referenced_options, render_options

    flags = command_flags(parser) if parser is not None else {}
    prog = parser.prog if parser is not None else "splice"
    clauses = []
    for i, clause in enumerate(Exception.__str__(err).split("; ")):
        lacking = [n for n in referenced_options(clause) if n not in flags]
        notes = [WITHOUT_FLAG.get(n, WITHOUT_FLAG_DEFAULT).format(prog=prog, name=n) for n in dict.fromkeys(lacking)]
        if not notes or i == 0:
            clauses.append(render_options(clause, flags))
        clauses += notes
    return "; ".join(clauses)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help and --version (0), or a bad command line (2, one line printed)
        return e.code if isinstance(e.code, int) else 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from ..errors import SpliceError
    from ..signals import terminate_as_interrupt

    try:
        with terminate_as_interrupt():
            return int(args.func(args) or 0)
    except SpliceError as e:
        if getattr(args, "verbose", False):
            raise
        print(f"splice: error: {error_line(e, getattr(args, 'command_parser', None))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("splice: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
