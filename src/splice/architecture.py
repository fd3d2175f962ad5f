"""What a tensor or module name means: which layer it belongs to, what kind of module, embedding or not.

Architecture knowledge is data (a few name patterns and config keys) plus one
small inference step, so Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-2 and most
new decoder-only families work without a class per family. Two views of the
same knowledge live side by side:

* the checkpoint view: tensor names and ``config.json`` (``classify``,
  ``num_layers``, ``MLP_OUTPUT_NAMES``, ...), enough to plan without loading;
* the module view: a model loaded in ``transformers`` (``decoder_layers``,
  ``sub_block``, ``pre_mlp_norm``, ``kv_shape``), for code that runs it.

This module imports nothing heavy; the module view imports torch when called.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import CheckpointError

# The names of the list that holds the decoder layers (``model.layers``, GPT-2's ``transformer.h``, ...).
LAYER_CONTAINERS = ("layers", "h", "blocks", "block", "layer")

# Inside a decoder layer: the attention block, the MLP block, and the norm just before the MLP block.
ATTENTION_MODULES = ("self_attn", "attn", "attention", "self_attention")
MLP_MODULES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
PRE_MLP_NORMS = ("post_attention_layernorm", "pre_feedforward_layernorm", "ln_2", "ffn_norm", "post_attention_norm")

# Names (inside a layer) of the tensor that writes an MLP block's result into the
# residual stream; zeroing it (and its bias) makes the block add nothing.
MLP_OUTPUT_NAMES = (
    "mlp.down_proj",
    "mlp.c_proj",
    "mlp.dense_4h_to_h",
    "mlp.fc2",
    "mlp.w2",
    "feed_forward.w2",
    "feed_forward.down_proj",
    "mlp.out_proj",
)
# The same projections as module names inside an MLP block (``down_proj``, ``c_proj``, ...).
MLP_OUTPUT_PROJECTIONS = tuple(dict.fromkeys(n.rsplit(".", 1)[1] for n in MLP_OUTPUT_NAMES))

# Tensors older checkpoints store that the model computes itself (rotary frequencies, GPT-2's causal
# mask); transformers ignores them when loading, and so does splice.
COMPUTED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")

# "<container>.<index>.<rest>" where the container ends in one of these words.
_LAYER_RE = re.compile(rf"^(?P<prefix>(?:.*\.)?(?:{'|'.join(LAYER_CONTAINERS)}))\.(?P<idx>\d+)\.(?P<rest>.+)$")

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
HEAD_COUNT_KEYS = ("num_attention_heads", "n_head")
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd")

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


def _kind(name: str) -> str:
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
        return TensorRole(name, int(m.group("idx")), m.group("prefix"), m.group("rest"), _kind(m.group("rest")), False)
    return TensorRole(name, None, None, None, _kind(name), vocab)


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


# ------------------------------------------------------------------ module view (a loaded transformers model)


def decoder_layers(model) -> list:
    """The decoder layers of a loaded ``transformers`` model, in order.

    Args:
        model: a ``transformers`` causal LM (or any ``torch.nn.Module`` holding its layers in a
            ``ModuleList`` named like ``LAYER_CONTAINERS``).

    Returns:
        The layer modules. The first such list of the configured length wins (the
        decoder's, not a vision tower's).
    """
    import torch

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 and name.split(".")[-1] in LAYER_CONTAINERS:
            if n is None or len(mod) == n:
                return list(mod)
    raise CheckpointError(f"{type(model).__name__}: cannot find its decoder layers (no {'/'.join(LAYER_CONTAINERS)} module list)")


def _child(layer, names: tuple[str, ...]):
    import torch

    for n in names:
        m = getattr(layer, n, None)
        if isinstance(m, torch.nn.Module):
            return m
    return None


def sub_block(layer, kind: str):
    """The attention (``kind="attn"``) or MLP (``kind="mlp"``) module of one decoder layer, or None."""
    return _child(layer, ATTENTION_MODULES if kind == "attn" else MLP_MODULES)


def pre_mlp_norm(layer):
    """The norm a decoder layer applies to the residual stream just before its MLP block, or None."""
    return _child(layer, PRE_MLP_NORMS)


def _first_attr(cfg, keys: tuple[str, ...]):
    for k in keys:
        v = getattr(cfg, k, None)
        if v:
            return v
    return None


def kv_shape(config) -> tuple[int, int, int] | None:
    """(key/value heads, key dim, value dim) of a ``transformers`` config's attention, or None if it does not say."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = _first_attr(cfg, HEAD_COUNT_KEYS)
    hidden = _first_attr(cfg, HIDDEN_SIZE_KEYS)
    if not heads or not hidden:
        return None
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return kv_heads, head_dim, head_dim
