"""What every command shares, in one place: the parser class, the shared flags (each with its
one help text, default and validation) and the argparse ``type=`` wrapper over
:mod:`splice.options`. Imports nothing heavy: ``splice --help`` stays fast.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Callable
from typing import Any

from .. import options

_ARGUMENT_ERROR = re.compile(r"^argument ([^:]+): (.*)$", re.S)


class Parser(argparse.ArgumentParser):
    """argparse with the project's error rule: one line ``splice: error: ...``, exit status 2.

    argparse's own errors (a missing argument, a bad choice, a value its ``type=`` refused)
    would print a usage block first; here they print only the line, naming the flag.
    Subparsers are made from the parent's class, so this covers every command.
    """

    def error(self, message: str):
        m = _ARGUMENT_ERROR.match(message)
        if m:  # "argument -o/--out: expected one argument" -> "--out expected one argument"
            message = f"{m.group(1).split('/')[-1]} {m.group(2)}"
        self.exit(2, f"splice: error: {message.replace(chr(10), ' ')}\n")


def checked(check: Callable[..., Any], **bounds: Any) -> Callable[[str], Any]:
    """An argparse ``type=`` that runs a :mod:`splice.options` validator on the flag's text.

    Args:
        check: the validator (``options.positive_int``, ``options.size``, ...).
        bounds: passed on to it (``minimum=2``).
    Returns:
        A function of the text that returns the validated value; a refused value becomes
        argparse's error, printed by :class:`Parser` as ``--flag VALUE: problem``.
    """

    def parse(text: str) -> Any:
        try:
            return check(text, "value", **bounds)
        except options.OptionError as e:
            raise argparse.ArgumentTypeError(f"{shlex.quote(text)}: {e.problem}") from None

    parse.__name__ = check.__name__  # argparse names the type in some of its messages
    return parse


def named(check: Callable[..., Any] | None = None, *, value: str = "FILE") -> Callable[[str], tuple[str, Any]]:
    """An argparse ``type=`` for ``NAME=VALUE`` (``--domain news=news.txt``): a ``(name, value)`` pair.

    Args:
        check: a :mod:`splice.options` validator for the value, or None to take it as given.
        value: what the value is, for the error (``NAME=FILE``).
    """
    check_value = checked(check) if check else str

    def parse(text: str) -> tuple[str, Any]:
        name, sep, right = text.partition("=")
        if not sep or not name or not right:
            raise argparse.ArgumentTypeError(f"{shlex.quote(text)}: expected NAME={value}")
        return name, check_value(right)

    return parse


POSITIVE_INT = checked(options.positive_int)
NON_NEGATIVE_INT = checked(options.non_negative_int)
POSITIVE_REAL = checked(options.positive_real)
SEQ_LEN = checked(options.integer, minimum=2)  # a window predicts its tokens after the first: 2 at least
TEXT_FILE = checked(options.text_file)


def command_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option of a command (by its library name, the argparse ``dest``) -> its long flag."""
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}


def add_common(p: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` and ``-v/--verbose``, on every command (call it last: it records the parser,
    so an error can name this command's flags)."""
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    p.set_defaults(command_parser=p)


def add_output(p: argparse.ArgumentParser, *, required: bool = True, what: str = "output folder", default: str | None = None) -> None:
    """``-o/--out DIR`` (a folder path, not a file) and ``--force``, for commands that write a folder."""
    shown = f" (default {default})" if default else ""
    p.add_argument("-o", "--out", required=required, default=default, type=checked(options.output_folder), help=what + shown)
    add_force(p)


def add_gguf(p: argparse.ArgumentParser, *, required: bool = False, what: str = "also write the model as this GGUF file") -> None:
    """``--gguf FILE`` and ``--gguf-type``: a GGUF (llama.cpp) file of the model (``--force`` replaces one)."""
    p.add_argument("--gguf", required=required, default=None, metavar="FILE.gguf", type=checked(options.output_file), help=what)
    p.add_argument(
        "--gguf-type",
        choices=options.GGUF_TYPES,
        default="f16",
        help="what the GGUF stores 2-D tensors as (1-D ones stay f32, as llama.cpp keeps them; default f16)",
    )


def add_force(p: argparse.ArgumentParser) -> None:
    """``--force``: the one way to let a command replace what is already there."""
    p.add_argument("--force", action="store_true", help="replace existing output (refused otherwise)")


def add_seed(p: argparse.ArgumentParser) -> None:
    """``--seed N``: everything random in the command; the same seed gives the same bytes."""
    p.add_argument(
        "--seed",
        type=checked(options.seed),
        default=0,
        metavar="N",
        help="seed for everything random; the same seed gives the same output (default 0)",
    )


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch intra-op threads."""
    p.add_argument(
        "--threads", type=POSITIVE_INT, default=None, metavar="N", help="torch threads per operation (default: set from the cores)"
    )


def add_workers(p: argparse.ArgumentParser) -> None:
    """``--workers N``: tensors processed at once."""
    p.add_argument("--workers", type=POSITIVE_INT, default=None, metavar="N", help="tensors processed at once (default: cores, at least 2)")


def add_device(p: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda|cuda:N``."""
    p.add_argument("--device", type=checked(options.device), default="cpu", help="where to compute: cpu (default), cuda, cuda:1, ...")


def add_shard_size(p: argparse.ArgumentParser) -> None:
    """``--shard-size SIZE``: the largest output shard."""
    p.add_argument(
        "--shard-size",
        type=checked(options.size),
        default="5GB",
        metavar="SIZE",
        help="largest output shard, e.g. 5GB (default), 500MB, 2GiB",
    )


def add_allow_pickle(p: argparse.ArgumentParser) -> None:
    """``--allow-pickle``: read ``.bin``/``.pt`` weights too."""
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt weights (loaded with weights_only=True)")
