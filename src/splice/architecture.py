"""What a tensor name means: which layer it belongs to, what kind of module, embedding or not.

Architecture knowledge is data (a few name patterns and config keys) plus one
small inference step, so Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-2 and most
new decoder-only families work without a class per family.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# "<container>.<index>.<rest>" where the container ends in one of these words.
_LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|block|layer))\.(?P<idx>\d+)\.(?P<rest>.+)$")

# Tensors whose first dimension is the vocabulary.
_VOCAB_PATTERNS = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
    "embed_in.weight",
    "lm_head.weight",
    "embed_out.weight",
)
_OUTPUT_HEADS = ("lm_head.weight", "embed_out.weight")

# Where an output head tied to the input embedding finds its weights when the checkpoint
# stores no head of its own, in the order they are tried.
TIED_EMBEDDING_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "wte.weight", "model.embed_in.weight")

NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# Config lists that hold layer *indices* rather than one entry per layer.
_INDEX_LIST_KEYS = ("mlp_only_layers",)


@dataclass(frozen=True)
class TensorRole:
    name: str
    layer: int | None  # layer index, None for non-layer tensors
    prefix: str | None  # e.g. "model.layers"
    rest: str | None  # name inside the layer, e.g. "self_attn.q_proj.weight"
    kind: str  # "embed", "head", "norm", "attention", "mlp", "other"
    vocab: bool  # first dimension is the vocabulary

    def renamed(self, new_layer: int) -> str:
        if self.layer is None:
            return self.name
        return f"{self.prefix}.{new_layer}.{self.rest}"


def _kind(name: str, in_layer: bool) -> str:
    low = name.lower()
    if any(low.endswith(p) for p in _OUTPUT_HEADS):
        return "head"
    if any(low.endswith(p) for p in _VOCAB_PATTERNS) or "embed" in low or low.endswith(("wpe.weight",)):
        return "embed"
    if "norm" in low or ".ln_" in low or low.startswith("ln_") or re.search(r"(^|\.)ln_?\w*\.", low):
        return "norm"
    if any(k in low for k in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "qkv")):
        return "attention"
    if any(k in low for k in ("mlp", "ffn", "feed_forward", "gate_proj", "up_proj", "down_proj", "experts", "fc1", "fc2", "c_fc")):
        return "mlp"
    return "other"


def classify(name: str) -> TensorRole:
    m = _LAYER_RE.match(name)
    vocab = any(name.endswith(p) for p in _VOCAB_PATTERNS)
    if m:
        return TensorRole(name, int(m.group("idx")), m.group("prefix"), m.group("rest"), _kind(m.group("rest"), True), False)
    return TensorRole(name, None, None, None, _kind(name, False), vocab)


def text_config(config: dict) -> dict:
    """The part of a config that describes the language model (nested for multimodal models)."""
    if not any(k in config for k in NUM_LAYER_KEYS) and isinstance(config.get("text_config"), dict):
        return config["text_config"]
    return config


def num_layers(config: dict, names: Iterable[str] | None = None) -> int:
    cfg = text_config(config)
    for k in NUM_LAYER_KEYS:
        if isinstance(cfg.get(k), int):
            return cfg[k]
    if names is not None:
        idx = [r.layer for r in map(classify, names) if r.layer is not None]
        if idx:
            return max(idx) + 1
    return 0


def layer_prefixes(names: Iterable[str]) -> set[str]:
    return {r.prefix for r in map(classify, names) if r.prefix is not None}


def vocab_size(config: dict) -> int | None:
    v = text_config(config).get("vocab_size")
    return v if isinstance(v, int) else None


def tied_embeddings(config: dict) -> bool:
    cfg = text_config(config)
    if "tie_word_embeddings" in cfg:
        return bool(cfg["tie_word_embeddings"])
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    # transformers' default is True for most families (GPT-2 ties, Llama configs say False explicitly).
    return True


def restack_config(config: dict, layer_sources: list[int]) -> dict:
    """A copy of ``config`` for a model whose layer ``i`` is the old layer ``layer_sources[i]``.

    Sets the layer count and rewrites every per-layer list (length == old layer
    count, e.g. ``layer_types``) and index lists (``mlp_only_layers``).
    """
    import copy

    out = copy.deepcopy(config)
    cfg = text_config(out)
    old = num_layers(cfg)
    new = len(layer_sources)
    for k in NUM_LAYER_KEYS:
        if isinstance(cfg.get(k), int):
            cfg[k] = new
    for k, v in list(cfg.items()):
        if k in _INDEX_LIST_KEYS and isinstance(v, list):
            keep = set(v)
            cfg[k] = [i for i, src in enumerate(layer_sources) if src in keep]
        elif isinstance(v, list) and old and len(v) == old:
            cfg[k] = [v[src] for src in layer_sources]
    # keep max_window_layers etc. within range
    if isinstance(cfg.get("max_window_layers"), int):
        cfg["max_window_layers"] = min(cfg["max_window_layers"], new)
    return out
