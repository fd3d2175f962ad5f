"""The MoE recipe: mergekit-moe's YAML keys and meanings, validated with one-line errors.

    base_model: path/or/id            # attention, norms, embeddings come from here
    gate_mode: hidden                 # hidden | cheap_embed | random | uniform_random (| hidden_avg | hidden_last)
    dtype: bfloat16                   # output dtype (default: the base's)
    experts_per_token: 2
    architecture: mixtral             # optional: mixtral | qwen2_moe | qwen3_moe (default: inferred)
    experts:
      - source_model: path/to/expert
        positive_prompts: ["..."]
        negative_prompts: ["..."]     # optional
        prompts_file: prompts.txt     # optional: one prompt per line (or .jsonl with "text")
        calibration_file: text.jsonl  # optional: the expert's own text for --calibrate
        noise_scale: 0.01             # optional: Gaussian noise added to this expert's MLP
        residual_scale: 1.0           # optional: scale of this expert's down projection
    shared_experts: [ {source_model: ..., positive_prompts: [...]} ]   # at most one (Qwen2-MoE)

Relative file paths are resolved against the recipe's folder.

What mergekit-moe 0.1.5 accepts, splice accepts, with two exceptions that
fail with a one-line reason: unknown keys (a misspelt key would be silently
ignored), and prompts that leave two experts' gates identical (the router
could never tell them apart). Empty prompts (``positive_prompts: [""]``) are
kept: under ``cheap_embed`` an empty prompt is the BOS token's embedding, as
in mergekit; under ``hidden`` it carries no content (splice's features never
include the BOS token), so an expert whose prompts are all empty gets what the
other experts' prompts are not (its gate is centred against theirs).
``hidden_avg`` is ``hidden``; ``hidden_last`` uses each prompt's last token
instead of the mean over its tokens.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError
from ..recipe import SchemaContext, _dtype, _model_ref, check_keys, unknown_choice
from ..yamlfile import read_yaml

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random", "hidden_avg", "hidden_last")
PROMPT_MODES = ("hidden", "cheap_embed", "hidden_avg", "hidden_last")  # gate modes that need prompts
ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")
# mergekit's spellings of `architecture` (it matches by prefix of "Mixtral", "Qwen MoE", "Qwen3 MoE")
ARCH_ALIASES = {
    "mixtral": "mixtral",
    "qwen": "qwen2_moe",
    "qwen moe": "qwen2_moe",
    "qwen2": "qwen2_moe",
    "qwen2_moe": "qwen2_moe",
    "qwen2moe": "qwen2_moe",
    "qwen3": "qwen3_moe",
    "qwen3 moe": "qwen3_moe",
    "qwen3_moe": "qwen3_moe",
    "qwen3moe": "qwen3_moe",
}
# mergekit also takes any prefix of its architecture names ("Mixtral", "Qwen MoE", "Qwen3 MoE")
ARCH_NAMES = {"mixtral": "mixtral", "qwen moe": "qwen2_moe", "qwen3 moe": "qwen3_moe"}


def _architecture(key: str) -> str | None:
    if key in ARCH_ALIASES:
        return ARCH_ALIASES[key]
    hits = {v for name, v in ARCH_NAMES.items() if name.startswith(key)} if key else set()
    return hits.pop() if len(hits) == 1 else None


TOP_KEYS = ("base_model", "gate_mode", "dtype", "experts_per_token", "experts", "shared_experts", "architecture", "name")
EXPERT_KEYS = (
    "source_model",
    "positive_prompts",
    "negative_prompts",
    "prompts_file",
    "calibration_file",
    "noise_scale",
    "residual_scale",
)


@dataclass
class Expert:
    source_model: str
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    calibration_file: Path | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None
    where: str = ""  # "file:line: experts[i]" for messages

    def prompt_key(self) -> tuple:
        return (tuple(self.positive_prompts), tuple(self.negative_prompts))


@dataclass
class MoERecipe:
    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] = field(default_factory=list)
    architecture: str | None = None
    name: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def models(self) -> list[str]:
        seen = {self.base_model: None}
        for e in self.experts + self.shared_experts:
            seen[e.source_model] = None
        return list(seen)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False, default_flow_style=None, allow_unicode=True).rstrip()


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per non-empty line; ``.jsonl``: the "text" of each record; ``.json``: a list of strings."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise RecipeError(f"{path}:{i}: invalid JSON line ({e})") from None
                t = rec.get("text") if isinstance(rec, dict) else rec
                if not isinstance(t, str):
                    raise RecipeError(f"{path}:{i}: expected a string or an object with a 'text' string")
                out.append(t)
        return out
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
            raise RecipeError(f"{path}: expected a JSON list of strings")
        return data
    return [line.strip() for line in text.splitlines() if line.strip()]


def _prompts(ctx: SchemaContext, v: Any, path: tuple) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ctx.fail(path, f"must be a list of strings, got {v!r}")
    return list(v)  # empty prompts included: under cheap_embed "" is the BOS token, as in mergekit


def _number(ctx: SchemaContext, v: Any, path: tuple, *, positive: bool = False) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ctx.fail(path, f"must be a number, got {v!r}")
    if v < 0 or (positive and v == 0):
        raise ctx.fail(path, f"must be {'positive' if positive else 'non-negative'}, got {v!r}")
    return float(v)


def _file(ctx: SchemaContext, v: Any, path: tuple, base_dir: Path | None) -> Path:
    if not isinstance(v, str) or not v.strip():
        raise ctx.fail(path, f"must be a file path, got {v!r}")
    p = Path(v).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    if not p.is_file():
        raise ctx.fail(path, f"file {v!r} not found")
    return p


def _expert(ctx: SchemaContext, data: Any, path: tuple, base_dir: Path | None) -> Expert:
    if isinstance(data, str):
        data = {"source_model": data}
    check_keys(ctx, data, path, EXPERT_KEYS, "an expert")
    if "source_model" not in data:
        raise ctx.fail(path, "missing 'source_model'")
    e = Expert(source_model=_model_ref(ctx, data["source_model"], path + ("source_model",)), where=ctx.where(path))
    e.positive_prompts = _prompts(ctx, data.get("positive_prompts"), path + ("positive_prompts",))
    e.negative_prompts = _prompts(ctx, data.get("negative_prompts"), path + ("negative_prompts",))
    if data.get("prompts_file") is not None:
        f = _file(ctx, data["prompts_file"], path + ("prompts_file",), base_dir)
        try:
            extra = read_prompts_file(f)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ctx.fail(path + ("prompts_file",), f"cannot read {f} ({err})") from None
        if not extra:
            raise ctx.fail(path + ("prompts_file",), f"{f} holds no prompts")
        e.positive_prompts = e.positive_prompts + extra
    if data.get("calibration_file") is not None:
        e.calibration_file = _file(ctx, data["calibration_file"], path + ("calibration_file",), base_dir)
    e.noise_scale = _number(ctx, data.get("noise_scale"), path + ("noise_scale",))
    e.residual_scale = _number(ctx, data.get("residual_scale"), path + ("residual_scale",))
    return e


def parse_moe_recipe(data: Any, *, file: str = "<recipe>", lines: dict | None = None, base_dir: Path | None = None) -> MoERecipe:
    ctx = SchemaContext(file, lines or {})
    data = check_keys(ctx, data, (), TOP_KEYS, "the MoE recipe")
    if "merge_method" in data:
        raise ctx.fail(("merge_method",), "this is a merge recipe; run it with 'splice merge'")
    if data.get("base_model") is None:
        raise ctx.fail((), "missing required key 'base_model'")
    base = _model_ref(ctx, data["base_model"], ("base_model",))

    mode = data.get("gate_mode", "hidden")
    if not isinstance(mode, str) or mode not in GATE_MODES:
        raise ctx.fail(("gate_mode",), unknown_choice(f"gate_mode {mode!r}", mode, GATE_MODES))

    k = data.get("experts_per_token", 2)
    if isinstance(k, float) and k.is_integer():
        k = int(k)  # mergekit (pydantic) takes 2.0 for 2
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ctx.fail(("experts_per_token",), f"must be a positive integer, got {k!r}")

    arch = data.get("architecture")
    if arch is not None:
        found = _architecture(str(arch).strip().lower())
        if found is None:
            raise ctx.fail(("architecture",), f"unsupported output architecture {arch!r} (valid: {', '.join(ARCHITECTURES)})")
        arch = found

    experts_raw = data.get("experts")
    if not isinstance(experts_raw, list) or not experts_raw:
        raise ctx.fail(("experts",) if "experts" in data else (), "'experts' must be a non-empty list")
    experts = [_expert(ctx, e, ("experts", i), base_dir) for i, e in enumerate(experts_raw)]
    if len(experts) < k:
        raise ctx.fail(("experts_per_token",), f"experts_per_token is {k} but there are only {len(experts)} experts")

    shared_raw = data.get("shared_experts") or []
    if not isinstance(shared_raw, list):
        raise ctx.fail(("shared_experts",), "'shared_experts' must be a list")
    if len(shared_raw) > 1:
        raise ctx.fail(("shared_experts",), f"at most one shared expert is supported (Qwen2-MoE), got {len(shared_raw)}")
    shared = [_expert(ctx, e, ("shared_experts", i), base_dir) for i, e in enumerate(shared_raw)]

    if mode in PROMPT_MODES:
        for i, e in enumerate(experts):
            if not e.positive_prompts:
                raise ctx.fail(
                    ("experts", i), f"expert {e.source_model!r} has no positive_prompts (or prompts_file); gate_mode {mode!r} needs them"
                )
        for i, e in enumerate(shared):
            if not e.positive_prompts:
                raise ctx.fail(
                    ("shared_experts", i),
                    f"shared expert {e.source_model!r} has no positive_prompts; gate_mode {mode!r} needs them for its gate",
                )
        if len(experts) > 1 and len({e.prompt_key() for e in experts}) == 1:
            raise ctx.fail(
                ("experts",),
                f"all {len(experts)} experts have the same prompts {experts[0].positive_prompts!r}, so every gate would be the same and "
                "the router could not tell the experts apart (mergekit-moe refuses this too); give each expert prompts of its own, "
                "or use gate_mode 'random' to train the router afterwards",
            )
        seen: dict[tuple, int] = {}
        for i, e in enumerate(experts):
            j = seen.setdefault(e.prompt_key(), i)
            if j != i:
                raise ctx.fail(
                    ("experts", i),
                    f"experts[{j}] and experts[{i}] have identical prompts, so their gates would be identical: the router would "
                    f"always score them alike and pick them together (with experts_per_token 1, experts[{i}] never), so mergekit-moe's "
                    "output for this recipe has the two act as one averaged expert; give each expert prompts of its own",
                )

    name = data.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ctx.fail(("name",), f"name must be a non-empty string, got {name!r}")
    r = MoERecipe(
        base_model=base,
        experts=experts,
        gate_mode=mode,
        dtype=_dtype(ctx, data.get("dtype"), ("dtype",)),
        experts_per_token=k,
        shared_experts=shared,
        architecture=arch,
        name=name,
        raw=copy.deepcopy(data),
    )
    return r


def load_moe_recipe(src: str | Path | dict | MoERecipe) -> MoERecipe:
    """Load one MoE recipe.

    Args:
        src: a YAML file path, YAML text, a dict, or a MoERecipe (returned as is).

    Returns:
        The validated MoERecipe; relative files in it are resolved against its folder.
    """
    if isinstance(src, MoERecipe):
        return src
    if isinstance(src, dict):
        return parse_moe_recipe(src)
    read = read_yaml(src, what="MoE recipe")
    docs = read.documents
    if not docs:
        raise RecipeError(f"{read.file}: the recipe is empty")
    if len(docs) > 1:
        raise RecipeError(f"{read.file}:{docs[1].line}: a MoE recipe is one YAML document; this file holds {len(docs)}")
    base_dir = read.path.resolve().parent if read.path is not None else None
    r = parse_moe_recipe(docs[0].data, file=read.file, lines=docs[0].lines, base_dir=base_dir)
    r.path = read.path
    return r
