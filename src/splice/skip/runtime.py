"""Bypass any set of layers, attention blocks or MLP blocks of a loaded ``transformers`` model.

A skip set is a set of units ``(layer, kind)`` with kind ``"layer"`` (the whole
decoder layer), ``"attn"`` or ``"mlp"``. Inside ``skipping(model, units)`` the
model's own forward runs, with the chosen modules replaced by stand-ins:

* a skipped layer returns its input unchanged;
* a skipped attention or MLP block returns zeros, so the residual add keeps the
  stream as it was.

A bypassed layer or attention block still appends placeholder (zero) keys and
values to its slot of the KV cache, so every layer's cache keeps the same
length and the model's own mask and position logic stays right. The
self-speculative decoder removes those placeholders (with the rest of the
draft's cache entries) before the full model verifies the draft, so they are
never attended to by a real query.

Nothing here depends on one model family: the stand-ins are installed as
instance attributes over ``forward`` and removed on exit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextlib import contextmanager

import torch

from .model import SkipError, decoder_layers, sub_block

Unit = tuple[int, str]
KINDS = ("layer", "attn", "mlp")


def parse_units(spec: str, num_layers: int) -> set[Unit]:
    """``"4-9,12,mlp20-22,attn15"`` -> units. Plain numbers are whole layers."""
    units: set[Unit] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(layer|attn|mlp)?(\d+)(?:-(\d+))?", part)
        if not m:
            raise SkipError(f"skip set {spec!r}: cannot read {part!r} (examples: 4-9, 12, mlp20-22, attn15)")
        kind = m.group(1) or "layer"
        a = int(m.group(2))
        b = int(m.group(3)) if m.group(3) else a
        if b < a:
            raise SkipError(f"skip set {spec!r}: range {part!r} goes backwards")
        if b >= num_layers:
            raise SkipError(f"skip set {spec!r}: layer {b} does not exist (the model has {num_layers} layers, 0-{num_layers - 1})")
        units |= {(i, kind) for i in range(a, b + 1)}
    return normalize(units)


def normalize(units: Iterable[Unit]) -> set[Unit]:
    """Fold attn+mlp of one layer into the layer, and drop sub-blocks of skipped layers."""
    units = set(units)
    for i in {i for i, k in units}:
        if (i, "attn") in units and (i, "mlp") in units:
            units -= {(i, "attn"), (i, "mlp")}
            units.add((i, "layer"))
        if (i, "layer") in units:
            units -= {(i, "attn"), (i, "mlp")}
    return units


def format_units(units: Iterable[Unit]) -> str:
    from .plan import _ranges

    units = set(units)
    parts = []
    for kind in KINDS:
        ix = sorted(i for i, k in units if k == kind)
        if ix:
            r = _ranges(ix)
            parts.append(r if kind == "layer" else ",".join(kind + x for x in r.split(",")))
    return ",".join(parts) or "none"


def _cache_of(args, kwargs):
    from transformers.cache_utils import Cache

    for v in list(kwargs.values()) + list(args):
        if isinstance(v, Cache):
            return v
    return None


def pad_cache(cache, layer_idx: int, n: int, kv: tuple[int, int, int] | None = None, like: torch.Tensor | None = None) -> None:
    """Append ``n`` zero keys/values to one layer's cache slot (placeholders for a bypassed layer).

    The shape comes from the slot itself, else from another filled slot, else
    from ``kv`` = (kv heads, key dim, value dim) with ``like``'s batch and dtype.
    """
    if cache is None:
        return
    ref = None
    lays = getattr(cache, "layers", [])
    for j in [layer_idx] + list(range(len(lays))):
        if j < len(lays):
            lay = lays[j]
            if getattr(lay, "is_initialized", False) and getattr(lay, "keys", None) is not None and lay.keys.dim() == 4:
                ref = (lay.keys, lay.values)
                break
    if ref is not None:
        k, v = ref
        kz = k.new_zeros(k.shape[0], k.shape[1], n, k.shape[3])
        vz = v.new_zeros(v.shape[0], v.shape[1], n, v.shape[3])
    elif kv is not None and like is not None:
        kz = like.new_zeros(like.shape[0], kv[0], n, kv[1])
        vz = like.new_zeros(like.shape[0], kv[0], n, kv[2])
    else:
        return
    cache.update(kz, vz, layer_idx)


def kv_shape(model) -> tuple[int, int, int] | None:
    """(kv heads, key dim, value dim) of the model's attention, from its config."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not heads or not hidden:
        return None
    kvh = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or hidden // heads
    return kvh, hd, hd


def crop_cache(cache, length: int) -> None:
    """Cut every layer's cache back to ``length`` positions."""
    for lay in cache.layers:
        cur = lay.get_seq_length() if getattr(lay, "is_initialized", False) else 0
        if cur > length:
            lay.crop(-(cur - length))


class _Shapes:
    """What a layer and an attention block return (a tensor or a tuple), learned from one real call."""

    def __init__(self, model):
        self.layer_tuple: int | None = None
        self.attn_tuple: int | None = None
        layers = decoder_layers(model)
        hooks = [layers[0].register_forward_hook(self._layer)]
        a = sub_block(layers[0], "attn")
        if a is not None:
            hooks.append(a.register_forward_hook(self._attn))
        try:
            with torch.no_grad():
                model(torch.zeros(1, 2, dtype=torch.long), use_cache=False)
        finally:
            for h in hooks:
                h.remove()

    def _layer(self, mod, args, out):
        self.layer_tuple = len(out) if isinstance(out, tuple) else 0

    def _attn(self, mod, args, out):
        self.attn_tuple = len(out) if isinstance(out, tuple) else 0


def _shapes(model) -> _Shapes:
    s = getattr(model, "_splice_shapes", None)
    if s is None:
        s = _Shapes(model)
        model._splice_shapes = s
    return s


def _layer_idx(layer, i: int) -> int:
    a = sub_block(layer, "attn")
    for obj in (a, layer):
        v = getattr(obj, "layer_idx", None)
        if isinstance(v, int):
            return v
    return i


def _skip_layer(idx: int, tuple_len: int, kv):
    def forward(hidden_states, *args, **kwargs):
        pad_cache(_cache_of(args, kwargs), idx, hidden_states.shape[-2], kv, hidden_states)
        if tuple_len:
            return (hidden_states,) + (None,) * (tuple_len - 1)
        return hidden_states

    return forward


def _skip_attn(idx: int, tuple_len: int, kv):
    def forward(hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = kwargs["hidden_states"]
        pad_cache(_cache_of(args, kwargs), idx, hidden_states.shape[-2], kv, hidden_states)
        z = torch.zeros_like(hidden_states)
        return (z,) + (None,) * (tuple_len - 1) if tuple_len else z

    return forward


def _skip_mlp(hidden_states, *args, **kwargs):
    return torch.zeros_like(hidden_states)


def check_units(model, units: Iterable[Unit]) -> set[Unit]:
    layers = decoder_layers(model)
    units = normalize(units)
    for i, k in units:
        if k not in KINDS:
            raise SkipError(f"unknown skip unit kind {k!r} (one of {', '.join(KINDS)})")
        if not 0 <= i < len(layers):
            raise SkipError(f"skip set: layer {i} does not exist (the model has {len(layers)} layers)")
        if k != "layer" and sub_block(layers[i], k) is None:
            raise SkipError(f"skip set: cannot find the {k} block of layer {i} in {type(layers[i]).__name__}")
    return units


@contextmanager
def skipping(model, units: Iterable[Unit]):
    """Run ``model`` with ``units`` bypassed inside the ``with`` block."""
    units = check_units(model, units)
    if not units:
        yield
        return
    layers = decoder_layers(model)
    shapes = _shapes(model)
    kv = kv_shape(model)
    patched = []
    try:
        for i, k in sorted(units):
            layer = layers[i]
            if k == "layer":
                mod, fn = layer, _skip_layer(_layer_idx(layer, i), shapes.layer_tuple or 0, kv)
            elif k == "attn":
                mod, fn = sub_block(layer, "attn"), _skip_attn(_layer_idx(layer, i), shapes.attn_tuple or 0, kv)
            else:
                mod, fn = sub_block(layer, "mlp"), _skip_mlp
            had = "forward" in mod.__dict__
            patched.append((mod, had, mod.__dict__.get("forward")))
            mod.forward = fn
        yield
    finally:
        for mod, had, old in reversed(patched):
            if had:
                mod.forward = old
            else:
                del mod.forward


def bypass_zero_mlps(model) -> list[int]:
    """Permanently bypass MLP blocks whose output projection is all zeros; returns their layers."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        m = sub_block(layer, "mlp")
        if m is None:
            continue
        last = None
        for name, p in m.named_parameters():
            if name.split(".")[0] in ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "out_proj"):
                last = (last or []) + [p]
        if last and all(bool((p == 0).all()) for p in last):
            m.forward = _skip_mlp
            out.append(i)
    model.splice_bypassed_mlps = out
    return out
