"""The one safe reader for every YAML file splice reads (merge and MoE recipes, search specs).

It returns each document's data with a line map (a key path such as
``("models", 0, "model")`` -> its line in the file) for error messages, and
refuses, in one line that names the file and line, what a plain ``yaml.safe_load``
lets through:

- a key given twice in one mapping (YAML would silently keep the last);
- aliases that expand past ``MAX_YAML_NODES`` nodes ("billion laughs": 1.7 KB
  that would take minutes and gigabytes), and recursive aliases;
- nesting deeper than ``MAX_YAML_DEPTH`` levels (a Python RecursionError otherwise);
- a file larger than ``MAX_YAML_BYTES``, one that cannot be read, or is not UTF-8.

A string argument is a file name unless it is YAML text: text holds a newline,
starts a flow mapping or list (``{``, ``[``), or holds a ``key: value``
separator. A file name that does not exist is reported as a missing file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError

# Limits on what a YAML file may ask of the reader. A recipe is a few hundred nodes
# (a per-layer recipe for a 100-layer model a few thousand); these refuse only
# inputs no recipe needs, and keep reading any file under a second.
MAX_YAML_BYTES = 1 << 20  # 1 MiB: ~30,000 lines of recipe; larger is not a recipe (a model file passed by mistake)
MAX_YAML_NODES = 100_000  # nodes after alias expansion, over the whole file; bounds time and memory of every later walk
MAX_YAML_DEPTH = 64  # nesting levels of mappings and lists; a recipe nests about 8, Python's own limit is ~1000 frames

_MERGE_TAG = "tag:yaml.org,2002:merge"  # the '<<' key: merging a mapping is not a duplicate


@dataclass
class YamlDocument:
    """One YAML document: its data, the line of every key path, and where it starts."""

    data: Any
    lines: dict[tuple, int] = field(default_factory=dict)
    index: int = 0  # 0-based position in the file
    line: int = 1  # the line the document's content starts on


@dataclass
class YamlFile:
    """What ``read_yaml`` read: the documents (empty ones left out) and where from."""

    documents: list[YamlDocument]
    file: str  # the path as given, or "<recipe>" for text
    path: Path | None = None  # None for YAML text


def read_yaml(source: str | os.PathLike, *, what: str = "recipe") -> YamlFile:
    """Read a YAML file (or YAML text) safely, every document with its line map.

    Args:
        source: a path, or YAML text (see the module docstring for how a string is told apart).
        what: what the file is, for messages ("recipe", "MoE recipe", "search spec").

    Returns:
        A ``YamlFile``; its ``documents`` leave out empty ones (a trailing ``---``).

    Raises:
        RecipeError: one line naming the file (and line) for a missing, unreadable,
            oversized, non-UTF-8 or invalid file and for each refusal listed above.
    """
    if isinstance(source, str) and _is_yaml_text(source):
        if len(source.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
            raise RecipeError(f"the {what} text is larger than {MAX_YAML_BYTES} bytes; a {what} is a small text file")
        return YamlFile(parse_yaml(source, "<recipe>"), "<recipe>")
    path = Path(source)
    text = _read_text(path, what)
    return YamlFile(parse_yaml(text, str(source)), str(source), path)


def parse_yaml(text: str, file: str = "<recipe>") -> list[YamlDocument]:
    """Parse YAML text into its non-empty documents, with the limits of ``read_yaml``.

    Args:
        text: the YAML text.
        file: the name messages give the text (a path, or "<recipe>").

    Returns:
        The documents in order, each with ``data``, ``lines``, ``index`` and ``line``.
    """
    docs: list[YamlDocument] = []
    loader = None
    try:
        loader = _BoundedLoader(text, file)  # the reader checks every character here
        index = 0
        while loader.check_node():
            node = loader.get_node()
            data = loader.construct_document(node)
            if data is not None:
                docs.append(YamlDocument(data, _line_map(node), index, node.start_mark.line + 1))
            index += 1
    except yaml.YAMLError as e:
        raise RecipeError(_yaml_error(e, file, text)) from None
    finally:
        if loader is not None:
            loader.dispose()
    return docs


# ---------------------------------------------------------------- reading


def _is_yaml_text(s: str) -> bool:
    if "\n" in s or s.lstrip().startswith(("{", "[")):
        return True
    return ": " in s and not os.path.exists(s)


def _read_text(path: Path, what: str) -> str:
    try:
        if path.is_dir():
            raise RecipeError(f"{path} is a folder, not a {what} file")
        if not path.exists():
            raise RecipeError(f"{what} file {str(path)!r} not found: the file does not exist")
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise RecipeError(f"{path}: {size} bytes is too large for a {what} (at most {MAX_YAML_BYTES}); is it the right file?")
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise RecipeError(f"{path}:{line}: the {what} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _yaml_error(e: yaml.YAMLError, file: str, text: str) -> str:
    if isinstance(e, yaml.reader.ReaderError):  # a non-printable character: no mark, an offset
        line = text.count("\n", 0, e.position) + 1
        return f"{file}:{line}: invalid YAML (character U+{e.character:04X} is not allowed in YAML)"
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    detail = " ".join(str(getattr(e, "problem", None) or e).split())
    where = f"{file}:{mark.line + 1}" if mark is not None else file
    return f"{where}: invalid YAML ({detail})"


# ---------------------------------------------------------------- the bounded loader


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts nodes (aliases expanded), depth and duplicate keys."""

    def __init__(self, text: str, file: str):
        super().__init__(text)
        self._file = file
        self._depth = 0
        self._sizes: dict[yaml.Node, int] = {}  # node -> nodes it expands to (aliases included)
        self._total = 0  # expanded nodes of the documents read so far

    def _fail(self, mark: yaml.Mark, msg: str) -> RecipeError:
        return RecipeError(f"{self._file}:{mark.line + 1}: {msg}")

    def compose_document(self):
        self._sizes = {}
        node = super().compose_document()
        if node is not None:
            self._total += self._sizes[node]
            if self._total > MAX_YAML_NODES:
                raise self._fail(node.start_mark, f"the file expands to more than {MAX_YAML_NODES} YAML nodes (MAX_YAML_NODES)")
        return node

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            if node not in self._sizes:
                raise self._fail(mark, "an alias refers to a mapping or list that contains it (a recursive alias)")
            return node
        mark = self.peek_event().start_mark
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise self._fail(mark, f"nested deeper than {MAX_YAML_DEPTH} levels (MAX_YAML_DEPTH); a recipe nests a few")
        node = super().compose_node(parent, index)
        self._depth -= 1
        size = 1 + sum(self._sizes[child] for child in _children(node))
        if size > MAX_YAML_NODES:
            raise self._fail(
                node.start_mark,
                f"aliases expand this value to more than {MAX_YAML_NODES} YAML nodes (MAX_YAML_NODES; a 'billion laughs' file?)",
            )
        self._sizes[node] = size
        return node

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
                continue
            line = key.start_mark.line + 1
            if (key.tag, key.value) in first:
                seen = first[key.tag, key.value]
                lines = f"lines {seen} and {line}" if seen != line else f"both on line {line}"
                raise self._fail(
                    key.start_mark, f"key {key.value!r} is given twice in one mapping ({lines}); YAML would keep only the last"
                )
            first[key.tag, key.value] = line
        return node


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Key path -> line, for the node and everything under it (bounded by the node limit)."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.tag != _MERGE_TAG:
                out[path + (k.value,)] = k.start_mark.line + 1
                _line_map(v, path + (k.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, path + (i,), out)
    return out
