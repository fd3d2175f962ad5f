"""Vocabulary alignment for embedding and output-head rows when models' vocabularies differ.

``tokenizer_source: base`` keeps the base tokenizer; ``union`` adds every token any
model has; a model reference keeps that model's tokenizer. Each model's
embedding rows are permuted to the output token ids by token string; a token a
model lacks takes the mean of the models that have it.

Without ``tokenizer_source``, models whose embedding row counts differ are
aligned by id to the reference model's row count (mergekit's behaviour), with a
warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import architecture as arch
from .errors import CheckpointError, RecipeError


def load_vocab(src) -> tuple[dict[str, int], set[str]]:
    """token -> id (added tokens included) and the set of special added tokens."""
    d = src.tokenizer_dir()
    if d is None:
        raise CheckpointError(f"model {src.name}: no tokenizer files found (needed to align vocabularies)")
    tj = Path(d) / "tokenizer.json"
    if tj.exists():
        vocab = _read_tokenizer_json(tj).get_vocab(with_added_tokens=True)
        special = set()
        try:
            data = json.loads(tj.read_text(encoding="utf-8"))
            special = {a["content"] for a in data.get("added_tokens", []) if a.get("special")}
        except (OSError, ValueError):
            pass
        return vocab, special
    try:
        from .hf import load_tokenizer

        tok = load_tokenizer(d)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"model {src.name}: cannot read its tokenizer ({e})") from None
    return tok.get_vocab(), set(tok.all_special_tokens)


@dataclass
class VocabPlan:
    size: int
    mode: str  # "base" | "union" | "model" | "by-id"
    source: str | None  # model whose tokenizer is written (for union: the base of the union)
    added: list[tuple[str, bool]] = field(default_factory=list)  # union: tokens to add (content, special)
    _rows: dict[str, list[int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def rows(self, model: str) -> list[int]:
        return self._rows[model]

    def fill_missing(
        self, tensors: list[torch.Tensor], base: torch.Tensor | None, inputs: list, base_inp
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Rows a model lacks (-1) take the mean of the models that have them."""
        all_t = list(tensors) + ([base] if base is not None else [])
        all_i = list(inputs) + ([base_inp] if base is not None else [])
        masks = [torch.tensor(i.rows, device=t.device) >= 0 for i, t in zip(all_i, all_t)]
        if all(bool(m.all()) for m in masks):
            return tensors, base
        total = torch.zeros_like(all_t[0])
        count = torch.zeros(all_t[0].shape[0], dtype=all_t[0].dtype, device=all_t[0].device)
        for t, m in zip(all_t, masks):
            total[m] += t[m]
            count += m.to(count.dtype)
        mean = total / count.clamp(min=1).view(-1, *([1] * (total.dim() - 1)))
        for t, m in zip(all_t, masks):
            t[~m] = mean[~m]
        return (all_t[: len(tensors)], all_t[len(tensors)] if base is not None else None)


def _vocab_rows(src, names: list[str]) -> int | None:
    for n in names:
        if n in src:
            return src.info(n).shape[0]
    return None


def plan_vocab(recipe, sources: dict, reference: str, models: list[str]) -> VocabPlan | None:
    models = list(dict.fromkeys(models))
    ref_src = sources[reference]
    vocab_names = [n for n in ref_src.keys() if arch.classify(n).vocab]
    if not vocab_names:
        return None
    counts = {}
    for m in models:
        src = sources[m]
        c = _vocab_rows(src, [n for n in src.keys() if arch.classify(n).vocab])
        if c is not None:
            counts[m] = c
    mode = recipe.tokenizer_source
    pad = recipe.pad_to_multiple_of
    if mode is None:
        if len(set(counts.values())) <= 1 and pad is None:
            return None
        size = counts[reference]
        if pad:
            size = -(-size // pad) * pad
        plan = VocabPlan(size=size, mode="by-id", source=reference)
        for m, c in counts.items():
            plan._rows[m] = [i if i < c else -1 for i in range(size)]
        if len(set(counts.values())) > 1:
            desc = ", ".join(f"{m}: {c}" for m, c in counts.items())
            plan.warnings.append(
                f"embedding sizes differ ({desc}); aligned by token id to {reference}'s {size} rows. "
                "Set tokenizer_source: base or union to align by token instead."
            )
        return plan

    vocabs = {m: load_vocab(sources[m]) for m in models}
    if mode == "union":
        base = recipe.base_model or models[0]
        out_tokens = dict(vocabs[base][0])
        order = sorted(out_tokens, key=out_tokens.get)
        added: list[tuple[str, bool]] = []
        for m in models:
            v, special = vocabs[m]
            for tok in sorted(v, key=v.get):
                if tok not in out_tokens:
                    out_tokens[tok] = len(order)
                    order.append(tok)
                    added.append((tok, tok in special))
        source = base
        size = len(order)
    else:
        source = (recipe.base_model or models[0]) if mode == "base" else mode
        if source not in sources:
            raise RecipeError(f"tokenizer_source {mode!r} is not one of the recipe's models")
        if source not in vocabs:
            vocabs[source] = load_vocab(sources[source])
        out_tokens = vocabs[source][0]
        order = sorted(out_tokens, key=out_tokens.get)
        added = []
        size = max(len(order), counts.get(source, 0))
    if pad:
        size = -(-size // pad) * pad
    plan = VocabPlan(size=size, mode=mode if mode in ("base", "union") else "model", source=source, added=added)
    for m in models:
        if m not in counts:
            continue
        v = vocabs[m][0]
        rows = [-1] * size
        for tok, out_id in out_tokens.items():
            mid = v.get(tok)
            if mid is not None and mid < counts[m] and out_id < size:
                rows[out_id] = mid
        # padding rows beyond the tokenizer keep their position when the model has them
        for i in range(len(order), size):
            if i < counts[m]:
                rows[i] = i
        plan._rows[m] = rows
    return plan


def _read_tokenizer_json(path: Path):
    """A ``tokenizers.Tokenizer`` from ``path``, or a one-line error naming the file."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception for a bad file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({reason})") from None


def tokenizer_model(plan: VocabPlan | None, recipe, reference: str) -> str:
    """The model whose tokenizer files the output gets."""
    if plan is not None and plan.mode in ("base", "union", "model"):
        return plan.source
    if recipe.tokenizer_source and recipe.tokenizer_source not in ("base", "union"):
        return recipe.tokenizer_source
    return reference


def add_tokens(tokenizer_json: Path, added) -> None:
    """Append ``added`` ((content, special) pairs) to the tokenizer in ``tokenizer_json``, in order."""
    from tokenizers import AddedToken

    tok = _read_tokenizer_json(tokenizer_json)
    for t, special in added:  # one by one, so ids follow the planned order
        if special:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
        else:
            tok.add_tokens([AddedToken(t, normalized=True)])
    try:
        tok.save(str(tokenizer_json))
    except Exception as e:  # noqa: BLE001 - as above
        raise CheckpointError(f"cannot write {tokenizer_json}: {e}") from None
