"""The search spec: YAML in (read with splice's one safe reader), a validated ``SearchSpec`` out.

A spec names the models, the evaluation (held-out text per domain, split into a
*search* part the optimizer sees and a *test* part it never sees), the space, the
objective(s), the optimizer, the budget and the seed::

    models:
      base: zoo/models/base
      experts: {code: zoo/models/code, news: zoo/models/news}
    evaluation:
      domains: {code: zoo/data/code/heldout.txt, news: ..., general: ...}
      general: general          # forgetting is measured here
      search_share: 0.5         # share of each domain's windows the search sees
      tokens: 4096              # tokens per domain and split (default: all)
      seq_len: 128
    space:
      methods: [linear, ties]
      granularity: global       # or per-layer, or {groups: 3}
      split_attention_mlp: false
      params: {weight: [0, 1], density: [0.1, 1]}
    objective: mean             # or objectives: [mean, forgetting]
    optimizer: default
    budget: 50
    seed: 0

``zoo: FOLDER`` instead of ``models`` and ``evaluation.domains`` takes both from a
built zoo. Relative paths are relative to the spec file's folder. Every error is one
line with the file and line, as for recipes; unknown keys get a did-you-mean.

Torch-free: the CLI validates a spec before anything heavy is imported.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RecipeError, SpliceError
from ..recipe import SchemaContext, check_keys, unknown_choice
from ..registry import UnknownName
from ..yamlfile import read_yaml

TOP_KEYS = (
    "models",
    "zoo",
    "evaluation",
    "space",
    "objective",
    "objectives",
    "optimizer",
    "budget",
    "time",
    "seed",
    "threads",
    "fidelity",
)
MODELS_KEYS = ("base", "experts")
EVALUATION_KEYS = ("domains", "general", "search_share", "tokens", "seq_len", "batch_size")
SPACE_KEYS = ("methods", "granularity", "split_attention_mlp", "params", "drop")
DROP_KEYS = ("count", "speedup")
FIDELITY_KEYS = ("screen_tokens", "full_tokens", "keep")
DEFAULT_KEEP = 0.25  # share of screened candidates re-scored on every search token (EvoPress's survivors per offspring)
DEFAULT_SCREEN_SHARE = 0.25  # with no screen_tokens: the screen uses this share of each domain's search tokens
GRANULARITIES = ("global", "groups", "per-layer")

# Objectives: name -> True when larger is better. A domain's name is also an objective
# (that domain's normalized score, maximized).
OBJECTIVES = {"mean": True, "worst": True, "forgetting": False, "loss": False}  # loss: mean held-out loss over the domains

DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")  # the families that mattered most on the tiny zoo
DEFAULT_SEARCHED = ("weight", "density")  # per-model parameters searched when the method takes them
DEFAULT_RANGES = {"weight": (0.0, 1.0), "density": (0.1, 1.0)}  # where the registry's range is wider or unbounded
OPEN_END_MARGIN = 1e-3  # an open end of a registry range, e.g. epsilon's [0, 1), is searched up to 0.999
DEFAULT_SEARCH_SHARE = 0.5  # half of each domain's windows for the search, half kept back for the test split
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 8

_TIME_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|m|h|)\s*$")
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True)
class ParamRange:
    """One searched (or fixed) method parameter: ``low``..``high``, or ``fixed``."""

    name: str
    low: float | None = None
    high: float | None = None
    fixed: Any = None
    integer: bool = False

    @property
    def searched(self) -> bool:
        return self.fixed is None


@dataclass
class SpaceSpec:
    methods: list[str]
    granularity: str = "global"  # "global" | "groups" | "per-layer"
    groups: int = 1  # anchor values per parameter (granularity "groups"); per-layer: the layer count
    split_attention_mlp: bool = False
    params: dict[str, ParamRange] = field(default_factory=dict)
    drop: dict | None = None  # a layer-drop space: {"count": K} or {"speedup": X} (then no merge keys)


@dataclass(frozen=True)
class Fidelity:
    """Screen candidates on ``screen_tokens`` per domain, re-score the best ``keep`` share on ``full_tokens``.

    ``None`` token counts are filled in at set-up: ``full_tokens`` is evaluation.tokens (all the
    search windows), ``screen_tokens`` a quarter of them.
    """

    screen_tokens: int | None = None
    full_tokens: int | None = None
    keep: float = DEFAULT_KEEP


@dataclass
class SearchSpec:
    base: str
    experts: dict[str, str]  # domain -> model
    domains: dict[str, str]  # domain -> held-out text file
    general: str | None = None
    search_share: float = DEFAULT_SEARCH_SHARE
    tokens: int | None = None
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_BATCH_SIZE
    space: SpaceSpec = field(default_factory=lambda: SpaceSpec(list(DEFAULT_METHODS)))
    objectives: list[str] = field(default_factory=lambda: ["mean"])
    optimizer: str = "default"
    budget: int | None = None
    time: float | None = None  # seconds
    seed: int = 0
    threads: int | None = None
    fidelity: Fidelity | None = None
    file: str = "<spec>"
    raw: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """A hash of what makes a study's trials comparable: models, evaluation and space (not budget, time or seed)."""
        keep = {k: v for k, v in self.raw.items() if k not in ("budget", "time", "seed", "optimizer", "objective", "objectives", "threads")}
        keep["_resolved"] = {"base": self.base, "experts": self.experts, "domains": self.domains}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def directions(self) -> list[bool]:
        """Per objective: True when larger is better."""
        return [OBJECTIVES.get(o, True) for o in self.objectives]


def parse_time(value: Any, name: str = "time") -> float:
    """``90``, ``"90s"``, ``"30m"``, ``"1.5h"`` -> seconds (> 0)."""
    from ..options import OptionError

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = _TIME_RE.match(str(value)) if isinstance(value, str) else None
        if not m:
            raise OptionError(name, value, "must be a duration such as 90s, 30m or 2h")
        seconds = float(m.group(1)) * _TIME_UNITS[m.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise OptionError(name, value, "must be a duration above 0, such as 90s, 30m or 2h")
    return seconds


def load_spec(source: str | os.PathLike) -> SearchSpec:
    """Read and validate a search spec file (or YAML text).

    Args:
        source: the spec file, or YAML text.

    Returns:
        The ``SearchSpec``, paths resolved against the file's folder.

    Raises:
        RecipeError: one line with the file and line of the first problem.
    """
    src = read_yaml(source, what="search spec")
    if not src.documents:
        raise RecipeError(f"{src.file}: the search spec is empty")
    if len(src.documents) > 1:
        raise RecipeError(f"{src.file}:{src.documents[1].line}: a search spec is one YAML document, this file has {len(src.documents)}")
    doc = src.documents[0]
    folder = src.path.parent if src.path is not None else Path.cwd()
    return parse_spec(doc.data, file=src.file, lines=doc.lines, folder=folder)


def parse_spec(data: Any, *, file: str = "<spec>", lines: dict | None = None, folder: Path | None = None) -> SearchSpec:
    """Validate a spec given as parsed YAML (see :func:`load_spec`)."""
    ctx = SchemaContext(file, lines or {})
    folder = folder or Path.cwd()
    data = check_keys(ctx, data, (), TOP_KEYS, "the search spec")

    def path_of(v: Any, path: tuple, what: str) -> str:
        if not isinstance(v, str) or not v.strip():
            raise ctx.fail(path, f"{what} must be a path, got {v!r}")
        p = Path(os.path.expanduser(v))
        return str(p if p.is_absolute() else (folder / p).resolve())

    zoo_models: dict[str, str] = {}
    zoo_domains: dict[str, str] = {}
    zoo_general = None
    if data.get("zoo") is not None:
        zoo = path_of(data["zoo"], ("zoo",), "zoo")
        try:
            from ..zoo import zoo_paths

            zp = zoo_paths(zoo)
        except Exception as e:  # noqa: BLE001 - any unreadable zoo is the user's input problem
            raise ctx.fail(("zoo",), f"cannot read the zoo {zoo}: {e}") from None
        zoo_models = {"base": str(zp["models"]["base"]), **{d: str(zp["models"][d]) for d in zp["manifest"]["experts"]}}
        zoo_domains = {d: str(p) for d, p in zp["heldout"].items()}
        zoo_general = zp["manifest"].get("general_domain")

    # models
    models = data.get("models")
    if models is None and not zoo_models:
        raise ctx.fail((), "missing required key 'models' (base and experts), or 'zoo'")
    models = check_keys(ctx, models if models is not None else {}, ("models",), MODELS_KEYS, "'models'")
    if models.get("base") is not None:
        base = path_of(models["base"], ("models", "base"), "the base model")
    elif zoo_models:
        base = zoo_models["base"]
    else:
        raise ctx.fail(("models",), "missing 'base'")
    experts_raw = models.get("experts")
    drop_space = isinstance(data.get("space"), dict) and data["space"].get("drop") is not None
    if experts_raw is None and zoo_models:
        experts = {d: p for d, p in zoo_models.items() if d != "base"}
    elif experts_raw is None and drop_space:
        experts = {}  # a drop space prunes the base; experts only add normalized scores
    else:
        if not isinstance(experts_raw, dict) or not experts_raw:
            raise ctx.fail(("models", "experts"), "experts must be a mapping of domain -> model (the domain the expert was tuned on)")
        experts = {str(d): path_of(m, ("models", "experts", d), f"expert {d!r}") for d, m in experts_raw.items()}

    # evaluation
    ev = check_keys(ctx, data.get("evaluation") or {}, ("evaluation",), EVALUATION_KEYS, "'evaluation'")
    dom_raw = ev.get("domains")
    if dom_raw is None:
        if not zoo_domains:
            raise ctx.fail(("evaluation",), "missing 'domains' (domain -> held-out text file)")
        domains = dict(zoo_domains)
    else:
        if not isinstance(dom_raw, dict) or not dom_raw:
            raise ctx.fail(("evaluation", "domains"), "domains must be a mapping of domain -> held-out text file")
        domains = {str(d): path_of(p, ("evaluation", "domains", d), f"domain {d!r}") for d, p in dom_raw.items()}
        for d, p in domains.items():
            if not Path(p).is_file():
                raise ctx.fail(("evaluation", "domains", d), f"held-out file {p} not found")
    missing = [d for d in experts if d not in domains]
    if missing:
        raise ctx.fail(("models", "experts", missing[0]), f"expert domain {missing[0]!r} has no held-out text in evaluation.domains")
    general = ev.get("general", zoo_general if dom_raw is None or zoo_general in domains else None)
    if general is not None and general not in domains:
        raise ctx.fail(("evaluation", "general"), unknown_choice(f"general domain {general!r}", general, list(domains)))
    share = _number(ctx, ev.get("search_share", DEFAULT_SEARCH_SHARE), ("evaluation", "search_share"))
    if not 0 < share < 1:
        raise ctx.fail(("evaluation", "search_share"), f"must be between 0 and 1 (exclusive): the rest is the test split, got {share!r}")
    tokens = ev.get("tokens")
    if tokens is not None:
        tokens = _int(ctx, tokens, ("evaluation", "tokens"), 2)
    seq_len = _int(ctx, ev.get("seq_len", DEFAULT_SEQ_LEN), ("evaluation", "seq_len"), 2)
    batch = _int(ctx, ev.get("batch_size", DEFAULT_BATCH_SIZE), ("evaluation", "batch_size"), 1)

    space = _space(ctx, data.get("space") or {}, len(experts))
    fidelity = _fidelity(ctx, data.get("fidelity"))

    # objectives
    if data.get("objective") is not None and data.get("objectives") is not None:
        raise ctx.fail(("objectives",), "give either 'objective' or 'objectives', not both")
    objectives = data.get("objectives", data.get("objective", "loss" if space.drop is not None else "mean"))
    key = "objectives" if "objectives" in data else "objective"
    objectives = objectives_list(objectives, list(experts), general, where=lambda msg: ctx.fail((key,), msg))

    optimizer = data.get("optimizer", "default")
    if not isinstance(optimizer, str):
        raise ctx.fail(("optimizer",), f"optimizer is a name, got {optimizer!r}")
    from .optimizers import OPTIMIZERS

    try:
        optimizer = OPTIMIZERS.get(optimizer).name
    except UnknownName as e:
        raise ctx.fail(("optimizer",), str(e)) from None
    problem = OPTIMIZERS.get(optimizer).problem(space)
    if problem:
        raise ctx.fail(("optimizer",), problem)

    budget = data.get("budget")
    if budget is not None:
        budget = _int(ctx, budget, ("budget",), 1)
    time = data.get("time")
    if time is not None:
        try:
            time = parse_time(time)
        except SpliceError as e:
            raise ctx.fail(("time",), e.problem if hasattr(e, "problem") else str(e)) from None
    seed = _int(ctx, data.get("seed", 0), ("seed",), 0)
    threads = data.get("threads")
    if threads is not None:
        threads = _int(ctx, threads, ("threads",), 1)
    return SearchSpec(
        base=base,
        experts=experts,
        domains=domains,
        general=general,
        search_share=share,
        tokens=tokens,
        seq_len=seq_len,
        batch_size=batch,
        space=space,
        objectives=objectives,
        optimizer=optimizer,
        budget=budget,
        time=time,
        seed=seed,
        threads=threads,
        fidelity=fidelity,
        file=file,
        raw=json.loads(json.dumps(data, default=str)),
    )


def objectives_list(value: Any, expert_domains: list[str], general: str | None, *, where) -> list[str]:
    """Objective names (a name, a comma-separated string or a list), each known; ``where(msg)`` makes the error."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise where(f"objectives are names ({', '.join([*OBJECTIVES, *expert_domains])}), got {value!r}")
    names = [n.strip() for n in names]
    valid = [*OBJECTIVES, *expert_domains]
    for n in names:
        if n not in valid:
            raise where(unknown_choice(f"objective {n!r}", n, valid))
        if n != "loss" and not expert_domains:
            raise where(f"objective {n!r} scores against the experts' gains and the spec has no experts; use 'loss'")
        if n == "forgetting" and general is None:
            raise where("objective 'forgetting' needs evaluation.general (the domain no expert was tuned on)")
    if len(set(names)) != len(names):
        raise where(f"objective named twice in {names}")
    return names


def registry_range(p) -> tuple[float, float] | None:
    """A parameter's range in the methods registry as a closed search interval (an open end moved in by
    ``OPEN_END_MARGIN`` of the span), or None when it is unbounded."""
    r = p.range
    if not (math.isfinite(r.low) and math.isfinite(r.high)):
        return None
    margin = OPEN_END_MARGIN * (r.high - r.low)
    return (r.low + margin if r.low_open else r.low, r.high - margin if r.high_open else r.high)


def _number(ctx: SchemaContext, v: Any, path: tuple) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ctx.fail(path, f"must be a number, got {v!r}")
    return float(v)


def _int(ctx: SchemaContext, v: Any, path: tuple, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ctx.fail(path, f"must be an integer >= {minimum}, got {v!r}")
    return v


def _space(ctx: SchemaContext, data: Any, n_experts: int) -> SpaceSpec:
    from ..methods import get_method, known_param_names

    data = check_keys(ctx, data, ("space",), SPACE_KEYS, "'space'")
    if data.get("drop") is not None:
        return _drop_space(ctx, data)
    if n_experts == 0:
        raise ctx.fail(("models",), "missing 'experts': a merge space merges experts (a drop space, space.drop, needs none)")
    methods = data.get("methods", list(DEFAULT_METHODS))
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list) or not methods:
        raise ctx.fail(("space", "methods"), "methods must be a non-empty list of merge method names")
    names = []
    for i, m in enumerate(methods):
        try:
            method = get_method(m)
        except UnknownName as e:
            raise ctx.fail(("space", "methods", i), str(e)) from None
        lo, hi = method.min_models, method.max_models
        if n_experts < lo or (hi is not None and n_experts > hi):
            raise ctx.fail(("space", "methods", i), f"merge method {method.name!r} cannot merge {n_experts} experts")
        if method.name == "passthrough":
            raise ctx.fail(("space", "methods", i), "passthrough copies one model: there is nothing to search")
        if method.name in names:
            raise ctx.fail(("space", "methods", i), f"merge method {method.name!r} is listed twice")
        names.append(method.name)

    gran = data.get("granularity", "global")
    groups = 1
    if isinstance(gran, dict):
        if list(gran) != ["groups"]:
            raise ctx.fail(("space", "granularity"), "granularity is global, per-layer or {groups: G}")
        groups = _int(ctx, gran["groups"], ("space", "granularity", "groups"), 1)
        gran = "groups"
    elif gran == "groups":
        raise ctx.fail(("space", "granularity"), "groups needs a count: granularity: {groups: 3}")
    elif gran not in GRANULARITIES:
        raise ctx.fail(("space", "granularity"), unknown_choice(f"granularity {gran!r}", gran, list(GRANULARITIES)))
    split = data.get("split_attention_mlp", False)
    if not isinstance(split, bool):
        raise ctx.fail(("space", "split_attention_mlp"), f"must be true or false, got {split!r}")

    used = [get_method(m) for m in names]
    taken = {p.name for m in used for p in m.params}
    params: dict[str, ParamRange] = {}
    given = data.get("params") or {}
    if not isinstance(given, dict):
        raise ctx.fail(("space", "params"), "params must be a mapping: parameter -> [low, high] (searched) or a value (fixed)")
    for k, v in given.items():
        path = ("space", "params", k)
        if k not in taken:
            if k in known_param_names():
                raise ctx.fail(path, f"parameter {k!r} is not taken by any of the space's methods ({', '.join(names)})")
            valid = sorted(taken)
            raise ctx.fail(path, unknown_choice(f"parameter {k!r} in the space", k, valid))
        owners = [m for m in used if m.param(k) is not None]
        ps = [m.param(k) for m in owners]
        if any(p.kind == "bool" for p in ps):
            if not isinstance(v, bool):
                raise ctx.fail(path, f"{k!r} is true or false (a boolean is fixed, not searched), got {v!r}")
            params[k] = ParamRange(k, fixed=v)
            continue
        integer = all(p.kind == "int" for p in ps)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            for m, p in zip(owners, ps):
                problem = p.problem(v)
                if problem is not None:
                    raise ctx.fail(path, f"{k!r} of merge method {m.name!r} {problem}")
            params[k] = ParamRange(k, fixed=v, integer=integer)
            continue
        if v == "range":  # the registry's range of the parameter, shared by every method that takes it
            bounds = [registry_range(p) for p in ps]
            if any(b is None for b in bounds):
                raise ctx.fail(path, f"{k!r} has no bounded range in the registry; give one: {k}: [low, high]")
            v = [max(b[0] for b in bounds), min(b[1] for b in bounds)]
        if (
            not isinstance(v, list)
            or len(v) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
            or v[0] >= v[1]
        ):
            raise ctx.fail(path, f"a searched parameter is [low, high] with low < high (a number fixes it), got {v!r}")
        for m, p in zip(owners, ps):
            for end in v:
                problem = p.problem(int(end) if integer and float(end).is_integer() else end)
                if problem is not None:
                    raise ctx.fail(path, f"the range {v} leaves the values {k!r} of merge method {m.name!r} can take: {problem}")
        params[k] = ParamRange(k, float(v[0]), float(v[1]), integer=integer)
    for k in DEFAULT_SEARCHED:
        if k in taken and k not in params:
            params[k] = ParamRange(k, *DEFAULT_RANGES[k])
    for m in used:  # a required parameter the space neither searches nor fixes
        for p in m.params:
            if p.required and p.name not in params:
                bounds = registry_range(p)
                if bounds is None:
                    raise ctx.fail(
                        ("space", "params"), f"merge method {m.name!r} needs parameter {p.name!r}: give its range (e.g. {p.name}: [0, 1])"
                    )
                params[p.name] = ParamRange(p.name, *bounds, integer=p.kind == "int")  # slerp's t: its whole range
    return SpaceSpec(names, gran, groups, split, params)


def _drop_space(ctx: SchemaContext, data: dict) -> SpaceSpec:
    """``drop: {count: K}`` or ``drop: {speedup: X}``: which layers of the base to drop (no merge keys beside it, yet)."""
    others = [k for k in data if k != "drop"]
    if others:
        raise ctx.fail(("space", others[0]), "a drop space prunes the base model; merge keys beside space.drop are not supported yet")
    d = check_keys(ctx, data["drop"], ("space", "drop"), DROP_KEYS, "'space.drop'")
    if len(d) != 1:
        raise ctx.fail(("space", "drop"), "give exactly one of count (layers to drop) or speedup (a predicted decode speed-up)")
    if "count" in d:
        return SpaceSpec([], drop={"count": _int(ctx, d["count"], ("space", "drop", "count"), 1), "speedup": None})
    x = _number(ctx, d["speedup"], ("space", "drop", "speedup"))
    if x <= 1:
        raise ctx.fail(("space", "drop", "speedup"), f"must be above 1 (a speed-up), got {x!r}")
    return SpaceSpec([], drop={"count": None, "speedup": x})


def _fidelity(ctx: SchemaContext, data: Any) -> Fidelity | None:
    """``fidelity: {screen_tokens: 128, full_tokens: 1024, keep: 0.25}`` (each optional)."""
    if data is None:
        return None
    d = check_keys(ctx, data, ("fidelity",), FIDELITY_KEYS, "'fidelity'")
    screen = _int(ctx, d["screen_tokens"], ("fidelity", "screen_tokens"), 2) if d.get("screen_tokens") is not None else None
    full = _int(ctx, d["full_tokens"], ("fidelity", "full_tokens"), 2) if d.get("full_tokens") is not None else None
    if screen is not None and full is not None and screen >= full:
        raise ctx.fail(("fidelity", "screen_tokens"), f"the screen ({screen} tokens) must be shorter than the full score ({full})")
    keep = _number(ctx, d.get("keep", DEFAULT_KEEP), ("fidelity", "keep"))
    if not 0 < keep <= 1:
        raise ctx.fail(("fidelity", "keep"), f"must be in (0, 1]: the share of screened candidates re-scored, got {keep!r}")
    return Fidelity(screen, full, keep)
