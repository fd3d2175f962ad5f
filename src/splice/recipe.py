"""The recipe schema: YAML in, validated objects out.

Keys and meanings follow mergekit's, so an existing mergekit recipe runs
unchanged. Every error names the key, its place in the file (line) and the
valid choices.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import RecipeError
from .registry import UnknownName, did_you_mean
from .registry import unknown_choice as registry_unknown_choice
from .yamlfile import read_yaml

if TYPE_CHECKING:
    from .methods import MergeMethod, Param

TOP_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "name",
    "calibration",
    "learn",
)
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")

DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
}


@dataclass
class Source:
    model: str
    layer_range: tuple[int, int] | None = None  # None: every layer
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Slice:
    sources: list[Source]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    merge_method: str
    base_model: str | None = None
    models: list[Source] | None = None  # the "models:" form (layer_range None)
    slices: list[Slice] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None
    name: str | None = None
    # model reference -> statistics file, or {text, tokens, seed, ...} to calibrate through the cache (data-aware methods)
    calibration: dict[str, str | dict] = field(default_factory=dict)
    learn: Any = None  # splice.calibration.learn.LearnSpec: tune the weights on the calibration text first
    raw: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the file it came from (relative model paths are taken from its folder)
    derived: bool = False  # made from the file's recipe (e.g. learned weights): its text is not the file's
    warnings: list[str] = field(default_factory=list)  # one line each, e.g. a parameter the method does not use

    def referenced_models(self) -> list[str]:
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for m in self.models or []:
            seen[m.model] = None
        for s in self.slices or []:
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        if self.tokenizer_source not in (None, "base", "union"):
            seen[self.tokenizer_source] = None
        return list(seen)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False, default_flow_style=None).rstrip()


# ---------------------------------------------------------------- parameters


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """Value of a parameter setting for one tensor at relative depth ``t`` in [0, 1].

    A scalar is itself; a list of numbers is a gradient interpolated over ``t``;
    a list of ``{filter, value}`` picks the first whose filter is a substring of
    the tensor name (no filter or ``*`` matches all). None: no entry matched.
    """
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return setting
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if setting and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            pos = t * (len(setting) - 1)
            i0 = int(pos)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = pos - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if setting and all(isinstance(e, (bool, int, float, str)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return evaluate(cond["value"], tensor_name, t)
        return None
    raise RecipeError(f"unexpected parameter value {setting!r}")


# ---------------------------------------------------------------- structure checks with line numbers


class SchemaContext:
    """Where a YAML schema's error is: ``fail(path, msg)`` gives ``file:line: key.path: msg`` (every splice schema uses it)."""

    def __init__(self, file: str, lines: dict):
        self.file = file
        self.lines = lines
        self.warnings: dict[str, str] = {}  # key -> message: one warning per key, however often it occurs

    def where(self, path: tuple) -> str:
        p = path
        while p and p not in self.lines:
            p = p[:-1]
        line = self.lines.get(p)
        dotted = ""
        for part in path:
            dotted += f"[{part}]" if isinstance(part, int) else (f".{part}" if dotted else str(part))
        loc = f"{self.file}:{line}" if line else self.file
        return f"{loc}: {dotted}" if dotted else loc

    def fail(self, path: tuple, msg: str) -> RecipeError:
        return RecipeError(f"{self.where(path)}: {msg}")


def check_keys(ctx: SchemaContext, data: Any, path: tuple, allowed: tuple[str, ...], what: str) -> dict:
    """``data`` as a mapping whose keys are all in ``allowed``; an unknown key is an error with a suggestion.

    mergekit ignores unknown keys; splice refuses them, because a misspelt key
    (``dype:``) silently changes the output.
    """
    if not isinstance(data, dict):
        raise ctx.fail(path, f"{what} must be a mapping, got {type(data).__name__}")
    for k in data:
        if k not in allowed:
            raise ctx.fail(path + (k,), unknown_choice(f"key {k!r} in {what}", k, allowed))
    return data


def unknown_choice(what: str, name: object, choices: tuple[str, ...] | list[str]) -> str:
    """``unknown <what> (valid: a, b); did you mean 'b'?`` (see :func:`splice.registry.unknown_choice`)."""
    return registry_unknown_choice(what, name, choices)[0]


def _ref_path(v: Any) -> Any:
    """The path of a ModelPath as mergekit serializes it (``{path: ..., revision: ...}``) or as a string."""
    return v["path"] if isinstance(v, dict) and "path" in v else v


def _model_ref(ctx: SchemaContext, v: Any, path: tuple) -> str:
    """A model reference as a string; mergekit's ``model+adapter`` LoRA form (or ``{model: ..., lora: ...}``) kept as ``X+Y``."""
    if isinstance(v, dict) and "model" in v:
        model, lora = _ref_path(v["model"]), _ref_path(v.get("lora"))
        if not isinstance(model, str) or (lora is not None and not isinstance(lora, str)):
            raise ctx.fail(path, f"a model reference must be a path or a Hugging Face id, got {v!r}")
        v = model if not lora else f"{model}+{lora}"
    if not isinstance(v, str) or not v.strip():
        raise ctx.fail(path, f"a model reference must be a path or a Hugging Face id, got {v!r}")
    if "+" in v and not Path(v).exists():
        parts = v.split("+")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ctx.fail(path, f"a LoRA reference is 'model+adapter' (one '+', both sides named), got {v!r}")
    return v


def _check_setting(ctx: SchemaContext, v: Any, path: tuple) -> None:
    if isinstance(v, (bool, int, float, str)):
        return
    if isinstance(v, dict):
        v = [v]
        path = path
    if isinstance(v, list) and v:
        if all(isinstance(e, (bool, int, float, str)) for e in v):
            return
        for i, cond in enumerate(v):
            if not isinstance(cond, dict) or "value" not in cond:
                raise ctx.fail(path + (i,), "a conditional parameter needs 'value' (and optionally 'filter')")
            for k in cond:
                if k not in ("filter", "value"):
                    raise ctx.fail(path + (i, k), f"unknown key {k!r} in conditional parameter (valid: filter, value)")
            if not isinstance(cond.get("filter", ""), (str, type(None))):
                raise ctx.fail(path + (i, "filter"), f"a filter is part of a tensor name (a string), got {cond['filter']!r}")
            _check_setting(ctx, cond["value"], path + (i, "value"))
        return
    raise ctx.fail(path, f"a parameter is a number, a list of numbers (gradient) or [{{filter, value}}], got {v!r}")


def _params(ctx: SchemaContext, data: Any, path: tuple, method: MergeMethod) -> dict:
    """The parameters ``method`` takes, each value checked against its range where it is known.

    A parameter that only other methods take, or a global one set for one
    model, is ignored with one warning per name (mergekit ignores both
    silently); a name no method takes is an error with a suggestion.  Numbers
    written as strings (PyYAML reads ``1e-3`` as one) are converted, as
    mergekit's pydantic does.
    """
    from .methods import known_param_names

    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ctx.fail(path, "parameters must be a mapping")
    out = {}
    for k, v in data.items():
        _check_setting(ctx, v, path + (k,))
        p = method.param(k)
        if p is not None and not p.per_model and (path[0] == "models" or "sources" in path):
            msg = (
                f"{ctx.where(path + (k,))}: parameter {k!r} of merge method {method.name!r} is global: set for one model "
                "it is ignored (as mergekit does); set it in the recipe's or the slice's parameters"
            )
            ctx.warnings.setdefault(f"global parameter {k}", msg)
        elif p is not None:
            out[k] = _param_setting(ctx, p, v, path + (k,))
        elif k in known_param_names():
            msg = f"{ctx.where(path + (k,))}: parameter {k!r} is not used by merge method {method.name!r}; ignored"
            ctx.warnings.setdefault(f"unused parameter {k}", msg)
        else:
            hint = did_you_mean(k, method.param_names) or did_you_mean(k, sorted(known_param_names()))
            msg = f"unknown parameter {k!r} for merge method {method.name!r} (valid: {', '.join(method.param_names) or 'none'})"
            if hint is not None:
                msg += f"; did you mean {hint!r}?"
            raise ctx.fail(path + (k,), msg)
    return out


def _param_setting(ctx: SchemaContext, p: Param, v: Any, path: tuple) -> Any:
    """``v`` (a scalar, a gradient list or a list of {filter, value}) with every value checked and numbers converted."""
    if isinstance(v, dict):
        return _param_setting(ctx, p, [v], path)
    if isinstance(v, list) and all(isinstance(e, dict) for e in v):
        return [{**cond, "value": _param_setting(ctx, p, cond["value"], path + (i, "value"))} for i, cond in enumerate(v)]
    if isinstance(v, list):
        return [_param_value(ctx, p, e, path + (i,)) for i, e in enumerate(v)]
    return _param_value(ctx, p, v, path)


def _param_value(ctx: SchemaContext, p: Param, v: Any, path: tuple) -> Any:
    """One known value: a numeric string converted to a number, then checked against ``p``'s range."""
    if isinstance(v, str) and p.kind != "bool":
        try:
            v = float(v)
        except ValueError:
            pass
        else:
            v = int(v) if p.kind == "int" and v.is_integer() else v
    problem = p.problem(v)
    if problem is not None:
        raise ctx.fail(path, problem)
    return v


def _layer_range(ctx: SchemaContext, lr: Any, path: tuple) -> tuple[int, int]:
    """``[start, end)``: integers, 0 <= start < end (a slice of no layers makes no model)."""
    if (
        not isinstance(lr, list)
        or len(lr) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
        or lr[0] < 0
        or lr[1] < lr[0]
    ):
        raise ctx.fail(path, f"layer_range must be [start, end] with 0 <= start <= end, got {lr!r}")
    if lr[0] == lr[1]:
        raise ctx.fail(path, f"layer_range {lr!r} spans no layers (end is exclusive: [{lr[0]}, {lr[0] + 1}] is layer {lr[0]} alone)")
    return lr[0], lr[1]


def _dtype(ctx: SchemaContext, v: Any, path: tuple) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or v.lower() not in DTYPE_ALIASES:
        raise ctx.fail(path, f"unknown dtype {v!r} (valid: {', '.join(sorted(set(DTYPE_ALIASES)))})")
    return DTYPE_ALIASES[v.lower()]


def parse_recipe(data: Any, *, file: str = "<recipe>", lines: dict | None = None) -> Recipe:
    """Validate a recipe given as a dict (already parsed YAML)."""
    from .methods import get_method

    ctx = SchemaContext(file, lines or {})
    data = check_keys(ctx, data, (), TOP_KEYS, "the recipe")
    if "merge_method" not in data:
        raise ctx.fail((), "missing required key 'merge_method'")
    name = data["merge_method"]
    try:
        method = get_method(name)
    except UnknownName as e:
        raise ctx.fail(("merge_method",), str(e)) from None

    has_models = data.get("models") is not None
    has_slices = data.get("slices") is not None
    if has_models == has_slices:
        raise ctx.fail((), "give exactly one of 'models' or 'slices'")

    base = _model_ref(ctx, data["base_model"], ("base_model",)) if data.get("base_model") is not None else None
    r = Recipe(merge_method=method.name, base_model=base, raw=copy.deepcopy(data), path=None)
    r.parameters = _params(ctx, data.get("parameters"), ("parameters",), method)
    r.dtype = _dtype(ctx, data.get("dtype"), ("dtype",))
    r.out_dtype = _dtype(ctx, data.get("out_dtype"), ("out_dtype",))
    r.name = data.get("name")
    if r.name is not None and (not isinstance(r.name, str) or not r.name.strip()):
        raise ctx.fail(("name",), f"name must be a non-empty string, got {r.name!r}")

    if has_models:
        models = data["models"]
        if not isinstance(models, list) or not models:
            raise ctx.fail(("models",), "'models' must be a non-empty list")
        r.models = []
        for i, m in enumerate(models):
            if isinstance(m, str):
                m = {"model": m}
            check_keys(ctx, m, ("models", i), MODEL_KEYS, "a model entry")
            if "model" not in m:
                raise ctx.fail(("models", i), "missing 'model'")
            r.models.append(
                Source(
                    model=_model_ref(ctx, m["model"], ("models", i, "model")),
                    parameters=_params(ctx, m.get("parameters"), ("models", i, "parameters"), method),
                )
            )
    else:
        slices = data["slices"]
        if not isinstance(slices, list) or not slices:
            raise ctx.fail(("slices",), "'slices' must be a non-empty list")
        r.slices = []
        for i, s in enumerate(slices):
            check_keys(ctx, s, ("slices", i), SLICE_KEYS, "a slice")
            if s.get("residual_weight") is not None:
                raise ctx.fail(("slices", i, "residual_weight"), "residual_weight is not supported")
            srcs = s.get("sources")
            if not isinstance(srcs, list) or not srcs:
                raise ctx.fail(("slices", i), "a slice needs a non-empty 'sources' list")
            sources = []
            lengths = set()
            for j, src in enumerate(srcs):
                p = ("slices", i, "sources", j)
                check_keys(ctx, src, p, SOURCE_KEYS, "a slice source")
                if "model" not in src:
                    raise ctx.fail(p, "missing 'model'")
                lr = _layer_range(ctx, src.get("layer_range"), p + ("layer_range",))
                lengths.add(lr[1] - lr[0])
                sources.append(
                    Source(
                        model=_model_ref(ctx, src["model"], p + ("model",)),
                        layer_range=lr,
                        parameters=_params(ctx, src.get("parameters"), p + ("parameters",), method),
                    )
                )
            if len(lengths) > 1:
                raise ctx.fail(("slices", i), f"all sources of a slice must span the same number of layers, got {sorted(lengths)}")
            sb = s.get("base_model")
            r.slices.append(
                Slice(
                    sources=sources,
                    base_model=_model_ref(ctx, sb, ("slices", i, "base_model")) if sb is not None else None,
                    parameters=_params(ctx, s.get("parameters"), ("slices", i, "parameters"), method),
                )
            )

    tok_src = data.get("tokenizer_source")
    tok = data.get("tokenizer")
    if tok_src is not None and tok is not None:
        raise ctx.fail(("tokenizer",), "give either 'tokenizer_source' or 'tokenizer', not both")
    if tok is not None:
        check_keys(ctx, tok, ("tokenizer",), TOKENIZER_KEYS, "'tokenizer'")
        if tok.get("tokens"):
            raise ctx.fail(("tokenizer", "tokens"), "per-token embedding sources ('tokens') are not supported yet")
        tok_src = tok.get("source")
        pad = tok.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise ctx.fail(("tokenizer", "pad_to_multiple_of"), f"must be a positive integer, got {pad!r}")
        r.pad_to_multiple_of = pad
    if tok_src is not None:
        if not isinstance(tok_src, str):
            raise ctx.fail(("tokenizer_source",), "tokenizer_source is 'base', 'union' or a model reference")
        if tok_src == "base" and not _any_base(r):
            raise ctx.fail(("tokenizer_source",), "tokenizer_source 'base' needs a base_model")
        if tok_src not in ("base", "union"):
            tok_src = _model_ref(ctx, tok_src, ("tokenizer", "source") if tok is not None else ("tokenizer_source",))
        r.tokenizer_source = tok_src
    ct = data.get("chat_template")
    if ct is not None and not isinstance(ct, str):
        raise ctx.fail(("chat_template",), "chat_template is a template name, 'auto', or a Jinja template string")
    r.chat_template = ct

    # base model requirements
    if method.base == "required":
        if r.slices:
            missing = [i for i, s in enumerate(r.slices) if not (s.base_model or r.base_model)]
            if missing:
                raise ctx.fail(("slices", missing[0]), f"merge method {method.name!r} needs a base_model")
        elif not r.base_model:
            raise ctx.fail((), f"merge method {method.name!r} needs a base_model")
    r.learn = _learn(ctx, data.get("learn"), method, r)
    r.calibration = _calibration(ctx, data.get("calibration"), method, r)
    r.warnings = list(ctx.warnings.values())
    return r


def _calibration(ctx: SchemaContext, data: Any, method: MergeMethod, r: Recipe) -> dict[str, str]:
    """``calibration:``: each model's statistics file (``splice calibrate`` writes them), for methods that take them."""
    if r.learn is not None:
        return _learn_calibration(ctx, data, r)
    if data is None:
        if method.statistics:
            raise ctx.fail(
                (),
                f"merge method {method.name!r} needs calibration statistics: add 'calibration:' mapping each model to "
                "its statistics file (splice calibrate MODEL --text FILE -o FILE writes one)",
            )
        return {}
    if not method.statistics:
        raise ctx.fail(("calibration",), f"merge method {method.name!r} uses no calibration statistics; remove 'calibration'")
    if not isinstance(data, dict) or not data:
        raise ctx.fail(("calibration",), "calibration must map each model to its statistics file")
    models = r.referenced_models()
    out = {}
    for k, v in data.items():
        if k not in models:
            raise ctx.fail(("calibration", k), unknown_choice(f"model {k!r} in calibration", k, models))
        if isinstance(v, dict):
            out[k] = _calibration_text(ctx, ("calibration", k), v)
            continue
        if not isinstance(v, str) or not v.strip():
            raise ctx.fail(("calibration", k), f"a statistics file is a path (or a mapping with 'text:'), got {v!r}")
        out[k] = v
    return out


def _learn(ctx: SchemaContext, data: Any, method: MergeMethod, r: Recipe):
    """``learn: {weights: task|layer, steps, batch_size, holdout, eval_every, objective}`` (every key optional)."""
    if data is None:
        return None
    from .calibration.learn import GRANULARITIES, LEARN_KEYS, OBJECTIVES, LearnSpec
    from .methods.task_arithmetic import FAMILY

    if method.name not in {v.name for v in FAMILY}:
        names = ", ".join(v.name for v in FAMILY)
        raise ctx.fail(("learn",), f"learned weights need a task-vector method ({names}), not {method.name!r}")
    if r.slices is not None:
        raise ctx.fail(("learn",), "learned weights need the 'models:' form of a recipe, not 'slices:'")
    from . import options

    if data is True:
        data = {}
    check_keys(ctx, data, ("learn",), LEARN_KEYS, "'learn'")
    kw: dict[str, Any] = {}
    if "weights" in data:
        if data["weights"] not in GRANULARITIES:
            raise ctx.fail(("learn", "weights"), unknown_choice("learn weights", str(data["weights"]), list(GRANULARITIES)))
        kw["weights"] = data["weights"]
    if "objective" in data:
        if data["objective"] not in OBJECTIVES:
            raise ctx.fail(("learn", "objective"), unknown_choice("learn objective", str(data["objective"]), list(OBJECTIVES)))
        kw["objective"] = data["objective"]
    checks = {
        "steps": lambda v, k: options.integer(v, k, minimum=0),
        "batch_size": options.positive_int,
        "eval_every": options.positive_int,
        "holdout": lambda v, k: options.real(v, k, minimum=0, below=1),
    }
    for k, check in checks.items():
        if k in data:
            try:
                kw[k] = check(data[k], k)
            except options.OptionError as e:
                raise ctx.fail(("learn", k), str(e)) from None
    return LearnSpec(**kw)


def _learn_calibration(ctx: SchemaContext, data: Any, r: Recipe) -> dict:
    """``calibration:`` of a ``learn:`` recipe: each expert whose text drives the loss, as ``{text: FILE, ...}``."""
    if not isinstance(data, dict) or not data:
        raise ctx.fail(("learn",), "learned weights need calibration text: add 'calibration:' mapping each expert to {text: FILE}")
    models = r.referenced_models()
    out = {}
    for k, v in data.items():
        if k not in models:
            raise ctx.fail(("calibration", k), unknown_choice(f"model {k!r} in calibration", k, models))
        if k == r.base_model:
            raise ctx.fail(("calibration", k), "the loss is taken on the experts' text; the base model takes no calibration entry")
        if not isinstance(v, dict):
            raise ctx.fail(("calibration", k), "learned weights tune on text: give {text: FILE} (a statistics file holds no text)")
        out[k] = _calibration_text(ctx, ("calibration", k), v)
    return out


CALIBRATION_TEXT_KEYS = ("text", "tokens", "seed", "seq_len", "batch_size")


def _calibration_text(ctx: SchemaContext, where: tuple, v: dict) -> dict:
    """``{text: FILE, tokens: N, seed: S, seq_len: N, batch_size: N}``: calibrate from text (through the statistics cache)."""
    from . import options

    check_keys(ctx, v, where, CALIBRATION_TEXT_KEYS, "a calibration mapping")
    if not isinstance(v.get("text"), str) or not v["text"].strip():
        raise ctx.fail(where, "a calibration mapping needs 'text:' (the calibration text file)")
    out = {"text": v["text"]}
    checks = {"tokens": options.positive_int, "seed": options.seed, "batch_size": options.positive_int}
    for k in ("tokens", "seed", "seq_len", "batch_size"):
        if k in v:
            try:
                out[k] = options.integer(v[k], k, minimum=2) if k == "seq_len" else checks[k](v[k], k)
            except options.OptionError as e:
                raise ctx.fail((*where, k), str(e)) from None
    return out


def _any_base(r: Recipe) -> bool:
    return bool(r.base_model) or any(s.base_model for s in r.slices or [])


def load_recipe(path_or_text: str | Path | dict | Recipe) -> Recipe:
    """Load one recipe.

    Args:
        path_or_text: a YAML file path, YAML text, a dict, or a Recipe (returned as is).

    Returns:
        The validated Recipe (``path`` set when it came from a file).

    Raises:
        RecipeError: one line with file:line; a multi-stage file (several YAML
            documents) is refused here: ``splice.multi`` runs those.
    """
    if isinstance(path_or_text, Recipe):
        return path_or_text
    if isinstance(path_or_text, dict):
        return parse_recipe(path_or_text)
    src = read_yaml(path_or_text)
    docs = src.documents
    if not docs:
        raise RecipeError(f"{src.file}: the recipe is empty")
    if len(docs) > 1:
        raise RecipeError(
            f"{src.file}:{docs[1].line}: a multi-stage recipe ({len(docs)} YAML documents); "
            "only a merge runs it (it cannot be planned or loaded as one recipe)"
        )
    r = parse_recipe(docs[0].data, file=src.file, lines=docs[0].lines)
    r.path = src.path
    return r
