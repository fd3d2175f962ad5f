"""EvoPress for a drop space: evolve which ``count`` layers to drop (after Sieberling et al. 2024, arXiv:2410.14649).

One parent drop set, improved generation by generation:

1. **seeds**: splice skip's layer planners' choices at the same count (balanced,
   block-influence, angular; :mod:`splice.search.drop`), each scored on every search
   token; the best is the first parent.
2. **offspring**: ``OFFSPRING`` children of the parent by *level-switch mutation*: a
   dropped layer is brought back and a kept one dropped in its place, so the count never
   changes; ``min(U{1..MAX_SWITCHES}, U{1..MAX_SWITCHES})`` switches per child (mostly one).
   Children repeat neither the parent nor each other (a small space may give fewer).
3. **multi-step selection**: every child is *screened* on few tokens (the fidelity's
   ``screen_tokens``); the best ``keep`` share survive and are *re-scored* on every search
   token; the best survivor replaces the parent if it beats it there (elitist: the parent's
   own full score is the bar). Then back to 2.

Each evaluation is one trial (``level`` "screen" or "full" in ``trials.jsonl``); only
full-level trials can become ``best.yaml``. Selection sorts by (value, drop set), so the
result does not depend on the order workers return results in. Between steps ``ask`` returns
None: a step needs every result of the one before.

Torch-free; needs nothing but the standard library.
"""

from __future__ import annotations

import json
import math
import random
from collections import deque

from .optimizers import SearchError

OFFSPRING = 16  # children screened per generation: many cheap screens, few full scores
MAX_SWITCHES = 3  # most level switches in one child; min of two uniform draws in 1..3 gives one switch 5 times in 9
DEDUPE_TRIES = 20  # draws for a child unlike the parent and its siblings; a small space may give fewer children


def _key(drop: list[int]) -> str:
    return json.dumps(sorted(drop))


class EvoPress:
    """The optimizer (see the module docstring); ``ask()`` -> ``(params, level)`` or None, ``tell(params, values)``."""

    staged = True  # asks come with the fidelity level to score them at

    def __init__(self, space, directions: list[bool], seed: int, offspring: int = OFFSPRING):
        if getattr(space, "kind", None) != "drop":
            raise SearchError("optimizer 'evopress' searches a drop space (space.drop: {count: K})")
        self.space = space
        self.up = directions[0]
        self.rng = random.Random(seed)
        self.offspring = offspring
        self.survivors = max(1, round(getattr(space, "keep", 0.25) * offspring))
        self.parent: list[int] | None = None
        self.parent_value: float | None = None
        self.out: list[tuple[str, str]] = []  # (drop key, level) asked and not told
        self.results: list[tuple[list[int], float | None]] = []  # this step's results
        seeds = []
        for _, drop in space.seeds:
            if _key(drop) not in {_key(d) for d in seeds}:
                seeds.append(sorted(drop))
        if not seeds:  # no planner could plan this model: one random start
            seeds = [sorted(self.rng.sample(range(space.n_layers), space.count))]
        self.queue: deque[tuple[list[int], str]] = deque((d, "full") for d in seeds)
        self.step = "seed"
        self.generation = 0

    def _rank(self, v: float | None) -> float:
        if v is None or not math.isfinite(v):
            return -math.inf
        return v if self.up else -v

    def mutate(self, drop: list[int]) -> list[int]:
        """A child by level switches: each brings one dropped layer back and drops one kept layer instead."""
        child = set(drop)
        n = min(self.rng.randint(1, MAX_SWITCHES), self.rng.randint(1, MAX_SWITCHES))
        for _ in range(n):
            kept = [i for i in range(self.space.n_layers) if i not in child]
            if not kept or not child:
                break
            back = self.rng.choice(sorted(child))
            out = self.rng.choice(kept)
            child.remove(back)
            child.add(out)
        return sorted(child)

    def _best(self) -> tuple[list[int] | None, float | None]:
        ok = [(d, v) for d, v in self.results if v is not None and math.isfinite(v)]
        if not ok:
            return None, None
        d, v = max(ok, key=lambda dv: (self._rank(dv[1]), _key(dv[0])))
        return d, v

    def _advance(self) -> None:
        if self.step in ("seed", "full"):
            d, v = self._best()
            if d is not None and (self.parent is None or self._rank(v) > self._rank(self.parent_value)):
                self.parent, self.parent_value = d, v
            if self.parent is None:
                raise SearchError("evopress: every starting drop set failed to score")
            self.generation += 1
            seen = {_key(self.parent)}
            for _ in range(self.offspring):
                for _ in range(DEDUPE_TRIES):
                    child = self.mutate(self.parent)
                    if _key(child) not in seen:
                        seen.add(_key(child))
                        self.queue.append((child, "screen"))
                        break
            self.step = "screen"
        else:
            ranked = sorted(
                ((d, v) for d, v in self.results if v is not None and math.isfinite(v)), key=lambda dv: (-self._rank(dv[1]), _key(dv[0]))
            )
            survivors = ranked[: self.survivors]
            self.queue.extend((d, "full") for d, _ in survivors)
            self.step = "full"
            if not survivors:  # every child failed: a new generation from the same parent
                self.step = "seed"
                self.results = []
                self._advance()
                return
        self.results = []

    def ask(self):
        if not self.queue:
            if self.out:
                return None  # this step needs every result before the next
            self._advance()
        drop, level = self.queue.popleft()
        self.out.append((_key(drop), level))
        return {"drop": drop}, level

    def tell(self, params: dict, values: list[float] | None) -> None:
        key = _key(params["drop"])
        for i, (k, _) in enumerate(self.out):
            if k == key:
                del self.out[i]
                break
        else:
            raise SearchError(f"evopress: a result came back for a drop set it has not asked for: {key}")
        self.results.append((sorted(params["drop"]), values[0] if values else None))
