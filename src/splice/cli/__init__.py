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
from . import merge, moe, skip, zoo

COMMANDS = (
    merge.add_merge,
    merge.add_plan,
    merge.add_methods,
    moe.add_moe,
    moe.add_moe_compress,
    skip.add_skip,
    skip.add_generate,
    zoo.add_zoo,
    zoo.add_eval,
    zoo.add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splice", description="Compose new language models out of existing checkpoints.")
    parser.add_argument("--version", action="version", version=f"splice {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        print(f"splice: error: {e.cli_message(vars(args))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("splice: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
