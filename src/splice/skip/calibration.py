"""Calibration statistics: how the residual stream moves across every layer and MLP block, on real text.

``stream_hooks`` records, for one forward pass, the stream entering each decoder
layer, entering its MLP block's norm, and leaving it; ``hidden_stats`` turns
those into mean cosine and angular distances over calibration tokens, which
the data-aware strategies rank layers by. The self-speculative decoder's
``auto`` policy uses the same hooks on the prompt.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import architecture as arch
from ..errors import option
from .errors import SkipError

# ------------------------------------------------------------------ text


def read_text_file(path: str | os.PathLike, what: str, *, errors: str = "strict", allow_empty: bool = False) -> str:
    """The text of ``path`` (UTF-8); a one-line error naming ``what`` when it is missing, unreadable, not text or empty."""
    p = Path(path)
    if not p.is_file():
        raise SkipError(f"{what} {p} not found")
    try:
        text = p.read_text(encoding="utf-8", errors=errors)
    except OSError as e:
        raise SkipError(f"{what} {p}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise SkipError(f"{what} {p}: not UTF-8 text") from None
    if not allow_empty and not text.strip():
        raise SkipError(f"{what} {p} is empty")
    return text


def read_calibration(path: str | os.PathLike | None, needed_by: str) -> str:
    """The calibration text in ``path`` (bytes that are not UTF-8 are replaced); ``needed_by`` names who asked."""
    if path is None:
        raise SkipError(f"{needed_by} needs calibration text: pass {option('calibration', 'FILE')}")
    return read_text_file(path, "calibration file", errors="replace")


def tokenize(tokenizer, text: str, max_tokens: int, source: str = "calibration text") -> torch.Tensor:
    """Token ids (1-D) of ``text``, at most ``max_tokens``, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise SkipError(f"{source}: fewer than 2 tokens")
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def chunks(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Split a 1-D token stream into sequences of ``seq_len`` (the last one may be shorter, never < 2)."""
    out = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    if len(out) > 1 and len(out[-1]) < 2:
        out.pop()
    return out


# ------------------------------------------------------------------ hooks


@contextmanager
def stream_hooks(layers: list) -> Iterator[dict]:
    """Record the residual stream around each decoder layer while the ``with`` block runs the model.

    Yields a dict that each forward pass fills with ``("in", i)`` (entering layer
    ``i``), ``("mid", i)`` (entering its pre-MLP norm; only for layers that have
    one) and ``("out", i)`` (leaving it), detached. The hooks are removed on exit.
    """
    cur: dict = {}

    def pre_layer(i):
        def f(mod, args, kwargs):
            cur[("in", i)] = (args[0] if args else kwargs["hidden_states"]).detach()

        return f

    def post_layer(i):
        def f(mod, args, kwargs, out):
            cur[("out", i)] = (out[0] if isinstance(out, (tuple, list)) else out).detach()

        return f

    def pre_norm(i):
        def f(mod, args):
            cur[("mid", i)] = args[0].detach()

        return f

    hooks = []
    try:
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(pre_layer(i), with_kwargs=True))
            hooks.append(layer.register_forward_hook(post_layer(i), with_kwargs=True))
            norm = arch.pre_mlp_norm(layer)
            if norm is not None:
                hooks.append(norm.register_forward_pre_hook(pre_norm(i)))
        yield cur
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------ statistics


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
    """Run ``sequences`` through ``model`` and gather :class:`HiddenStats`.

    Args:
        model: a loaded ``transformers`` causal LM.
        sequences: 1-D token id tensors (``chunks`` of the calibration text).
        progress: optional ``progress(done, total)`` callback, called after each sequence.

    Returns:
        The statistics; ``mlp_cos`` is NaN when some layer has no norm before its MLP block.
    """
    layers = arch.decoder_layers(model)
    n = len(layers)
    has_mid = all(arch.pre_mlp_norm(layer) is not None for layer in layers)
    acc = _Accumulator(n)
    with stream_hooks(layers) as cur:
        for k, seq in enumerate(sequences):
            cur.clear()
            model(seq.view(1, -1), use_cache=False)
            states = [cur[("in", i)][0] for i in range(n)] + [cur[("out", n - 1)][0]]
            mids = [cur[("mid", i)][0] for i in range(n)] if has_mid else None
            acc.add(states, mids)
            if progress:
                progress(k + 1, len(sequences))
    st = acc.result()
    if not has_mid:
        st.mlp_cos = torch.full((n,), float("nan"), dtype=torch.float64)
    return st
