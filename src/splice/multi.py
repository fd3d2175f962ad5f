"""Multi-stage recipes, as mergekit-multi reads them: several YAML documents in one file.

Each document is a recipe; ``name: NAME`` makes it a stage whose output later
stages can use as a model, by writing ``NAME`` wherever a model goes
(``base_model: NAME``, ``- model: NAME``, a slice source, ``tokenizer_source``).
At most one document has no name. As in mergekit, a stage name takes the place
of a model path of the same name.

``run_stages`` runs the stages the target needs, dependencies first, each with
``splice.engine.run_merge``. The target is ``stage=NAME``, else the unnamed
document, else the last one; it is written to ``out``. The others go to
``intermediate_dir/NAME`` (default: a hidden folder beside ``out``, removed
once the target is written). A finished stage folder records a key: a hash of
its recipe, the seed, the splice version and the keys of the stages it uses. A
stage whose folder holds its current key is reused, so a changed stage (or one
downstream of it) is redone and an interrupted run resumes where it stopped.
Changes to input model files on disk are not detected: remove the stage's folder
to redo it.

Everything a run can check without merging is checked before the first stage
runs: every document, stage names, the target, cycles, the output, the folders
it would write, and the input models.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import MergeError, RecipeError, SpliceError, option
from .recipe import Recipe, parse_recipe
from .registry import unknown_name_message
from .yamlfile import YamlDocument, read_yaml

STAGE_MARKER = ".splice-stage.json"  # written into a finished stage folder: its name and key
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")  # a stage name is also a folder name
STAGE_KEY_FORMAT = 1  # bump when what goes into a stage key changes: every old stage is redone


@dataclass
class Stage:
    """One document of a multi-stage recipe."""

    name: str | None  # None: the unnamed document
    index: int  # 0-based position among the file's documents
    line: int  # the line the document starts on
    doc: dict  # the recipe as written (stage names not replaced)
    uses: list[str] = field(default_factory=list)  # the stages it uses, in order of first use
    recipe: Recipe | None = None  # the recipe with stage names replaced by their folders

    @property
    def label(self) -> str:
        return f"stage {self.name!r}" if self.name is not None else f"the unnamed stage (document {self.index + 1})"


@dataclass
class StagePlan:
    """What ``plan_stages`` decided: every stage, the ones to run in order, where they go."""

    file: str
    stages: list[Stage]  # every document, in file order
    order: list[Stage]  # the target and what it needs, each after the stages it uses
    target: Stage
    intermediate_dir: Path
    default_intermediate_dir: bool  # True: made by splice beside the output, removed on success

    def folder(self, stage: Stage) -> Path:
        """Where a stage other than the target is written."""
        assert stage.name is not None
        return self.intermediate_dir / stage.name


def is_multi_stage(recipe: Any) -> bool:
    """True when ``recipe`` is a multi-stage recipe: a file or text of several YAML documents, or a list of recipes.

    Args:
        recipe: what ``splice.merge`` accepts (a path, YAML text, a dict, a Recipe) or a list of recipe dicts.

    Returns:
        Whether ``run_stages`` (rather than ``run_merge``) should run it.
    """
    if isinstance(recipe, list):
        return True
    if isinstance(recipe, (str, os.PathLike)):
        return len(read_yaml(recipe).documents) > 1
    return False


def plan_stages(
    recipe: Any, out: str | os.PathLike, *, stage: str | None = None, intermediate_dir: str | os.PathLike | None = None
) -> StagePlan:
    """Read and check a multi-stage recipe and decide what to run, without touching any model.

    Args:
        recipe: a path, YAML text, a list of recipe dicts, a dict or a Recipe.
        out: the folder the target stage is written to.
        stage: the name of the stage to write to ``out`` (default: the unnamed document, else the last).
        intermediate_dir: where the other stages go (default: ``.OUT.splice-stages`` beside ``out``).

    Returns:
        A StagePlan whose stages carry their resolved recipes.

    Raises:
        RecipeError: one line for a bad document, name, target or a cycle.
    """
    if not str(out).strip():
        raise MergeError("the output path is empty")
    if intermediate_dir is not None and not str(intermediate_dir).strip():
        raise MergeError(f"{option('intermediate_dir')} is empty; leave it unset for a temporary folder beside the output")
    file, path, docs = _documents(recipe)
    stages = [_stage(file, d) for d in docs]
    by_name = _names(file, stages)
    target = _target(file, stages, by_name, stage)
    out_path = Path(out).resolve()
    default_dir = intermediate_dir is None
    folder = out_path.parent / f".{out_path.name}.splice-stages" if default_dir else Path(intermediate_dir).resolve()
    for st in stages:
        resolved, st.uses = _resolve_refs(st.doc, by_name, folder)
        st.recipe = parse_recipe(resolved, file=file)
        st.recipe.path = path
    order = _dependency_order(file, stages, by_name, target)
    return StagePlan(file, stages, order, target, folder, default_dir)


def run_stages(
    recipe: Any,
    out: str | os.PathLike,
    opts: Any = None,
    *,
    stage: str | None = None,
    intermediate_dir: str | os.PathLike | None = None,
    **kw: Any,
) -> dict:
    """Run a multi-stage recipe: the stages the target needs, in dependency order, the target into ``out``.

    Args:
        recipe: a path, YAML text, a list of recipe dicts (one per stage), a dict or a Recipe.
        out: the output folder of the target stage.
        opts: ``splice.engine.MergeOptions`` (or None); ``kw`` sets its fields, as for ``run_merge``.
            ``force`` applies to ``out`` only; ``seed`` goes into every stage's key.
        stage: the stage to write to ``out`` (default: the unnamed document, else the last).
        intermediate_dir: where the other stages are kept (default: a folder beside ``out``,
            removed once ``out`` is written; a given folder is kept).

    Returns:
        ``run_merge``'s summary of the target, plus ``stages``: a list of
        ``{"name", "out", "status"}`` with status "merged" or "reused", in run order.

    Raises:
        SpliceError: one line; anything checkable is checked before the first stage runs.
    """
    from .engine import MergeOptions, run_merge

    opts = dataclasses.replace(opts) if opts is not None else MergeOptions()
    for k, v in kw.items():
        if not hasattr(opts, k):
            raise TypeError(f"unknown option {k!r}")
        setattr(opts, k, v)
    plan = plan_stages(recipe, out, stage=stage, intermediate_dir=intermediate_dir)
    keys = stage_keys(plan, opts.seed)
    todo = _check_before_work(plan, Path(out), keys, opts)
    _warn_unused(plan, stage)

    done: list[dict] = []
    current = plan.target
    made_dir = not plan.intermediate_dir.exists()
    try:
        for st in plan.order[:-1]:
            current = st
            status = _run_stage(plan, st, keys[st.name], st.name in todo, opts, run_merge)
            done.append({"name": st.name, "out": str(plan.folder(st)), "status": status})
        current = plan.target
        _log(opts.quiet, f"{plan.target.label}: merging into {out}")
        summary = run_merge(plan.target.recipe, out, dataclasses.replace(opts))
    except SpliceError as e:
        if len(plan.stages) == 1:
            raise  # a one-document recipe: the merge's own message
        raise MergeError(_failed(plan, current, e, done)) from e
    finally:
        _remove_if_empty(plan.intermediate_dir, made_dir)
    done.append({"name": plan.target.name, "out": summary["out"], "status": "merged"})
    if plan.default_intermediate_dir:
        _remove_stage_folders(plan.intermediate_dir)
    return dict(summary, stages=done)


def stage_keys(plan: StagePlan, seed: int) -> dict[str | None, str]:
    """The key of each stage in ``plan.order``: what a finished folder must record to be reused.

    Args:
        plan: from ``plan_stages``.
        seed: the merge seed (random methods give other bytes under another seed).

    Returns:
        Stage name (None for the unnamed stage) -> hex SHA-256.
    """
    keys: dict[str | None, str] = {}
    for st in plan.order:
        payload = {
            "format": STAGE_KEY_FORMAT,
            "splice": __version__,
            "seed": seed,
            "recipe": st.doc,
            "uses": {name: keys[name] for name in st.uses},
        }
        keys[st.name] = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return keys


# ---------------------------------------------------------------- reading the stages


def _documents(recipe: Any) -> tuple[str, Path | None, list[YamlDocument]]:
    if isinstance(recipe, Recipe):
        return str(recipe.path or "<recipe>"), recipe.path, [YamlDocument(recipe.raw)]
    if isinstance(recipe, dict):
        return "<recipe>", None, [YamlDocument(recipe)]
    if isinstance(recipe, list):
        return "<recipe>", None, [YamlDocument(d, index=i, line=0) for i, d in enumerate(recipe)]
    read = read_yaml(recipe)
    if not read.documents:
        raise RecipeError(f"{read.file}: the recipe is empty")
    return read.file, read.path, read.documents


def _stage(file: str, d: YamlDocument) -> Stage:
    """A document, checked as a recipe (stage names read as model names until resolved)."""
    parse_recipe(d.data, file=file, lines=d.lines)
    name = d.data.get("name")
    where = f"{file}:{d.lines.get(('name',), d.line)}" if d.line else f"{file}: document {d.index + 1}"
    if name is not None and not STAGE_NAME.match(name):
        raise RecipeError(f"{where}: name: stage name {name!r} must be a plain folder name (letters, digits, '.', '_', '-')")
    return Stage(name, d.index, d.line, d.data)


def _at(file: str, st: Stage) -> str:
    return f"{file}:{st.line}" if st.line else f"{file}: document {st.index + 1}"


def _names(file: str, stages: list[Stage]) -> dict[str, Stage]:
    by_name: dict[str, Stage] = {}
    unnamed: Stage | None = None
    for st in stages:
        if st.name is None:
            if unnamed is not None:
                raise RecipeError(
                    f"{_at(file, st)}: documents {unnamed.index + 1} and {st.index + 1} both have no 'name'; "
                    "in a multi-stage recipe at most one (the final one) may go without"
                )
            unnamed = st
        elif st.name in by_name:
            first = by_name[st.name]
            raise RecipeError(f"{_at(file, st)}: stage name {st.name!r} is used twice (documents {first.index + 1} and {st.index + 1})")
        else:
            by_name[st.name] = st
    return by_name


def _target(file: str, stages: list[Stage], by_name: dict[str, Stage], stage: str | None) -> Stage:
    if stage is not None:
        if stage not in by_name:
            msg, _ = unknown_name_message("stage", stage, list(by_name))
            raise RecipeError(f"{file}: {msg}")
        return by_name[stage]
    unnamed = [st for st in stages if st.name is None]
    return unnamed[0] if unnamed else stages[-1]


def _resolve_refs(doc: dict, by_name: dict[str, Stage], folder: Path) -> tuple[dict, list[str]]:
    """A copy of ``doc`` with each stage name in a model position replaced by its folder; the names used."""
    doc = copy.deepcopy(doc)  # an aliased part stays shared: it resolves the same everywhere
    used: list[str] = []

    def resolve(holder: Any, key: Any) -> None:
        ref = holder[key]
        if isinstance(ref, dict):  # {model: {path: ...} or a string, lora: ...}
            holder, key = (ref["model"], "path") if isinstance(ref["model"], dict) else (ref, "model")
            ref = holder[key]
        if not isinstance(ref, str):
            return
        name, plus, adapter = ref.partition("+")
        if name in by_name:
            holder[key] = str(folder / name) + plus + adapter
            if name not in used:
                used.append(name)

    for holder, key in _model_slots(doc):
        resolve(holder, key)
    return doc, used


def _model_slots(doc: dict) -> list[tuple[Any, Any]]:
    """Every (container, key) of a model reference in a recipe that ``parse_recipe`` accepted."""
    slots: list[tuple[Any, Any]] = []
    if doc.get("base_model") is not None:
        slots.append((doc, "base_model"))
    for i, m in enumerate(doc.get("models") or []):
        slots.append((doc["models"], i) if isinstance(m, str) else (m, "model"))
    for s in doc.get("slices") or []:
        if s.get("base_model") is not None:
            slots.append((s, "base_model"))
        slots += [(src, "model") for src in s["sources"]]
    if doc.get("tokenizer_source") not in (None, "base", "union"):
        slots.append((doc, "tokenizer_source"))
    tok = doc.get("tokenizer")
    if isinstance(tok, dict) and tok.get("source") not in (None, "base", "union"):
        slots.append((tok, "source"))
    return slots


def _dependency_order(file: str, stages: list[Stage], by_name: dict[str, Stage], target: Stage) -> list[Stage]:
    """The target after everything it uses (file order among equals); any cycle in the file is an error."""
    state: dict[int, str] = {}  # stage index -> "visiting" | "done"
    order: list[Stage] = []

    def visit(st: Stage, chain: list[Stage]) -> None:
        if state.get(st.index) == "done":
            return
        if state.get(st.index) == "visiting":
            loop = chain[chain.index(st) :] + [st]
            path = " -> ".join(repr(s.name) for s in loop)
            raise RecipeError(
                f"{_at(file, st)}: the stages use each other in a cycle ({path}); a stage can use only stages that do not use it"
            )
        state[st.index] = "visiting"
        for name in st.uses:
            visit(by_name[name], chain + [st])
        state[st.index] = "done"
        order.append(st)

    for st in stages:
        visit(st, [])
    needed = _needed(target, by_name)
    return [st for st in order if st.index in needed]


def _needed(target: Stage, by_name: dict[str, Stage]) -> set[int]:
    needed, todo = set(), [target]
    while todo:
        st = todo.pop()
        if st.index not in needed:
            needed.add(st.index)
            todo += [by_name[n] for n in st.uses]
    return needed


# ---------------------------------------------------------------- before any work


def _check_before_work(plan: StagePlan, out: Path, keys: dict, opts: Any) -> set[str]:
    """Check the output, the stage folders and the inputs; return the names of the stages to merge."""
    from .checkpoint.writer import check_output

    check_output(out, opts.force, inputs=_external_inputs(plan))
    out = out.resolve()
    inter = plan.intermediate_dir
    if inter == out or out in inter.parents:
        raise MergeError(f"{option('intermediate_dir')} {inter} is inside the output {out}; put it beside the output")
    todo: set[str] = set()
    for st in plan.order[:-1]:
        folder = plan.folder(st)
        for place in (folder, _building(folder)):
            if out == place or place in out.parents:
                raise MergeError(f"the output {out} is the folder of {st.label} ({place}); choose another output or intermediate folder")
        if folder.exists() and _marker(folder) is None:
            raise MergeError(
                f"{folder} exists but is not a stage folder splice wrote; remove it or pass another {option('intermediate_dir')}"
            )
        if (_marker(folder) or {}).get("key") != keys[st.name]:
            todo.add(st.name)
    for st in plan.order:
        if st is plan.target or st.name in todo:
            _check_inputs(plan, st, opts.allow_pickle)
    return todo


def recipe_inputs(
    recipe: Any, out: str | os.PathLike, *, stage: str | None = None, intermediate_dir: str | os.PathLike | None = None
) -> list[str]:
    """Every path a merge of ``recipe`` into ``out`` reads (the recipe file and the models), one
    document or several, without opening a model: what another output of the run must not be."""
    return _external_inputs(plan_stages(recipe, out, stage=stage, intermediate_dir=intermediate_dir))


def _external_inputs(plan: StagePlan) -> list[str]:
    """Every path the stages read that no stage writes: the recipe file and the models (as written)."""
    stage_folders = {str(plan.folder(s)) for s in plan.stages if s.name is not None}
    found = [plan.file] if Path(plan.file).exists() else []
    for st in plan.order:
        base_dir = st.recipe.path.parent if st.recipe.path is not None else Path.cwd()
        for ref in st.recipe.referenced_models():
            path, _, adapter = ref.partition("+")
            if path not in stage_folders and (base_dir / path).exists():
                found.append(str(base_dir / path))
            if adapter and (base_dir / adapter).exists():  # a LoRA adapter folder is an input too
                found.append(str(base_dir / adapter))
    return found


def _check_inputs(plan: StagePlan, st: Stage, allow_pickle: bool) -> None:
    """Every model a stage reads that is not another stage's output can be opened."""
    from .checkpoint.reader import open_model

    stage_folders = {str(plan.folder(s)) for s in plan.stages if s.name is not None}
    base_dir = st.recipe.path.parent if st.recipe.path is not None else None
    for ref in st.recipe.referenced_models():
        if ref.partition("+")[0] not in stage_folders:
            open_model(ref, allow_pickle=allow_pickle, base_dir=base_dir).close()


def _warn_unused(plan: StagePlan, stage: str | None) -> None:
    if stage is not None:
        return  # asking for one stage leaves the later ones out on purpose
    needed = {st.index for st in plan.order}
    for st in plan.stages:
        if st.index not in needed:
            print(f"warning: {st.label} is not used by {plan.target.label}; it is not run", file=sys.stderr)


# ---------------------------------------------------------------- running one stage


def _building(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.building")


def _marker(folder: Path) -> dict | None:
    """The record a finished stage folder holds, or None (not a stage folder, or unreadable)."""
    try:
        info = json.loads((folder / STAGE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("stage") == folder.name else None


def _run_stage(plan: StagePlan, st: Stage, key: str, needs_merge: bool, opts: Any, run_merge: Any) -> str:
    """Merge one intermediate stage into its folder (or reuse it); "merged" or "reused"."""
    folder = plan.folder(st)
    if not needs_merge:
        _log(opts.quiet, f"{st.label}: already done in {folder}, reused")
        return "reused"
    _log(opts.quiet, f"{st.label}: merging into {folder}")
    building = _building(folder)  # splice's own: a leftover from an interrupted run is replaced
    run_merge(st.recipe, building, dataclasses.replace(opts, force=True))
    record = {"stage": st.name, "key": key, "splice": __version__}
    (building / STAGE_MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)  # a stage folder of an older key (checked before any work)
    building.rename(folder)
    return "merged"


def _failed(plan: StagePlan, st: Stage, e: SpliceError, done: list[dict]) -> str:
    """The one-line message for a stage that failed, saying what was kept."""
    msg = f"{st.label}: {Exception.__str__(e)}"
    if done:
        msg += f"; the finished stages are kept in {plan.intermediate_dir} and a rerun reuses them"
    return msg


def _remove_stage_folders(folder: Path) -> None:
    """Remove splice's stage folders (finished or half-built) from ``folder``, then ``folder`` if that empties it."""
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.is_dir() and (_marker(child) is not None or (child.name.startswith(".") and child.name.endswith(".building"))):
            shutil.rmtree(child)
    _remove_if_empty(folder, True)


def _remove_if_empty(folder: Path, made: bool) -> None:
    """Remove the intermediate folder this run made if no stage finished in it."""
    if made and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)
