"""Space (a), merge parameters: genes an optimizer proposes, decoded into an ordinary recipe.

A candidate is a flat mapping gene name -> value. Its genes are

- ``method``: which merge method (a categorical, only when the space lists several);
- for every searched parameter the method takes, one value per expert (per-model
  parameters such as ``weight``, ``density``) or one value (global ones such as
  ``lambda``), times the granularity's positions, times the parts.

Granularity ``global`` is one position; ``groups: G`` is G anchors of a gradient
(mergekit's list form, interpolated linearly over relative depth); ``per-layer`` is
one value per layer (a list of L values: the gradient's anchors fall exactly on the
layers). With ``split_attention_mlp`` every value is three: ``filter: self_attn``,
``filter: mlp`` and the rest (norms, embeddings, head). Tensors outside the layers
(embeddings, final norm, head) take the first position, as in mergekit (t = 0).

Gene names read as the recipe they become: ``weight[code]``, ``density[news]@mlp#1``
(expert ``news``, the MLP part, position 1).

Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .spec import SearchSpec

PARTS = (("attn", "self_attn"), ("mlp", "mlp"), ("rest", None))  # (gene suffix, recipe filter) when attention and MLP are split
START_DENSITY = 0.5  # the hand-tuned TIES density the baseline uses


@dataclass(frozen=True)
class Gene:
    """One value an optimizer proposes: a float or int in [low, high], or one of ``choices``."""

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float = 0.0
    high: float = 1.0
    choices: tuple = ()


class MergeSpace:
    """The merge-parameter space of a spec, for a base model with ``n_layers`` layers.

    Args:
        spec: the validated spec (its ``space``, ``base`` and ``experts``).
        n_layers: the base's layer count (per-layer granularity has one value per layer).
    """

    kind = "merge"

    def __init__(self, spec: SearchSpec, n_layers: int):
        from ..methods import get_method

        self.spec = spec
        self.space = spec.space
        self.experts = list(spec.experts)
        self.n_layers = n_layers
        self.methods = {m: get_method(m) for m in self.space.methods}
        if self.space.granularity == "per-layer":
            self.positions = n_layers
        elif self.space.granularity == "groups":
            self.positions = self.space.groups
        else:
            self.positions = 1
        self.parts = PARTS if self.space.split_attention_mlp else ((None, None),)

    def describe(self) -> str:
        return f"{len(self.methods)} method(s), {len(self.all_genes())} genes"

    def label(self, params: dict) -> str:
        return self.method_of(params)

    def baselines(self) -> list[tuple[str, dict]]:
        """Each method at its hand-tuned point (where the default optimizer starts), for the leaderboard."""
        return [(f"hand-tuned {m}", self.start(m)) for m in self.methods]

    # ------------------------------------------------------------ genes

    def method_gene(self) -> Gene | None:
        names = list(self.methods)
        return Gene("method", "categorical", choices=tuple(names)) if len(names) > 1 else None

    def _slots(self, param: str, per_model: bool) -> list[tuple[str | None, str | None, int, str]]:
        """(expert, part suffix, position, gene name) for every value of one parameter."""
        out = []
        for expert in self.experts if per_model else [None]:
            for part, _ in self.parts:
                for pos in range(self.positions):
                    name = param + (f"[{expert}]" if expert is not None else "")
                    name += f"@{part}" if part is not None else ""
                    name += f"#{pos}" if self.positions > 1 else ""
                    out.append((expert, part, pos, name))
        return out

    def genes(self, method: str) -> list[Gene]:
        """The numeric genes of ``method`` (the space's searched parameters it takes), in a fixed order."""
        m = self.methods[method]
        genes = []
        for p in m.params:  # the method's own order: weight, density, ..., then global ones
            pr = self.space.params.get(p.name)
            if pr is None or not pr.searched:
                continue
            kind = "int" if pr.integer else "float"
            genes += [Gene(name, kind, pr.low, pr.high) for *_, name in self._slots(pr.name, p.per_model)]
        return genes

    def all_genes(self) -> list[Gene]:
        """Every gene of every method, each once (the method gene first)."""
        seen: dict[str, Gene] = {}
        mg = self.method_gene()
        if mg is not None:
            seen[mg.name] = mg
        for m in self.methods:
            for g in self.genes(m):
                seen.setdefault(g.name, g)
        return list(seen.values())

    def propose(self, suggest: Callable[[Gene], Any], method: str | None = None) -> dict[str, Any]:
        """A candidate: ``suggest`` gives each gene's value (the method gene first, unless ``method`` fixes it)."""
        params: dict[str, Any] = {}
        mg = self.method_gene()
        if method is None:
            method = suggest(mg) if mg is not None else next(iter(self.methods))
        if mg is not None:
            params["method"] = method
        for g in self.genes(method):
            params[g.name] = suggest(g)
        return params

    def method_of(self, params: dict[str, Any]) -> str:
        return params.get("method", next(iter(self.methods)))

    def start(self, method: str) -> dict[str, Any]:
        """The hand-tuned candidate of ``method``: equal weights 1/n, density 0.5, other parameters at their defaults.

        Each value is clipped into its searched range; the default optimizer sweeps these first.
        """
        m = self.methods[method]

        def value(g: Gene) -> Any:
            pname = g.name.split("[")[0].split("@")[0].split("#")[0]
            p = m.param(pname)
            if pname == "weight":
                v = 1.0 / len(self.experts)
            elif pname == "density":
                v = START_DENSITY
            elif p is not None and not p.required and isinstance(p.default, (int, float)):
                v = p.default
            else:
                v = (g.low + g.high) / 2
            v = min(max(v, g.low), g.high)
            return int(round(v)) if g.kind == "int" else float(v)

        return self.propose(value, method=method)

    # ------------------------------------------------------------ decoding

    def _setting(self, params: dict[str, Any], param: str, expert: str | None) -> Any:
        """The recipe value of one parameter (for one expert): a number, a gradient list, or [{filter, value}]."""
        by_part = []
        for part, flt in self.parts:
            vals = [params[name] for e, pt, _, name in self._slots(param, expert is not None) if e == expert and pt == part]
            by_part.append((flt, vals[0] if len(vals) == 1 else vals))
        if len(by_part) == 1:
            return by_part[0][1]
        return [{"filter": f, "value": v} if f is not None else {"value": v} for f, v in by_part]

    def decode(self, params: dict[str, Any]) -> dict:
        """The ordinary recipe (a dict, as YAML would give it) a candidate stands for; ``splice merge`` runs it."""
        method = self.method_of(params)
        m = self.methods[method]
        per_model: dict[str, dict] = {e: {} for e in self.experts}
        global_params: dict[str, Any] = {}
        for pr in self.space.params.values():
            p = m.param(pr.name)
            if p is None:
                continue
            if p.per_model:
                for e in self.experts:
                    per_model[e][pr.name] = pr.fixed if not pr.searched else self._setting(params, pr.name, e)
            else:
                global_params[pr.name] = pr.fixed if not pr.searched else self._setting(params, pr.name, None)
        recipe: dict[str, Any] = {"merge_method": method}
        if m.base != "none":
            recipe["base_model"] = self.spec.base
        recipe["models"] = [
            {"model": self.spec.experts[e], "parameters": per_model[e]} if per_model[e] else {"model": self.spec.experts[e]}
            for e in self.experts
        ]
        if global_params:
            recipe["parameters"] = global_params
        return recipe
