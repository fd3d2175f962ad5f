"""What skipping needs to know about a model: its layers, their cost, and how its hidden states move.

Two views of a model live here:

* the checkpoint view (a ``ModelSource``: names, shapes, config), enough for the
  data-free ``balanced`` plan and for the cost model (parameters touched per
  token, per layer and per MLP block);
* the runtime view (a loaded ``transformers`` model): the decoder layers as
  modules, their attention and MLP sub-blocks, and calibration statistics
  gathered with forward hooks (cosine and angular distance between the hidden
  states around every layer and every MLP block).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import architecture as arch
from ..errors import SpliceError


class SkipError(SpliceError):
    """A bad request to ``splice skip`` / ``splice generate`` (one line: what and where)."""


# ------------------------------------------------------------------ checkpoint view

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
    """Cost model of a ``ModelSource``: per-token work ~ parameters of every matrix a token goes through.

    The embedding lookup costs nothing; the output head (``lm_head``, or the tied
    embedding) is paid on every token. Attention over the context is left out,
    which is right for the short contexts of decoding benchmarks and optimistic
    for long ones.
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
                if any(r.rest.startswith(p + ".") for p in MLP_OUTPUT_NAMES):
                    mlp_out.setdefault(r.layer, []).append(k)
        elif r.kind == "head":
            head += numel
        elif r.kind == "embed" and r.vocab:
            embed = max(embed, numel)
    if any(c == 0 for c in layer):
        missing = [i for i, c in enumerate(layer) if c == 0]
        raise SkipError(f"model {src.name}: layers {missing} have no tensors; cannot find its decoder layers")
    return LayerCosts(n, layer, mlp, head or embed, total, mlp_out)


# ------------------------------------------------------------------ runtime view


def load_model(ref: str | os.PathLike, *, dtype: torch.dtype = torch.float32, skip_zero_mlps: bool = True):
    """A ``transformers`` causal LM (eval mode) and its tokenizer folder for ``ref`` (folder, .safetensors, .gguf).

    With ``skip_zero_mlps``, MLP blocks whose output projection is all zeros (how
    ``splice skip --strategy ffn`` writes dropped MLP blocks) are bypassed at
    run time, so they cost nothing here while plain transformers still loads
    the folder.
    """
    import transformers as tf
    from transformers.utils import logging as hf_logging

    from ..checkpoint.reader import FolderSource, open_model

    src = open_model(ref)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tok_dir = src.tokenizer_dir()
        if isinstance(src, FolderSource) and src.path.is_dir() and (src.path / "config.json").exists():
            try:
                model = tf.AutoModelForCausalLM.from_pretrained(str(src.path), dtype=dtype)
            except (OSError, ValueError, KeyError) as e:
                raise SkipError(f"model {ref}: transformers cannot load it ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        else:
            model = _model_from_source(src, dtype)
    finally:
        src.close()
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    model.splice_tokenizer_dir = str(tok_dir) if tok_dir else None
    model.splice_ref = str(ref)
    if skip_zero_mlps:
        from .runtime import bypass_zero_mlps

        bypass_zero_mlps(model)
    return model


def _model_from_source(src, dtype):
    import transformers as tf

    cfg = dict(src.config)
    mt = cfg.pop("model_type", None)
    for k in ("torch_dtype", "dtype", "transformers_version"):
        cfg.pop(k, None)
    if not mt:
        raise SkipError(f"model {src.name}: config has no model_type; transformers cannot build it")
    try:
        config = tf.AutoConfig.for_model(mt, **cfg)
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError) as e:
        raise SkipError(f"model {src.name}: transformers cannot build a {mt!r} model ({e})") from None
    sd = {k: src.get(k).to(dtype) for k in src.keys()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [m for m in missing if m not in tied and "rotary" not in m]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise SkipError(f"model {src.name}: weights do not fit a {mt!r} model ({what})")
    if tied:
        model.tie_weights()
    return model


def decoder_layers(model) -> list:
    """The decoder layers of a ``transformers`` model, in order."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 and name.split(".")[-1] in ("layers", "h", "blocks", "layer", "block"):
            if n is None or len(mod) == n:
                best = mod
                break
    if best is None:
        raise SkipError(f"{type(model).__name__}: cannot find its decoder layers (no layers/h/blocks module list)")
    return list(best)


_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_PRE_MLP_NORMS = ("post_attention_layernorm", "pre_feedforward_layernorm", "ln_2", "ffn_norm", "post_attention_norm")


def sub_block(layer, kind: str):
    """The attention or MLP module of one decoder layer, or None."""
    for n in _ATTN_NAMES if kind == "attn" else _MLP_NAMES:
        m = getattr(layer, n, None)
        if isinstance(m, torch.nn.Module):
            return m
    return None


def pre_mlp_norm(layer):
    for n in _PRE_MLP_NORMS:
        m = getattr(layer, n, None)
        if isinstance(m, torch.nn.Module):
            return m
    return None


def unit_params(model) -> tuple[list[int], list[int], int]:
    """Per-token work (parameters) of each layer's attention and MLP block, and of the output head."""
    attn, mlp = [], []
    for layer in decoder_layers(model):
        m = sub_block(layer, "mlp")
        total = sum(p.numel() for p in layer.parameters())
        mp = sum(p.numel() for p in m.parameters()) if m is not None else 0
        mlp.append(mp)
        attn.append(total - mp)
    head = model.get_output_embeddings()
    return attn, mlp, (head.weight.numel() if head is not None else 0)


# ------------------------------------------------------------------ calibration


def read_calibration(path: str | os.PathLike | None, strategy: str) -> str:
    if path is None:
        raise SkipError(f"strategy {strategy!r} needs calibration text: pass --calibration FILE")
    p = Path(path)
    if not p.is_file():
        raise SkipError(f"calibration file {p} not found")
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise SkipError(f"calibration file {p}: cannot read it ({e.strerror})") from None
    if not text.strip():
        raise SkipError(f"calibration file {p} is empty")
    return text


def tokenize(model, text: str, max_tokens: int, source: str = "calibration text") -> torch.Tensor:
    """Token ids (1-D) of ``text`` with the model's own tokenizer, at most ``max_tokens``."""
    from transformers import AutoTokenizer

    d = getattr(model, "splice_tokenizer_dir", None)
    if not d:
        raise SkipError(f"model {getattr(model, 'splice_ref', '?')}: no tokenizer files next to it; cannot tokenize the {source}")
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise SkipError(f"{source}: fewer than 2 tokens")
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def chunks(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Split a 1-D token stream into sequences of ``seq_len`` (the last one may be shorter, never < 2)."""
    out = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    if len(out) > 1 and len(out[-1]) < 2:
        out.pop()
    return out


@dataclass
class HiddenStats:
    """Mean similarities between hidden states, over calibration tokens.

    ``cos[a, b]`` and ``angle[a, b]`` (radians) compare the residual stream
    before layer ``a`` with the one before layer ``b`` (index ``L`` is after
    the last layer, before the final norm). ``mlp_cos[i]`` compares the stream
    just before layer ``i``'s MLP block with the layer's output.
    """

    cos: torch.Tensor  # [L+1, L+1]
    angle: torch.Tensor  # [L+1, L+1]
    mlp_cos: torch.Tensor  # [L]
    tokens: int

    @property
    def num_layers(self) -> int:
        return self.cos.shape[0] - 1


class _Accumulator:
    def __init__(self, n: int):
        self.cos = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        self.angle = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        self.mlp_cos = torch.zeros(n, dtype=torch.float64)
        self.tokens = 0

    def add(self, states: list[torch.Tensor], mids: list[torch.Tensor] | None) -> None:
        """``states``: L+1 tensors [T, H] (stream before each layer, then after the last); ``mids``: L tensors [T, H]."""
        x = torch.stack([s.reshape(-1, s.shape[-1]).double() for s in states])  # [L+1, T, H]
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        c = torch.einsum("ath,bth->abt", x, x).clamp(-1.0, 1.0)  # [L+1, L+1, T]
        self.cos += c.sum(-1)
        self.angle += torch.arccos(c).sum(-1)
        if mids is not None:
            m = torch.stack([s.reshape(-1, s.shape[-1]).double() for s in mids])  # [L, T, H]
            after = torch.stack([s.reshape(-1, s.shape[-1]).double() for s in states[1:]])
            self.mlp_cos += _cos_rows(m, after).sum(-1)
        self.tokens += x.shape[1]

    def result(self) -> HiddenStats:
        t = max(self.tokens, 1)
        return HiddenStats(self.cos / t, self.angle / t, self.mlp_cos / t, self.tokens)


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a * b).sum(-1).clamp(-1.0, 1.0)


def stats_from_states(states: list[torch.Tensor], mids: list[torch.Tensor] | None = None) -> HiddenStats:
    """Statistics from given hidden states (L+1 tensors [..., H]; ``mids``: L tensors, the stream before each MLP)."""
    acc = _Accumulator(len(states) - 1)
    acc.add(states, mids)
    return acc.result()


@torch.no_grad()
def hidden_stats(model, sequences: list[torch.Tensor], *, progress=None) -> HiddenStats:
    """Run ``sequences`` through ``model`` and gather :class:`HiddenStats` with forward hooks."""
    layers = decoder_layers(model)
    n = len(layers)
    acc = _Accumulator(n)
    cur: dict = {}
    hooks = []

    def first(x):
        return x[0] if isinstance(x, (tuple, list)) else x

    def pre_layer(i):
        def f(mod, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            cur[("in", i)] = h.detach()

        return f

    def post_layer(i):
        def f(mod, args, kwargs, out):
            cur[("out", i)] = first(out).detach()

        return f

    def pre_norm(i):
        def f(mod, args):
            cur[("mid", i)] = args[0].detach()

        return f

    has_mid = True
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(pre_layer(i), with_kwargs=True))
        hooks.append(layer.register_forward_hook(post_layer(i), with_kwargs=True))
        norm = pre_mlp_norm(layer)
        if norm is None:
            has_mid = False
        else:
            hooks.append(norm.register_forward_pre_hook(pre_norm(i)))
    try:
        for k, seq in enumerate(sequences):
            cur.clear()
            model(seq.view(1, -1), use_cache=False)
            states = [cur[("in", i)][0] for i in range(n)] + [cur[("out", n - 1)][0]]
            mids = [cur[("mid", i)][0] for i in range(n)] if has_mid else None
            acc.add(states, mids)
            if progress:
                progress(k + 1, len(sequences))
    finally:
        for h in hooks:
            h.remove()
    st = acc.result()
    if not has_mid:
        st.mlp_cos = torch.full((n,), float("nan"), dtype=torch.float64)
    return st
