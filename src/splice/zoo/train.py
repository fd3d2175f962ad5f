"""A small causal-LM training loop (nanoGPT-style): random windows, AdamW, cosine schedule."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def sample_batch(streams: Sequence[np.ndarray], weights: Sequence[float], batch: int, seq: int, gen) -> torch.Tensor:
    """``batch`` windows of ``seq + 1`` tokens: each row from a stream drawn by weight, at a random offset."""
    import torch

    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    which = torch.multinomial(w / w.sum(), batch, replacement=True, generator=gen).tolist()
    rows = []
    for s in which:
        arr = streams[s]
        hi = len(arr) - seq - 1
        off = int(torch.randint(0, max(1, hi), (1,), generator=gen))
        rows.append(torch.from_numpy(arr[off : off + seq + 1].astype(np.int64)))
    return torch.stack(rows)


def train_lm(
    model,
    streams: Sequence[np.ndarray],
    weights: Sequence[float],
    *,
    steps: int,
    batch: int,
    seq: int,
    lr: float,
    seed: int,
    warmup: int = 0,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    params: list | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> dict:
    """Train ``model`` in place; returns {steps, tokens, seconds, final_loss}."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, eps=1e-8)
    model.train()
    t0 = time.time()
    ema = None
    for step in range(steps):
        if warmup and step < warmup:
            cur = lr * (step + 1) / warmup
        else:
            frac = (step - warmup) / max(1, steps - warmup)
            cur = lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = cur
        x = sample_batch(streams, weights, batch, seq, gen)
        out = model(input_ids=x, labels=x)  # the model shifts labels: seq predictions per row
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        v = loss.item()
        ema = v if ema is None else 0.9 * ema + 0.1 * v
        if progress is not None:
            progress(step + 1, ema)
    model.eval()
    return {
        "steps": steps,
        "tokens": steps * batch * seq,
        "seconds": round(time.time() - t0, 2),
        "final_loss": round(ema or float("nan"), 4),
    }
