"""The cost model of skipping: parameters a token goes through, per layer and per MLP block. Torch-free.

Per-token work is taken as the parameters of every matrix a token passes
through. The embedding lookup costs nothing; the output head (``lm_head``, or
the tied embedding) is paid on every token. Attention over the context is left
out, which is right for the short contexts of decoding benchmarks and
optimistic for long ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from .. import architecture as arch
from .errors import SkipError


@dataclass
class LayerCosts:
    """Parameters touched per token: per layer, per MLP block, and outside the layers."""

    num_layers: int
    layer: list[int]  # parameters of each layer
    mlp: list[int]  # parameters of each layer's MLP block
    fixed: int  # per-token work outside the layers (the output head)
    total_params: int  # every stored parameter (embeddings included)
    mlp_output: dict[int, list[str]] = field(default_factory=dict)  # layer -> MLP output tensor names

    @property
    def compute_total(self) -> int:
        return self.fixed + sum(self.layer)

    def compute_without(self, layers: Iterable[int] = (), mlps: Iterable[int] = ()) -> int:
        layers = set(layers)
        out = self.compute_total - sum(self.layer[i] for i in layers)
        return out - sum(self.mlp[i] for i in set(mlps) - layers)

    def params_without(self, layers: Iterable[int] = (), mlps: Iterable[int] = ()) -> int:
        """Stored parameters after dropping; a dropped MLP block still stores its (zeroed) weights."""
        return self.total_params - sum(self.layer[i] for i in set(layers))

    def speedup(self, layers: Iterable[int] = (), mlps: Iterable[int] = ()) -> float:
        rest = self.compute_without(layers, mlps)
        return self.compute_total / rest if rest > 0 else math.inf


def layer_costs(src) -> LayerCosts:
    """The cost model of a checkpoint, from its tensor names and shapes alone (nothing is loaded).

    Args:
        src: an open ``ModelSource``.

    Returns:
        Its :class:`LayerCosts`, with the names of each layer's MLP output projection.
    """
    names = src.keys()
    n = arch.num_layers(src.config, names)
    if n <= 0 or not any(arch.classify(k).layer is not None for k in names):
        raise SkipError(f"model {src.name}: cannot find its decoder layers (no tensors named like model.layers.N.*)")
    layer = [0] * n
    mlp = [0] * n
    mlp_out: dict[int, list[str]] = {}
    total = 0
    head = 0
    embed = 0
    for k in names:
        numel = math.prod(src.info(k).shape)
        total += numel
        r = arch.classify(k)
        if r.layer is not None:
            if r.layer >= n:
                raise SkipError(f"model {src.name}: tensor {k} is in layer {r.layer} but the config says {n} layers")
            layer[r.layer] += numel
            if r.kind == "mlp":
                mlp[r.layer] += numel
                if any(r.rest.startswith(p + ".") for p in arch.MLP_OUTPUT_NAMES):
                    mlp_out.setdefault(r.layer, []).append(k)
        elif r.kind == "head":
            head += numel
        elif r.kind == "embed" and r.vocab:
            embed = max(embed, numel)
    if any(c == 0 for c in layer):
        missing = [i for i, c in enumerate(layer) if c == 0]
        raise SkipError(f"model {src.name}: layers {missing} have no tensors; cannot find its decoder layers")
    return LayerCosts(n, layer, mlp, head or embed, total, mlp_out)


def unit_params(model) -> tuple[list[int], list[int], int]:
    """The same costs for a loaded model: parameters of each layer's attention and MLP block, and of the output head."""
    attn, mlp = [], []
    for layer in arch.decoder_layers(model):
        m = arch.sub_block(layer, "mlp")
        total = sum(p.numel() for p in layer.parameters())
        mp = sum(p.numel() for p in m.parameters()) if m is not None else 0
        mlp.append(mp)
        attn.append(total - mp)
    head = model.get_output_embeddings()
    return attn, mlp, (head.weight.numel() if head is not None else 0)
