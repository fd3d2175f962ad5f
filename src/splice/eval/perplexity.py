"""Per-domain language-model loss, perplexity and bits per byte.

The text is tokenized once, cut to ``max_tokens``, and split into consecutive,
non-overlapping windows of ``seq_len`` tokens. Inside each window every token
but the first is predicted from the ones before it, so a model is scored on
exactly the same tokens whatever the batch size. Bits per byte divides the
summed negative log-likelihood (in bits) by the UTF-8 bytes of the text those
predicted tokens cover, which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class DomainResult:
    loss: float  # mean negative log-likelihood per predicted token (nats)
    ppl: float
    bpb: float  # bits per UTF-8 byte of the predicted text
    tokens: int  # predicted tokens
    bytes: int

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def read_text(path) -> str:
    """Plain text, or JSONL with a "text" field per line (documents joined by blank lines)."""
    import json
    from pathlib import Path

    from ..errors import SpliceError

    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpliceError(f"{p}: cannot read text ({e})") from None
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    raise SpliceError(f'{p}:{i}: expected a JSON object with a "text" field') from None
        return "\n\n".join(docs)
    return raw


def adds_bos(tokenizer) -> int | None:
    """The BOS id if this tokenizer puts one in front of text by default (Gemma, Llama 2/3), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def windows(tokenizer, text: str, seq_len: int, max_tokens: int | None):
    """(list of token-id windows, list of byte counts per window) for ``text``.

    Models whose tokenizer adds a BOS token get it in front of every window (as
    context, never scored), since some (Gemma) behave badly without it; then
    every text token of the window is scored. Otherwise the window's first token
    is the context.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = enc["input_ids"]
    offs = enc["offset_mapping"]
    if max_tokens:
        ids, offs = ids[:max_tokens], offs[:max_tokens]
    bos = adds_bos(tokenizer)
    step = seq_len - 1 if bos is not None else seq_len
    out, nbytes = [], []
    for s in range(0, len(ids), step):
        w = ids[s : s + step]
        o = offs[s : s + step]
        if bos is not None:
            if not w:
                break
            # bytes of all the window's text tokens
            nbytes.append(len(text[o[0][0] : o[-1][1]].encode("utf-8")))
            out.append([bos] + w)
            continue
        if len(w) < 2:
            break
        # bytes covered by the predicted tokens 1..n-1: from the end of token 0 to the end of the last
        nbytes.append(len(text[o[0][1] : o[-1][1]].encode("utf-8")))
        out.append(w)
    return out, nbytes


def padded_batch(chunk: list[list[int]], pad_id: int):
    """Token windows as a right-padded ``input_ids`` tensor and its ``attention_mask``."""
    import torch

    n = max(len(w) for w in chunk)
    ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), n), dtype=torch.long)
    for i, w in enumerate(chunk):
        ids[i, : len(w)] = torch.tensor(w)
        mask[i, : len(w)] = 1
    return ids, mask


def nll_windows(model, wins: list[list[int]], batch_size: int, pad_id: int, progress=None) -> list[tuple[float, int]]:
    """Summed NLL (nats) and predicted-token count for each window."""
    import torch
    import torch.nn.functional as F

    res: list[tuple[float, int]] = []
    with torch.inference_mode():
        for b in range(0, len(wins), batch_size):
            chunk = wins[b : b + batch_size]
            ids, mask = padded_batch(chunk, pad_id)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            lp = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            m = mask[:, 1:].float()
            for i in range(len(chunk)):
                res.append((float((lp[i] * m[i]).sum()), int(m[i].sum())))
            if progress is not None:
                progress(len(chunk))
    return res


def domain_loss(
    model, tokenizer, text: str, *, seq_len: int = 256, max_tokens: int | None = None, batch_size: int = 8, progress=None
) -> DomainResult:
    wins, nbytes = windows(tokenizer, text, seq_len, max_tokens)
    if not wins:
        from ..errors import SpliceError

        raise SpliceError("evaluation text is empty (fewer than 2 tokens)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    res = nll_windows(model, wins, batch_size, pad, progress)
    nll = sum(r[0] for r in res)
    ntok = sum(r[1] for r in res)
    nb = max(1, sum(nbytes))
    loss = nll / ntok
    return DomainResult(loss=loss, ppl=math.exp(min(loss, 50.0)), bpb=nll / math.log(2) / nb, tokens=ntok, bytes=nb)
