"""Multi-fidelity: screen candidates on few tokens, re-score the promising ones on every search token.

``fidelity: {screen_tokens: 128, full_tokens: 1024, keep: 0.25}`` in a spec:

- the *full* windows are the search split cut to ``full_tokens`` per domain (default: the
  whole search split, ``evaluation.tokens``); the *screen* windows are their first
  ``screen_tokens`` (default: a quarter of them);
- EvoPress asks for each evaluation at a level itself (many children screened, the best
  ``keep`` share re-scored);
- every other optimizer's candidate is screened, and re-scored in the same task (its
  weights are in the model already: the re-score costs forward passes only) when its
  screen value is among the best ``keep`` share of the screen values so far (the first
  candidates always are). The optimizer is told the value at the level the trial reached;
  only re-scored trials can become ``best.yaml``, so a lucky screen never wins.

Torch-free.
"""

from __future__ import annotations

import math

from .spec import DEFAULT_SCREEN_SHARE, Fidelity, SearchSpec
from .splits import _cut


def fidelity_of(spec: SearchSpec, optimizer: str, space) -> Fidelity | None:
    """The spec's fidelity; EvoPress (the drop space's default) screens with the defaults when the spec gives none."""
    if spec.fidelity is not None:
        return spec.fidelity
    if space.kind == "drop" and optimizer in ("evopress", "default"):
        return Fidelity()
    return None


def fidelity_windows(search: dict[str, list[list[int]]], fid: Fidelity | None) -> dict:
    """``{"full": windows per domain, "screen": windows per domain or None}``."""
    if fid is None:
        return {"full": search, "screen": None}
    full = {d: _cut(ws, fid.full_tokens) for d, ws in search.items()}
    screen = {}
    for d, ws in full.items():
        n = sum(len(w) - 1 for w in ws)
        k = fid.screen_tokens if fid.screen_tokens is not None else max(1, round(DEFAULT_SCREEN_SHARE * n))
        screen[d] = _cut(ws, min(k, n))
    return {"full": full, "screen": screen}


class Promotion:
    """Which screened candidates are re-scored: those whose screen value ranks in the best ``keep`` share so far."""

    def __init__(self, fid: Fidelity, up: bool):
        self.keep = fid.keep
        self.up = up
        self.seen: list[float] = []  # screen values (first objective) of the trials told so far

    def add(self, trial) -> None:
        """Count a finished trial's screen value (a re-scored trial's from its screen record)."""
        if trial.screen is not None:
            v = trial.screen["values"][0]
        elif trial.level == "screen" and trial.values is not None:
            v = trial.values[0]
        else:
            return
        if math.isfinite(v):
            self.seen.append(v)

    def threshold(self):
        """The screen value a new candidate must reach to be re-scored (True: any value)."""
        m = max(1, math.ceil(self.keep * (len(self.seen) + 1)))  # at most m - 1 earlier screens may beat it
        if len(self.seen) < m:
            return True
        ranked = sorted(self.seen, reverse=self.up)
        return ranked[m - 1]
