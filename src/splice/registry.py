"""One registry idiom for every extensible thing: merge methods, skip strategies, gate
initialisers, MoE families, search optimisers.

A ``Registry`` maps the name a user writes (in a recipe, on the command line) to an
entry. Every registry looks names up the same way and fails the same way: an
``UnknownName`` error (a ``SpliceError``, so the CLI prints it as one line) that
lists the valid names and suggests the closest one::

    STRATEGIES = Registry("skip strategy")
    STRATEGIES.add("balanced", entry)
    STRATEGIES.get("balancd")   # UnknownName: unknown skip strategy 'balancd' (valid: ...); did you mean 'balanced'?

This module imports nothing heavy (no torch), so a registry of lightweight entries
(names, summaries) can be read by ``splice --help``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import SpliceError

T = TypeVar("T")


class UnknownName(SpliceError, KeyError):
    """A name that no entry of a registry has. Also a ``KeyError`` for mapping-style callers."""

    def __init__(self, message: str, name: object = None, suggestion: str | None = None):
        super().__init__(message)
        self.name = name
        self.suggestion = suggestion

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def did_you_mean(name: object, choices: list[str] | tuple[str, ...]) -> str | None:
    """The closest of ``choices`` to ``name`` (case-insensitive), or None when none is close."""
    if not isinstance(name, str) or not choices:
        return None
    lowered = {c.lower(): c for c in choices}
    if name.lower() in lowered:
        return lowered[name.lower()]
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None


def unknown_choice(what: str, name: object, choices: list[str] | tuple[str, ...]) -> tuple[str, str | None]:
    """``unknown <what> (valid: a, b, c); did you mean 'b'?`` (the suggestion only when one is close).

    Args:
        what: the thing and its place, e.g. ``"skip strategy 'balancd'"`` or ``"key 'dype' in the recipe"``.
        name: the name the user wrote.
        choices: the valid names.

    Returns:
        The message (without file and line) and the suggestion (or None).
    """
    hint = did_you_mean(name, choices)
    msg = f"unknown {what} (valid: {', '.join(choices) or 'none'})"
    if hint is not None:
        msg += f"; did you mean {hint!r}?"
    return msg, hint


def unknown_name_message(what: str, name: object, choices: list[str] | tuple[str, ...]) -> tuple[str, str | None]:
    """``unknown <what> 'x' (valid: ...); did you mean 'y'?`` and the suggestion."""
    return unknown_choice(f"{what} {name!r}", name, choices)


class Registry(Generic[T]):
    """Entries keyed by name (plus aliases), looked up with one error and a suggestion.

    ``what`` names the kind of thing in messages ("merge method", "skip strategy").
    ``loader``, if given, is called once before the first lookup: it imports the
    modules whose decorators fill the registry (lazy discovery keeps imports cheap).
    ``error``, a subclass of ``UnknownName``, lets an operation's registry fail with an
    error that is also that operation's own (``class UnknownStrategy(UnknownName, SkipError)``).
    """

    def __init__(self, what: str, *, loader: Callable[[], None] | None = None, error: type[UnknownName] = UnknownName):
        self.what = what
        self._error = error
        self._entries: dict[str, T] = {}
        self._canonical: dict[str, str] = {}  # alias or name -> name
        self._loader = loader
        self._loaded = loader is None

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # set first: the loader's imports call add()
            assert self._loader is not None
            self._loader()

    def add(self, name: str, entry: T, *, aliases: tuple[str, ...] = ()) -> T:
        for key in (name, *aliases):
            if key in self._canonical:
                raise ValueError(f"{self.what} {key!r} registered twice")
            self._canonical[key] = name
        self._entries[name] = entry
        return entry

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator form of ``add``: ``@REGISTRY.register("name")``."""

        def deco(entry: T) -> T:
            self.add(name, entry, aliases=aliases)
            return entry

        return deco

    def get(self, name: str) -> T:
        self._load()
        key = self._canonical.get(name) if isinstance(name, str) else None
        if key is None:
            msg, hint = unknown_name_message(self.what, name, self.names())
            raise self._error(msg, name, hint)
        return self._entries[key]

    def names(self) -> list[str]:
        """Canonical names, in registration order (aliases left out)."""
        self._load()
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._entries.items())

    def values(self) -> list[T]:
        self._load()
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._canonical

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {self.names() if self._loaded else '...'})"
