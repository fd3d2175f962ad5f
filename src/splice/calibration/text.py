"""Calibration text: documents, and seeded token windows drawn across them.

A small prefix of a corpus holds one or two documents (the first few files of a code
split) and calibrates a merge worse than the same number of tokens drawn from all
of it, so windows are sampled across documents: the documents are shuffled with the
seed and tokenised until the pool holds ``POOL_FACTOR`` times the budget, each is cut
into windows of ``seq_len`` tokens, and the windows are shuffled with the seed and
taken until the budget is reached (the last one cut to fit it exactly).
"""

from __future__ import annotations

import json
import os
import random

from .. import options
from ..errors import SpliceError

DEFAULT_TOKENS = 16384  # per model: the prototype measured RegMean on the tiny zoo at 16k
DEFAULT_SEQ_LEN = 256
DEFAULT_BATCH_SIZE = 8  # windows per forward: more is faster, and holds more activations
# Tokens tokenised per token kept: more spreads the windows over more documents (and costs
# tokenising time on a large file); the whole text when it holds less.
POOL_FACTOR = 4
# A document's trailing window shorter than this is dropped (too little context to measure).
MIN_WINDOW = 8


def read_documents(path: str | os.PathLike, name: str = "text") -> list[str]:
    """Documents of a UTF-8 file: a ``.jsonl`` file's records' ``"text"``, else blocks separated by blank lines.

    Args:
        path: the file; name: the option it came from, for errors.
    Returns:
        The non-empty documents, in file order.
    Raises:
        OptionError/SpliceError: missing, not UTF-8, a bad JSON line, or no text at all (one line each).
    """
    p = options.text_file(path, name)
    raw = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                text = rec["text"]
            except (ValueError, KeyError, TypeError):
                raise SpliceError(f'{p}:{i}: expected a JSON object with a "text" field') from None
            if not isinstance(text, str):
                raise SpliceError(f'{p}:{i}: "text" is not a string')
            if text.strip():
                docs.append(text)
    else:
        docs = [d for d in raw.split("\n\n") if d.strip()]
    if not docs:
        raise SpliceError(f"calibration text {p} is empty")
    return docs


def sample_windows(tokenizer, docs: list[str], *, tokens: int, seq_len: int, seed: int, bos: int | None, source: str) -> list[list[int]]:
    """Windows of token ids (each at most ``seq_len`` long, BOS first when ``bos``) holding ``tokens`` positions in all.

    Raises:
        SpliceError: the text holds fewer than ``tokens`` tokens in windows.
    """
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    step = seq_len - (bos is not None)
    pool: list[list[int]] = []
    pooled = 0
    for i in order:
        ids = tokenizer(docs[i], add_special_tokens=False, verbose=False)["input_ids"]
        for s in range(0, len(ids), step):
            body = ids[s : s + step]
            if len(body) < MIN_WINDOW:
                continue
            w = ([bos] if bos is not None else []) + body
            pool.append(w)
            pooled += len(w)
        if pooled >= POOL_FACTOR * tokens:
            break
    if pooled < tokens:
        raise SpliceError(
            f"calibration text {source} holds {pooled} tokens in windows of up to {seq_len}, fewer than the "
            f"{tokens} asked for; give more text or fewer tokens"
        )
    rng.shuffle(pool)
    out, total = [], 0
    for w in pool:
        w = w[: tokens - total]
        if len(w) < 2:
            break
        out.append(w)
        total += len(w)
        if total >= tokens:
            break
    return out
