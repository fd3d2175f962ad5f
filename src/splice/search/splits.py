"""The search split and the test split of each domain's held-out text.

Each held-out file is tokenized once (with the base's tokenizer) and cut into the same
windows ``splice eval`` scores (:func:`splice.eval.perplexity.windows`). The windows are
dealt into two parts by a shuffle seeded with the domain's name alone (not the search
seed, so every study of a spec, whatever its seed, is tested on the same windows):
``search_share`` of them for the search, the rest for the test split the search never
sees. Each part keeps the file's order and is cut to ``tokens`` predicted tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .optimizers import SearchError

SPLIT_SALT = "splice-search-split"  # with the domain name, seeds the deal of windows into the two splits


@dataclass
class Splits:
    """Token windows per domain: ``search[d]`` and ``test[d]`` (lists of token-id lists)."""

    search: dict[str, list[list[int]]]
    test: dict[str, list[list[int]]]

    def tokens(self, split: str) -> dict[str, int]:
        part = self.search if split == "search" else self.test
        return {d: sum(len(w) - 1 for w in ws) for d, ws in part.items()}


def _cut(wins: list[list[int]], tokens: int | None) -> list[list[int]]:
    if tokens is None:
        return wins
    out, n = [], 0
    for w in wins:
        if n >= tokens:
            break
        out.append(w[: tokens - n + 1])
        n += len(out[-1]) - 1
    return [w for w in out if len(w) >= 2]


def split_windows(wins: list[list[int]], domain: str, share: float, tokens: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """(search windows, test windows) of one domain; each split gets one window at least."""
    n = len(wins)
    if n < 2:
        raise SearchError(
            f"domain {domain!r}: its held-out text makes {n} window(s); a search split and a test split need 2 at least "
            "(lower evaluation.seq_len or give more text)"
        )
    order = list(range(n))
    random.Random(f"{SPLIT_SALT}:{domain}").shuffle(order)
    k = min(n - 1, max(1, round(share * n)))
    search = sorted(order[:k])
    test = sorted(order[k:])
    return _cut([wins[i] for i in search], tokens), _cut([wins[i] for i in test], tokens)


def make_splits(tokenizer, texts: dict[str, str], seq_len: int, share: float, tokens: int | None) -> Splits:
    """Both splits of every domain (see the module docstring)."""
    from ..eval.perplexity import windows

    search, test = {}, {}
    for d, text in texts.items():
        wins, _ = windows(tokenizer, text, seq_len, None)
        search[d], test[d] = split_windows(wins, d, share, tokens)
    return Splits(search, test)
