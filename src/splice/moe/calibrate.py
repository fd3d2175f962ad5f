"""Router calibration: train only the gate weights, briefly, on each expert's own text.

Each expert's text is run through the base with that expert's MLPs (what the
MoE computes when it routes that text to that expert), and the router input of
every token is recorded at every layer. The gates are then trained, all
layers at once, to pick the text's own expert (cross-entropy on the router
logits) with the Switch-Transformer load-balancing term

    balance = E * sum_i f_i * P_i

(f_i: share of tokens whose top choice is expert i, P_i: mean router
probability of expert i) so that no expert is starved. Everything else stays
frozen, so a few hundred full-batch Adam steps on a few thousand tokens per
expert take seconds to minutes on a CPU. A tenth of the tokens is held out to
report routing accuracy before and after.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import RecipeError


def read_documents(path: Path) -> list[str]:
    """Documents of a text file: ``.jsonl`` records' "text", else blocks separated by blank lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read calibration text ({e})") from None
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise RecipeError(f"{path}:{i}: invalid JSON line ({e})") from None
            t = rec.get("text") if isinstance(rec, dict) else rec
            if isinstance(t, str) and t.strip():
                docs.append(t)
        return docs
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def token_sequences(tok, docs: list[str], *, tokens: int, seq_len: int, seed: int) -> list[list[int]]:
    """Up to ``tokens`` tokens from ``docs`` (shuffled with ``seed``), cut into sequences of <= ``seq_len``."""
    from .dense import encode

    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    out, total = [], 0
    for i in order:
        ids = encode(tok, docs[i], 1 << 30)
        bos = [ids[0]] if tok.bos_token_id is not None and ids else []
        body = ids[len(bos) :]
        step = seq_len - len(bos)
        for s in range(0, len(body), step):
            chunk = bos + body[s : s + step]
            if len(chunk) - len(bos) < 4:
                continue
            out.append(chunk)
            total += len(chunk) - len(bos)
            if total >= tokens:
                return out
    return out


@dataclass
class CalibrationResult:
    gates: torch.Tensor  # [layers, experts, hidden]
    steps: int
    tokens: list[int]  # per expert, training tokens
    acc_before: float  # held-out routing accuracy (top-1 == own expert), mean over layers
    acc_after: float
    acc_after_per_expert: list[float]
    seconds: float


def routing_accuracy(gates: torch.Tensor, feats: list[torch.Tensor], labels: torch.Tensor) -> tuple[float, list[float]]:
    """Share of tokens whose top-1 expert is their own, averaged over layers; and per expert."""
    n = gates.shape[1]
    hit = torch.zeros(n)
    cnt = torch.zeros(n)
    for l, x in enumerate(feats):
        top = (x @ gates[l].T).argmax(-1)
        ok = (top == labels).float()
        hit.index_add_(0, labels, ok)
        cnt.index_add_(0, labels, torch.ones_like(ok))
    per = (hit / cnt.clamp(min=1)).tolist()
    return float(hit.sum() / cnt.sum().clamp(min=1)), per


def train_gates(
    init: torch.Tensor,
    feats: list[list[torch.Tensor]],
    *,
    steps: int,
    lr: float = 0.01,
    balance: float = 0.01,
    top_k: int = 1,
    seed: int = 0,
    holdout: float = 0.1,
    batch_tokens: int = 512,
) -> CalibrationResult:
    """``feats[e][l]``: router inputs ``[n_e, hidden]`` of expert e's text at layer l. Returns trained gates."""
    import time

    t0 = time.time()
    layers, n, hidden = init.shape
    g = torch.Generator().manual_seed(seed)
    tr_x: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    va_x: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    tr_y, va_y, counts = [], [], []
    for e in range(n):
        m = feats[e][0].shape[0]
        perm = torch.randperm(m, generator=g)
        nv = int(m * holdout) if m >= 20 else 0
        va, tr = perm[:nv], perm[nv:]
        counts.append(len(tr))
        for l in range(layers):
            tr_x[l].append(feats[e][l][tr])
            va_x[l].append(feats[e][l][va])
        tr_y.append(torch.full((len(tr),), e))
        va_y.append(torch.full((nv,), e))
    X = [torch.cat(xs) for xs in tr_x]
    V = [torch.cat(xs) for xs in va_x]
    y, vy = torch.cat(tr_y), torch.cat(va_y)
    # weight tokens so that every expert counts equally, whatever the size of its text
    w = (1.0 / torch.tensor(counts, dtype=torch.float32).clamp(min=1))[y]
    w = w / w.sum()
    has_val = vy.numel() > 0
    before = routing_accuracy(init, V if has_val else X, vy if has_val else y)[0]

    Xs = torch.stack(X, dim=1)  # [tokens, layers, hidden]: a minibatch is a gather of whole rows
    W = torch.nn.Parameter(init.clone().to(torch.float32))
    opt = torch.optim.Adam([W], lr=lr)
    k = min(top_k, n)
    wl_full = w.repeat(layers) / layers
    total = Xs.shape[0]
    for _ in range(steps):
        opt.zero_grad()
        if total > batch_tokens:  # a minibatch, drawn with each token's weight (every expert equally)
            idx = torch.multinomial(w, batch_tokens, replacement=True, generator=g)
            xb, yb = Xs[idx], y[idx]
            wb = torch.full((layers * batch_tokens,), 1.0 / (layers * batch_tokens))
        else:
            xb, yb, wb = Xs, y, None
        logits = torch.einsum("tlh,leh->lte", xb, W)  # [layers, tokens, experts]
        flat = logits.reshape(-1, n)
        yl = yb.repeat(layers)
        wl = wl_full if wb is None else wb
        loss = (torch.nn.functional.cross_entropy(flat, yl, reduction="none") * wl).sum()
        if balance > 0 and n > 1:
            probs = flat.softmax(-1)
            top = probs.topk(k, dim=-1).indices  # [layers*tokens, k]
            onehot = torch.zeros_like(probs).scatter_(1, top, 1.0)
            f = (onehot * wl[:, None]).reshape(layers, -1, n).sum(1) / k  # [layers, experts]
            P = (probs * wl[:, None]).reshape(layers, -1, n).sum(1)
            loss = loss + balance * n * (f.detach() * P).sum()
        loss.backward()
        opt.step()
    gates = W.detach()
    after, per = routing_accuracy(gates, V if has_val else X, vy if has_val else y)
    return CalibrationResult(gates, steps, counts, before, after, per, time.time() - t0)
