"""Gate initialisers, one per ``gate_mode``, in a registry keyed by that name.

Each returns router weights ``[layers, experts, hidden]`` for the routed experts
(and the same for shared experts, whose Qwen2-MoE gate is a single row).

- ``hidden``: per layer, the mean router input (after the post-attention norm,
  with the expert's own MLPs in the layers below) over the tokens of the
  expert's positive prompts, minus that of its negative prompts (``hidden_avg``
  is the same; ``hidden_last`` takes each prompt's last token instead of the
  mean over its tokens). The BOS token is never a feature, so an empty prompt
  adds nothing, and an expert whose prompts are all empty starts from zero.
- ``cheap_embed``: the same from the mean token embedding of the prompts, one
  vector repeated for every layer.
- ``random``: standard normal entries (mergekit's ``random``).
- ``uniform_random``: U(-1/sqrt(hidden), 1/sqrt(hidden)), torch.nn.Linear's default.

For ``hidden`` and ``cheap_embed`` the experts' vectors are centred (their mean
over experts removed) before each is scaled to unit length. Softmax ignores a
shift shared by all logits, but normalising uncentred vectors does not: their
large common part makes the expert with the smallest prompt mean win almost
every token. Centring removes that bias; what is left is what tells the
experts' prompts apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import RecipeError
from ..registry import Registry


@dataclass
class GateContext:
    """What an initialiser may use. ``features(slot_index, prompts)`` gives per-layer mean router inputs."""

    recipe: object
    layers: int
    hidden: int
    seed: int
    base_src: object
    embed_name: str | None
    tokenizer: Callable[[], object]
    features: Callable[..., torch.Tensor]  # (slot_index, prompts, last=False) -> [layers, hidden]
    warnings: list[str] = field(default_factory=list)


GateInit = Callable[[GateContext, list], torch.Tensor]
GATE_INITIALISERS: Registry[GateInit] = Registry("gate_mode")


def _generator(seed: int, what: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + sum(map(ord, what))) & ((1 << 62) - 1))


@GATE_INITIALISERS.register("random")
def random_gates(ctx: GateContext, experts: list, what: str = "routed") -> torch.Tensor:
    return torch.randn((ctx.layers, len(experts), ctx.hidden), generator=_generator(ctx.seed, what))


@GATE_INITIALISERS.register("uniform_random")
def uniform_random_gates(ctx: GateContext, experts: list, what: str = "routed") -> torch.Tensor:
    bound = 1.0 / math.sqrt(ctx.hidden)
    u = torch.rand((ctx.layers, len(experts), ctx.hidden), generator=_generator(ctx.seed, what))
    return (u * 2 - 1) * bound


def _center_normalize(vecs: torch.Tensor, center: bool) -> torch.Tensor:
    """vecs [layers, experts, hidden] -> unit rows, centred over experts first when ``center``.

    A row that centring leaves at (numerically) zero stays zero: that expert's
    prompts look like the average, and ``check_gates`` reports it.
    """
    if center and vecs.shape[1] > 1:
        raw = vecs.norm(dim=-1, keepdim=True)
        vecs = vecs - vecs.mean(dim=1, keepdim=True)
        vecs = torch.where(vecs.norm(dim=-1, keepdim=True) <= 1e-6 * raw, torch.zeros_like(vecs), vecs)
    return vecs / vecs.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _hidden(ctx: GateContext, experts: list, what: str, last: bool) -> torch.Tensor:
    out = []
    for i, e in enumerate(experts):
        v = ctx.features(i, e.positive_prompts, last=last)
        if e.negative_prompts:
            v = v - ctx.features(i, e.negative_prompts, last=last)
        out.append(v)
    return _center_normalize(torch.stack(out, dim=1), center=(what == "routed"))


@GATE_INITIALISERS.register("hidden")
def hidden_gates(ctx: GateContext, experts: list, what: str = "routed") -> torch.Tensor:
    return _hidden(ctx, experts, what, last=False)


@GATE_INITIALISERS.register("hidden_avg")
def hidden_avg_gates(ctx: GateContext, experts: list, what: str = "routed") -> torch.Tensor:
    return _hidden(ctx, experts, what, last=False)


@GATE_INITIALISERS.register("hidden_last")
def hidden_last_gates(ctx: GateContext, experts: list, what: str = "routed") -> torch.Tensor:
    return _hidden(ctx, experts, what, last=True)


@GATE_INITIALISERS.register("cheap_embed")
def cheap_embed_gates(ctx: GateContext, experts: list, what: str = "routed") -> torch.Tensor:
    if ctx.embed_name is None:
        raise RecipeError(f"model {ctx.base_src.name}: no token embedding found for gate_mode 'cheap_embed'")
    from .dense import encode

    tok = ctx.tokenizer()
    embed = ctx.base_src.get(ctx.embed_name).to(torch.float32)

    def mean_embed(prompts: list[str]) -> torch.Tensor:
        ids = [t for p in prompts for t in encode(tok, p, 1 << 30)]
        ids = [t for t in ids if 0 <= t < embed.shape[0]]
        return embed[ids].mean(0) if ids else torch.zeros(embed.shape[1])

    out = []
    for e in experts:
        v = mean_embed(e.positive_prompts)
        if e.negative_prompts:
            v = v - mean_embed(e.negative_prompts)
        out.append(v)
    vecs = torch.stack(out)[None].expand(ctx.layers, -1, -1).clone()
    return _center_normalize(vecs, center=(what == "routed"))


def check_gates(gates: torch.Tensor, names: list[str], *, parallel: float = 0.9) -> list[str]:
    """Error on identical gates; warnings for nearly parallel ones (prompts too alike)."""
    layers, n, _ = gates.shape
    warnings = []
    if n < 2:
        return warnings
    unit = gates / gates.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    cos = unit @ unit.transpose(1, 2)  # [layers, n, n]
    for i in range(n):
        for j in range(i + 1, n):
            bad = [l for l in range(layers) if torch.equal(gates[l, i], gates[l, j])]
            if bad:
                where = "every layer" if len(bad) == layers else f"layer{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:8]))}"
                raise RecipeError(
                    f"experts {names[i]} and {names[j]} get identical gates in {where}, so the router cannot tell them apart there; "
                    "give them prompts that differ"
                )
            close = [l for l in range(layers) if cos[l, i, j] > parallel]
            if close:
                where = (
                    "all layers" if len(close) == layers else f"layers {', '.join(map(str, close[:8]))}{' ...' if len(close) > 8 else ''}"
                )
                worst = float(cos[:, i, j].max())
                warnings.append(
                    f"gates of experts {names[i]} and {names[j]} are nearly parallel in {where} (cosine up to {worst:.3f}); "
                    "their prompts look alike, so tokens will be split between them arbitrarily"
                )
    return warnings
