"""Multiple-choice accuracy by log-likelihood, for JSONL items ``{"context", "choices", "label"}``.

Each choice is scored by the summed log-probability of its tokens after the
context (context and choice tokenized separately, then joined). ``acc`` picks
the highest sum; ``acc_norm`` divides by the choice's length in bytes first, so
long answers are not penalised for being long.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SpliceError


def read_task(path) -> list[dict]:
    p = Path(path)
    items = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SpliceError(f"{p}: cannot read task ({e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            it = json.loads(line)
        except ValueError:
            raise SpliceError(f"{p}:{i}: not valid JSON") from None
        if not isinstance(it, dict) or not isinstance(it.get("context"), str) or not isinstance(it.get("choices"), list):
            raise SpliceError(f'{p}:{i}: expected {{"context": str, "choices": [str, ...], "label": int}}')
        lab = it.get("label")
        if not isinstance(lab, int) or not 0 <= lab < len(it["choices"]):
            raise SpliceError(f"{p}:{i}: label must be an index into choices")
        items.append(it)
    if not items:
        raise SpliceError(f"{p}: no items")
    return items


def _cache_kw(out) -> dict:
    """A private copy of the model output's key/value cache, under the name this transformers expects."""
    import copy

    if "cache" in out:
        return {"cache": copy.deepcopy(out["cache"])}
    return {"past_key_values": copy.deepcopy(out["past_key_values"])}


def choice_logprobs(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Summed log-probability of each choice's tokens after the context.

    The context is run once; each choice continues from a copy of its key/value cache.
    """
    import torch
    import torch.nn.functional as F

    from .perplexity import adds_bos

    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    bos = adds_bos(tokenizer)
    if bos is not None:
        ctx = [bos] + ctx
    if not ctx:
        raise ValueError("empty context")
    out = []
    with torch.inference_mode():
        first = model(input_ids=torch.tensor([ctx]), use_cache=True)
        last = F.log_softmax(first.logits[0, -1].float(), dim=-1)
        for c in choices:
            ids = tokenizer(c, add_special_tokens=False)["input_ids"]
            if not ids:
                out.append(0.0)
                continue
            total = float(last[ids[0]])
            if len(ids) > 1:
                o = model(input_ids=torch.tensor([ids[:-1]]), use_cache=True, **_cache_kw(first))
                lp = F.log_softmax(o.logits[0].float(), dim=-1)
                total += float(lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
            out.append(total)
    return out


def multiple_choice(model, tokenizer, items: list[dict], progress=None) -> dict:
    correct = correct_norm = 0
    for it in items:
        lps = choice_logprobs(model, tokenizer, it["context"], it["choices"])
        norm = [lp / max(1, len(c.encode("utf-8"))) for lp, c in zip(lps, it["choices"])]
        correct += int(max(range(len(lps)), key=lps.__getitem__) == it["label"])
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == it["label"])
        if progress is not None:
            progress(1)
    n = len(items)
    chance = sum(1 / len(it["choices"]) for it in items) / n
    return {"acc": round(correct / n, 4), "acc_norm": round(correct_norm / n, 4), "n": n, "chance": round(chance, 4)}
