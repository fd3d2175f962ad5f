"""The sampling rule: next-token distributions after temperature/top-k/top-p, and speculative acceptance.

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): keep draft ``x``
with probability ``min(1, p(x)/q(x))``; on the first rejection sample from
``norm(max(p - q, 0))``; after a full acceptance sample from the last ``p``. The
tokens kept are then distributed exactly as tokens sampled from the full
model's ``p`` one at a time.
"""

from __future__ import annotations

import math

import torch

from .errors import check_float, check_int


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """``temperature`` >= 0 (0: greedy), ``top_k`` >= 0 (0: all tokens), ``top_p`` in (0, 1]; else a ``SkipError``."""
    check_float("temperature", temperature, 0.0)
    check_int("top_k", top_k, 0)
    check_float("top_p", top_p, 0.0, 1.0, low_open=True)


def warp(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Next-token probabilities after temperature, top-k and top-p (rows of ``logits``)."""
    x = logits.double() / temperature
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    p = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        sp, si = torch.sort(p, dim=-1, descending=True)
        cum = sp.cumsum(-1)
        drop = cum - sp > top_p  # keep the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter(-1, si, sp)
        p = p / p.sum(-1, keepdim=True)
    return p


def sample_token(p: torch.Tensor, gen: torch.Generator) -> int:
    """One token id drawn from the distribution ``p``."""
    return int(torch.multinomial(p, 1, generator=gen))


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: list[int], gen: torch.Generator) -> tuple[int, int]:
    """Speculative-sampling verification of one draft block.

    Args:
        p: [k+1, V] the full model's distributions (after the pending token and each draft).
        q: [k, V] the draft's distributions.
        drafts: the k tokens drawn from ``q``.
        gen: the random generator.

    Returns:
        (number of drafts kept, the next token). The kept drafts plus the next
        token are distributed exactly as tokens sampled from ``p`` one at a time.
    """
    for i, d in enumerate(drafts):
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if u * float(q[i, d]) < float(p[i, d]):  # u < p/q without dividing
            continue
        res = (p[i] - q[i]).clamp_min(0.0)
        s = float(res.sum())
        return i, sample_token(res / s if s > 0 else p[i], gen)
    return len(drafts), sample_token(p[len(drafts)], gen)
