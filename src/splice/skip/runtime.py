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

from collections.abc import Iterable
from contextlib import contextmanager

import torch

from .. import architecture as arch
from .errors import SkipError
from .units import KINDS, Unit, normalize

# ------------------------------------------------------------------ model calls with a KV cache


def new_cache(model):
    """An empty KV cache for ``model``."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def forward_logits(model, ids: list[int] | torch.Tensor, cache, keep: int = 1) -> torch.Tensor:
    """Logits [keep, V] (float32) for the last ``keep`` positions of ``ids``, appending them to ``cache``."""
    x = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.long)
    x = x.view(1, -1)
    if getattr(model, "_splice_keep", None) is None:
        import inspect

        model._splice_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    kw = {"logits_to_keep": keep} if model._splice_keep else {}
    out = model(input_ids=x, cache=cache, use_cache=True, **kw)
    return out.logits[0, -keep:].float()


def prefix_cache(model, cache, length: int):
    """A new cache holding the first ``length`` positions of ``cache`` (the original is untouched)."""
    c = new_cache(model)
    for i, lay in enumerate(cache.layers):
        if getattr(lay, "is_initialized", False) and lay.keys is not None and lay.keys.numel():
            c.update(lay.keys[..., :length, :], lay.values[..., :length, :], i)
    return c


# ------------------------------------------------------------------ bypassed units


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
        layers = arch.decoder_layers(model)
        hooks = [layers[0].register_forward_hook(self._layer)]
        a = arch.sub_block(layers[0], "attn")
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
    a = arch.sub_block(layer, "attn")
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
    """``units`` normalized, each checked to exist in ``model`` (a one-line error naming the first that does not)."""
    layers = arch.decoder_layers(model)
    units = normalize(units)
    for i, k in units:
        if k not in KINDS:
            raise SkipError(f"unknown skip unit kind {k!r} (one of {', '.join(KINDS)})")
        if not 0 <= i < len(layers):
            raise SkipError(f"skip set: layer {i} does not exist (the model has {len(layers)} layers)")
        if k != "layer" and arch.sub_block(layers[i], k) is None:
            raise SkipError(f"skip set: cannot find the {k} block of layer {i} in {type(layers[i]).__name__}")
    return units


@contextmanager
def skipping(model, units: Iterable[Unit]):
    """Run ``model`` with ``units`` bypassed inside the ``with`` block."""
    units = check_units(model, units)
    if not units:
        yield
        return
    layers = arch.decoder_layers(model)
    shapes = _shapes(model)
    kv = arch.kv_shape(model.config)
    patched = []
    try:
        for i, k in sorted(units):
            layer = layers[i]
            if k == "layer":
                mod, fn = layer, _skip_layer(_layer_idx(layer, i), shapes.layer_tuple or 0, kv)
            elif k == "attn":
                mod, fn = arch.sub_block(layer, "attn"), _skip_attn(_layer_idx(layer, i), shapes.attn_tuple or 0, kv)
            else:
                mod, fn = arch.sub_block(layer, "mlp"), _skip_mlp
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
    for i, layer in enumerate(arch.decoder_layers(model)):
        m = arch.sub_block(layer, "mlp")
        if m is None:
            continue
        output = [p for name, p in m.named_parameters() if name.split(".")[0] in arch.MLP_OUTPUT_PROJECTIONS]
        if output and all(bool((p == 0).all()) for p in output):
            m.forward = _skip_mlp
            out.append(i)
    model.splice_bypassed_mlps = out
    return out
