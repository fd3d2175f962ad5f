"""Everything a model folder holds beside its weights, written by one helper for every operation:
``config.json``, the tokenizer files, ``chat_template.jinja``, ``generation_config.json`` and the
model card (``README.md``) with the recipe beside it (``mergekit_config.yml``).

``check_side_files`` runs before any tensor is computed, so a missing config or a tokenizer
file that is a symlink out of its model folder fails before work; ``write_side_files`` writes
them into the staging folder after the weights (the card lists the weights' SHA-256).
``config.json`` and ``tokenizer_config.json`` are written in the form transformers 4.x and 5.x
both read (``splice.checkpoint.compat``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .compat import config_for_both, tokenizer_config_for_both
from .reader import TOKENIZER_FILES
from .writer import StagedFolder


@dataclass
class SideFiles:
    """What goes beside the weights.

    Attributes:
        config: the ``config.json`` to write (must not be empty).
        model: the model the config comes from, named in errors.
        tokenizer_dir: folder whose tokenizer files are copied (None: no tokenizer).
        added_tokens: (content, special) appended to the copied ``tokenizer.json`` in order
            (a ``tokenizer_source: union`` vocabulary).
        chat_template: Jinja template written to ``chat_template.jinja`` (and removed from
            ``tokenizer_config.json``, so there is one template).
        generation_config: the ``generation_config.json`` to write, if any.
        card: ``(weight-file SHA-256 by name, tokenizer files written) -> README.md text``.
        recipe_file: ``(file name, text)`` of the recipe written beside the card (a merge's
            ``mergekit_config.yml``, a MoE's ``mergekit_moe_config.yml``, as mergekit names them).
    """

    config: dict
    model: str
    tokenizer_dir: Path | None = None
    added_tokens: Sequence[tuple[str, bool]] = ()
    chat_template: str | None = None
    generation_config: dict | None = None
    card: Callable[[dict[str, str], list[str]], str] | None = None
    recipe_file: tuple[str, str] | None = None


def _model_root(folder: Path) -> Path:
    """The folder a model's files must resolve inside: the folder itself, or for a Hugging Face
    cache snapshot (whose files link to ``../../blobs``) the cached repository's folder."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def tokenizer_files(side: SideFiles) -> list[str]:
    """Names of the tokenizer files ``side`` copies; each checked to resolve inside its model folder."""
    if side.tokenizer_dir is None:
        return []
    folder = Path(side.tokenizer_dir)
    root = _model_root(folder.resolve())
    names = []
    for name in TOKENIZER_FILES:
        p = folder / name
        if not p.is_file():
            continue
        real = p.resolve()
        if root != real and root not in real.parents:
            raise CheckpointError(f"{p}: a symlink to {real}, outside its model folder; refusing to copy it into the output")
        names.append(name)
    return names


def check_side_files(side: SideFiles) -> None:
    """Fail before any work on what ``write_side_files`` would refuse."""
    if not isinstance(side.config, dict) or not side.config:
        raise CheckpointError(f"model {side.model}: no config.json (the output's config.json is made from it)")
    names = tokenizer_files(side)
    if side.added_tokens and "tokenizer.json" not in names:
        raise CheckpointError(f"model {side.model}: tokenizer_source union needs a tokenizer.json")


def write_side_files(folder: StagedFolder, side: SideFiles) -> list[str]:
    """Write ``side`` into the staging folder (after the weights). Returns the tokenizer files written."""
    from ..tokenizer import add_tokens

    check_side_files(side)
    folder.write_json("config.json", config_for_both(side.config))
    names = tokenizer_files(side)
    for name in names:
        folder.copy_file(Path(side.tokenizer_dir) / name, name)
    if side.added_tokens:
        add_tokens(folder.tmp / "tokenizer.json", side.added_tokens)
    if side.chat_template:
        _set_chat_template(folder, side.chat_template)
    _tokenizer_config_for_both(folder)
    if side.generation_config:
        folder.write_json("generation_config.json", side.generation_config)
    if side.card is not None:
        folder.write_text("README.md", side.card(folder.file_hashes(), names))
    if side.recipe_file is not None:
        folder.write_text(*side.recipe_file)
    return names


def _read_tokenizer_config(folder: StagedFolder) -> dict | None:
    tc = folder.tmp / "tokenizer_config.json"
    if not tc.exists():
        return None
    try:
        data = json.loads(tc.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _tokenizer_config_for_both(folder: StagedFolder) -> None:
    """Rewrite the copied ``tokenizer_config.json`` for transformers 4.x and 5.x, if it needs it."""
    data = _read_tokenizer_config(folder)
    if data is None:
        return
    new = tokenizer_config_for_both(data, (folder.tmp / "tokenizer.json").exists())
    if new != data:
        folder.write_text("tokenizer_config.json", json.dumps(new, indent=2) + "\n")


def _set_chat_template(folder: StagedFolder, template: str) -> None:
    folder.write_text("chat_template.jinja", template)
    tc = folder.tmp / "tokenizer_config.json"
    if tc.exists():
        try:
            data = json.loads(tc.read_text(encoding="utf-8"))
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        data.pop("chat_template", None)
        folder.write_text("tokenizer_config.json", json.dumps(data, indent=2) + "\n")
