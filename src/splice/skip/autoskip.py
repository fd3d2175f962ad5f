"""The adaptive skip-set policy behind ``--self-speculative auto`` (after SWIFT, Xia et al. 2025).

Candidate sets of attention and MLP blocks are ranked by how little each block
changed the prompt's hidden states, then scored on the recent text itself
(teacher-forced: one parallel draft pass over the last tokens, counting
agreements with the full model's argmax) against their cost; the best set is
drafted with, and the search resumes when the measured acceptance falls. Every
tuning constant of the policy is a field of :class:`AutoSkipConfig`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .. import architecture as arch
from .costs import unit_params
from .runtime import forward_logits, prefix_cache, skipping
from .units import Unit


@dataclass(frozen=True)
class AutoSkipConfig:
    """The constants of the ``auto`` policy, each with what it trades."""

    window: int = 12  # recent tokens a candidate is scored on: more = a steadier score, a dearer search pass
    budget: int = 6  # candidates scored per search: more = better sets found, more search passes
    retry_every: int = 48  # tokens between retries while no set pays; doubled after each retry that finds nothing
    min_positions: int = 4  # fewest known positions a search pass scores on: fewer = earlier, noisier scores
    candidate_tries: int = 8  # candidates looked at per search step before giving the step up
    neighbour_tries: int = 20  # random moves tried to find a neighbour of the best set not yet scored
    # a neighbour move: a uniform draw below swap_share swaps one block, below grow_share skips one more, else one fewer
    swap_share: float = 0.5
    grow_share: float = 0.75
    start_ratio: float = 0.15  # share of the per-token work the first candidate skips
    ratio_steps: int = 3  # coarse steps over how much to skip, before the local moves
    ratio_grow: float = 1.8  # coarse step up when agreement is high (or the draft cannot pay at all)
    ratio_shrink: float = 2.5  # coarse step down when agreement is low
    max_ratio: float = 0.6  # the most of the work a candidate skips: more = cheaper drafts, fewer accepted
    grow_agreement: float = 0.85  # agreement at which the coarse search skips more instead of less
    give_up_margin: float = 0.15  # stop searching when the best set's agreement is this far below what it needs
    rescore_mix: float = 0.5  # weight of a new score against the old one when a candidate is scored again
    max_agreement: float = 0.99  # cap on agreement in predictions (1 would predict unbounded gain)
    need_steps: int = 20  # bisection steps for the agreement a set needs (2^-20 precision)
    verify_cost_prior: float = 0.15  # extra cost of verifying one more token, in plain steps, until measured
    max_verify_cost: float = 2.0  # bound on that measured cost
    draft_scale_bounds: tuple[float, float] = (0.5, 3.0)  # bounds on measured / predicted draft cost
    follow: float = 0.2  # weight of the newest measurement in the running timings and acceptance: higher = quicker, noisier
    score_feedback: float = 0.1  # weight of one drafting cycle's acceptance in its set's score
    research_below: float = 0.6  # search again when acceptance falls below this share of the set's score


class AutoSkip:
    """Chooses the draft's skip set on the fly (SWIFT-style; no training, no extra model).

    Candidate units are the attention and MLP blocks of the intermediate layers
    (first and last layer always run). A candidate is scored by the decoding
    speed it predicts relative to plain decoding,

        max over k of  E(k) / (1 + k * (draft cost) + k * beta),

    where ``E(k) = (1 - a^(k+1)) / (1 - a)`` is the expected tokens per cycle
    for the candidate's measured per-token agreement ``a`` with the full model,
    the draft cost is its share of the per-token work (parameters, scaled by
    the measured draft time), and ``beta`` the measured extra cost of verifying
    one more token. Candidates come from a ranking of the blocks by how little
    they changed the prompt's hidden states: first a search over how much to
    skip (from ``start_ratio`` of the work, up when agreement is high, down when
    low), then swaps around the best set. When no candidate predicts a gain, the
    decoder runs plain steps and re-tries a candidate every ``retry_every``
    tokens, so ``auto`` costs little on a model that does not tolerate skipping.
    """

    def __init__(self, model, config: AutoSkipConfig | None = None, *, max_draft: int = 8, seed: int = 0):
        self.model = model
        self.config = cfg = config or AutoSkipConfig()
        self.layers = arch.decoder_layers(model)
        self.L = len(self.layers)
        attn, mlp, head = unit_params(model)
        self.cost = {}
        for i in range(1, self.L - 1):
            if attn[i]:
                self.cost[(i, "attn")] = attn[i]
            if mlp[i]:
                self.cost[(i, "mlp")] = mlp[i]
        self.total = sum(attn) + sum(mlp) + head
        self.max_draft = max_draft
        self.retry_every = cfg.retry_every
        self.rng = random.Random(seed)
        self.influence: dict[Unit, float] = {}
        self.scores: dict[frozenset, float] = {}  # candidate -> measured agreement
        self.best: frozenset | None = None
        self.ratio = cfg.start_ratio
        self.ratio_steps = cfg.ratio_steps
        self.left = cfg.budget
        self.since_retry = 0
        self.retrying = False
        self.flip = False
        self.ema: float | None = None
        # timing model (relative to one plain step); priors until measured
        self.t_step: float | None = None
        self.beta = cfg.verify_cost_prior
        self.draft_scale = 1.0

    # -- scores from the prompt pass
    def set_influence(self, cur: dict) -> None:
        """Rank the blocks by how much they changed the prompt's stream (``cur`` from ``stream_hooks``)."""

        def cos(a, b):
            a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
            return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())

        for u in self.cost:
            i, k = u
            if ("mid", i) not in cur:
                continue
            a, b = (cur[("in", i)], cur[("mid", i)]) if k == "attn" else (cur[("mid", i)], cur[("out", i)])
            self.influence[u] = 1.0 - cos(a, b)
        if not self.influence:  # no pre-MLP norm in this family: rank by distance from the middle
            mid = (self.L - 1) / 2
            self.influence = {u: abs(u[0] - mid) + (0.5 if u[1] == "attn" else 0.0) for u in self.cost}

    def ranked(self, ratio: float) -> frozenset:
        """Lowest-influence blocks until they hold ``ratio`` of the per-token work (at least one block)."""
        order = sorted(self.cost, key=lambda u: (self.influence.get(u, 1.0), u))
        out, got = [], 0
        for u in order:
            if out and got >= ratio * self.total:
                break
            out.append(u)
            got += self.cost[u]
        return frozenset(out)

    def draft_cost(self, units) -> float:
        """The draft's share of the per-token work (by parameters)."""
        skipped = 0
        for i, k in units:
            kinds = ("attn", "mlp") if k == "layer" else (k,)
            skipped += sum(self.cost.get((i, kk), 0) for kk in kinds)
        return (self.total - skipped) / self.total

    def predict(self, agreement: float, units) -> tuple[float, int]:
        """(predicted speed relative to plain decoding, best draft length); (1.0, 0) means: do not draft."""
        c = min(1.0, self.draft_cost(units) * self.draft_scale)
        a = min(max(agreement, 0.0), self.config.max_agreement)
        best = (1.0, 0)
        for k in range(1, self.max_draft + 1):
            e = (1 - a ** (k + 1)) / (1 - a)
            v = e / (1.0 + k * c + k * self.beta)
            if v > best[0]:
                best = (v, k)
        return best

    def need(self, units) -> float:
        """The smallest agreement at which drafting with ``units`` would beat plain decoding (1.0: never)."""
        lo, hi = 0.0, self.config.max_agreement
        if self.predict(hi, units)[0] <= 1.0:
            return 1.0
        for _ in range(self.config.need_steps):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.predict(mid, units)[0] > 1.0 else (mid, hi)
        return hi

    # -- search
    def current(self) -> frozenset:
        """The skip set to draft with now (empty: run a plain step)."""
        if self.best is None or self.predict(self.scores[self.best], self.best)[0] <= 1.0:
            return frozenset()
        return self.best

    def draft_length(self) -> int:
        return self.predict(self.scores[self.best], self.best)[1] if self.best is not None else 0

    def wants_search(self, new_tokens: int) -> bool:
        if self.left > 0:
            return True
        if not self.current() and new_tokens - self.since_retry >= self.retry_every:
            self.since_retry = new_tokens
            self.retry_every *= 2  # each retry that finds nothing makes the next one rarer
            self.left = 1
            self.retrying = True
            return True
        return False

    def next_candidate(self) -> frozenset | None:
        cfg = self.config
        if self.retrying:  # plain mode: alternate re-scoring the best set on new text and trying a neighbour
            self.retrying = False
            self.flip = not self.flip
            if self.flip and self.best is not None:
                return self.best
        if self.ratio_steps > 0:
            return self.ranked(self.ratio)
        base = set(self.best or self.ranked(self.ratio))
        outside = sorted(u for u in self.cost if u not in base)
        for _ in range(cfg.neighbour_tries):
            cand = set(base)
            move = self.rng.random()
            if move < cfg.swap_share and cand and outside:  # swap one block for another
                cand.remove(self.rng.choice(sorted(cand)))
                cand.add(self.rng.choice(outside))
            elif move < cfg.grow_share and outside:  # skip one more: the least influential left
                cand.add(min(outside, key=lambda u: (self.influence.get(u, 1.0), u)))
            elif len(cand) > 1:  # skip one fewer: the most influential skipped
                cand.remove(max(cand, key=lambda u: (self.influence.get(u, 1.0), u)))
            f = frozenset(cand)
            if f and f not in self.scores:
                return f
        return None

    def _grow_ratio(self) -> None:
        self.ratio = min(self.config.max_ratio, self.ratio * self.config.ratio_grow)

    def unwinnable(self, units: frozenset) -> None:
        """A candidate whose draft costs too much to pay off at any acceptance: skip more next time."""
        self.scores.setdefault(units, 0.0)
        if self.ratio_steps > 0 and units == self.ranked(self.ratio):
            self.ratio_steps -= 1
            self._grow_ratio()
        else:
            self.left -= 1

    def record(self, units: frozenset, agreement: float) -> None:
        cfg = self.config
        self.left -= 1
        if self.ratio_steps > 0 and units == self.ranked(self.ratio):
            self.ratio_steps -= 1
            if agreement >= cfg.grow_agreement:
                self._grow_ratio()
            else:
                self.ratio = self.ratio / cfg.ratio_shrink
        old = self.scores.get(units)
        self.scores[units] = agreement if old is None else (1 - cfg.rescore_mix) * old + cfg.rescore_mix * agreement
        if self.best is None or self.predict(self.scores[units], units)[0] > self.predict(self.scores[self.best], self.best)[0]:
            self.best = units
        if self.ratio_steps <= 0 and self.best is not None and self.scores[self.best] < self.need(self.best) - cfg.give_up_margin:
            self.left = 0  # the best set is far from paying: small changes to it will not get there

    def observe(self, drafted: int, accepted: int, draft_steps: int, t_draft: float, t_verify: float) -> None:
        """One cycle's acceptance and timings: update the timing model; re-search when acceptance falls."""
        cfg = self.config
        f = cfg.follow
        if drafted == 0:
            self.t_step = t_verify if self.t_step is None else (1 - f) * self.t_step + f * t_verify
            return
        if self.t_step:
            b = (t_verify / self.t_step - 1.0) / drafted
            self.beta = min(cfg.max_verify_cost, max(0.0, (1 - f) * self.beta + f * b))
            if draft_steps and self.best is not None:
                s = t_draft / (draft_steps * self.t_step * self.draft_cost(self.best))
                lo, hi = cfg.draft_scale_bounds
                self.draft_scale = min(hi, max(lo, (1 - f) * self.draft_scale + f * s))
        r = accepted / drafted
        self.ema = r if self.ema is None else (1 - f) * self.ema + f * r
        if self.best is not None:
            # what drafting really gives feeds back into the candidate's score
            self.scores[self.best] = (1 - cfg.score_feedback) * self.scores[self.best] + cfg.score_feedback * r
            if self.left <= 0 and self.ema < cfg.research_below * self.scores[self.best]:
                self.left = max(2, cfg.budget // 2)
                self.ema = None

    def search_step(self, tokens: list[int], full_argmax: dict[int, int], cache) -> None:
        """Score one candidate skip set on the recent text: one teacher-forced draft pass.

        ``tokens``: the text so far (the last one pending, the rest in ``cache``);
        ``full_argmax[j]``: the full model's argmax after ``tokens[:j+1]``, where known.
        """
        cfg = self.config
        for _ in range(cfg.candidate_tries):
            cand = self.next_candidate()
            if cand is None:
                self.left = 0
                return
            if self.predict(cfg.max_agreement, cand)[0] > 1.0:
                break
            self.unwinnable(cand)  # too little skipped to pay even if every draft were accepted: no pass needed
        else:
            return
        end = len(tokens) - 1  # positions [start, end) are in the cache
        start = end - cfg.window
        while start < end and (start < 1 or any(j not in full_argmax for j in range(start, end))):
            start += 1
        if end - start < cfg.min_positions:
            return  # not enough known positions yet; try next cycle
        view = prefix_cache(self.model, cache, start)
        with skipping(self.model, cand):
            lg = forward_logits(self.model, tokens[start:end], view, keep=end - start)
        pred = lg.argmax(-1).tolist()
        agree = sum(int(p == full_argmax[start + r]) for r, p in enumerate(pred)) / len(pred)
        self.record(cand, agree)
