"""Self-speculative decoding: draft with the model's own layers partly bypassed, verify with all of them.

One cycle (Draft & Verify, Zhang et al. 2024; SWIFT, Xia et al. 2025):

1. the *draft* (the same model under :func:`splice.skip.runtime.skipping`)
   proposes up to ``k`` tokens one at a time, sharing the weights and the KV
   cache of the committed text; drafting stops early when the draft's own top
   probability falls below a confidence threshold;
2. the draft's cache entries are cut off and the *full* model runs once over
   the pending token and the ``k`` drafts, giving ``k + 1`` next-token
   distributions;
3. greedy: the longest prefix of drafts equal to the full model's argmax is
   kept, plus the full model's own next token -- so the text is exactly what
   plain greedy decoding gives. Sampling: the speculative-sampling rule
   (Leviathan et al. 2023; Chen et al. 2023): keep draft ``x`` with probability
   ``min(1, p(x)/q(x))``, on the first rejection sample from
   ``norm(max(p - q, 0))``, after a full acceptance sample from the last
   ``p`` -- so every token is distributed exactly as the full model's.

``skip="auto"`` picks the bypassed set on the fly (after SWIFT): candidate sets
of attention and MLP blocks are ranked by how little each block changed the
prompt's hidden states, then scored on the recent text itself (teacher-forced,
one parallel draft pass over the last tokens, counting agreements with the
full model's argmax) against their cost; the best set is used, and the search
resumes when the measured acceptance falls. The draft length follows the
acceptance of the previous cycles.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .model import SkipError, decoder_layers, pre_mlp_norm, unit_params
from .runtime import Unit, check_units, crop_cache, format_units, normalize, parse_units, skipping

# ------------------------------------------------------------------ results


@dataclass
class GenerationStats:
    new_tokens: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    cycles: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    search_seconds: float = 0.0
    searches: int = 0
    skip_sets: dict[str, int] = field(default_factory=dict)  # skip set -> cycles it drafted

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first (which the prompt pass gives) per second after the prompt pass."""
        t = self.seconds - self.prefill_seconds
        return (self.new_tokens - 1) / t if t > 0 and self.new_tokens > 1 else 0.0

    @property
    def tokens_per_cycle(self) -> float:
        return (self.accepted + self.cycles) / self.cycles if self.cycles else 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(
            acceptance=self.acceptance,
            tokens_per_second=self.tokens_per_second,
            decode_tokens_per_second=self.decode_tokens_per_second,
            tokens_per_cycle=self.tokens_per_cycle,
        )
        return d


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens only
    stats: GenerationStats


# ------------------------------------------------------------------ model calls


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _forward(model, ids: list[int] | torch.Tensor, cache, keep: int = 1) -> torch.Tensor:
    """Logits [keep, V] for the last ``keep`` positions of ``ids``, appending to ``cache``."""
    x = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.long)
    x = x.view(1, -1)
    if getattr(model, "_splice_keep", None) is None:
        import inspect

        model._splice_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    kw = {"logits_to_keep": keep} if model._splice_keep else {}
    out = model(input_ids=x, cache=cache, use_cache=True, **kw)
    return out.logits[0, -keep:].float()


def warp(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Next-token probabilities after temperature, top-k and top-p (rows of ``logits``)."""
    x = logits.double() / temperature
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    p = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        sp, si = torch.sort(p, dim=-1, descending=True)
        cum = sp.cumsum(-1)
        drop = cum - sp > top_p  # keep the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter(-1, si, sp)
        p = p / p.sum(-1, keepdim=True)
    return p


def _sample(p: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(p, 1, generator=gen))


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: list[int], gen: torch.Generator) -> tuple[int, int]:
    """Speculative-sampling verification of one draft block.

    ``p``: [k+1, V] the full model's distributions (after the pending token and
    each draft), ``q``: [k, V] the draft's, ``drafts``: k tokens drawn from
    ``q``. Returns (number of drafts kept, the next token). The kept drafts plus
    the next token are distributed exactly as tokens sampled from ``p`` one at
    a time.
    """
    for i, d in enumerate(drafts):
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if u * float(q[i, d]) < float(p[i, d]):  # u < p/q without dividing
            continue
        res = (p[i] - q[i]).clamp_min(0.0)
        s = float(res.sum())
        return i, _sample(res / s if s > 0 else p[i], gen)
    return len(drafts), _sample(p[len(drafts)], gen)


# ------------------------------------------------------------------ plain decoding


@torch.inference_mode()
def generate_plain(
    model,
    input_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | Iterable[int] | None = None,
    skip: Iterable[Unit] = (),
) -> GenerationResult:
    """Token-by-token decoding with a KV cache (optionally with ``skip`` units bypassed throughout)."""
    ids = _as_list(input_ids)
    eos = _eos_set(eos_token_id)
    gen = torch.Generator().manual_seed(seed)
    st = GenerationStats()
    out: list[int] = []
    t0 = time.perf_counter()
    with skipping(model, skip):
        cache = _new_cache(model)
        logits = _forward(model, ids, cache)[-1]
        st.prefill_seconds = time.perf_counter() - t0
        while True:
            tok = int(logits.argmax()) if temperature <= 0 else _sample(warp(logits, temperature, top_k, top_p), gen)
            out.append(tok)
            if len(out) >= max_new_tokens or tok in eos:
                break
            logits = _forward(model, [tok], cache)[-1]
    st.seconds = time.perf_counter() - t0
    st.new_tokens = len(out)
    return GenerationResult(out, st)


def _as_list(input_ids) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise SkipError("generation takes one prompt at a time (batch size 1)")
            input_ids = input_ids[0]
        input_ids = input_ids.tolist()
    ids = [int(i) for i in input_ids]
    if not ids:
        raise SkipError("the prompt is empty")
    return ids


def _eos_set(eos) -> set[int]:
    if eos is None:
        return set()
    if isinstance(eos, int):
        return {eos}
    return {int(e) for e in eos}


# ------------------------------------------------------------------ the auto skip set


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
    skip (from 15% of the work, up when agreement is high, down when low), then
    swaps around the best set. When no candidate predicts a gain, the decoder
    runs plain steps and re-tries a candidate every ``retry_every`` tokens, so
    ``auto`` costs little on a model that does not tolerate skipping.
    """

    def __init__(self, model, *, window: int = 16, budget: int = 6, max_draft: int = 8, retry_every: int = 48, seed: int = 0):
        self.model = model
        self.layers = decoder_layers(model)
        self.L = len(self.layers)
        attn, mlp, head = unit_params(model)
        self.cost = {}
        for i in range(1, self.L - 1):
            if attn[i]:
                self.cost[(i, "attn")] = attn[i]
            if mlp[i]:
                self.cost[(i, "mlp")] = mlp[i]
        self.total = sum(attn) + sum(mlp) + head
        self.window = window
        self.budget = budget
        self.max_draft = max_draft
        self.retry_every = retry_every
        self.rng = random.Random(seed)
        self.influence: dict[Unit, float] = {}
        self.scores: dict[frozenset, float] = {}  # candidate -> measured agreement
        self.best: frozenset | None = None
        self.ratio = 0.15
        self.ratio_steps = 3
        self.left = budget
        self.since_retry = 0
        self.retrying = False
        self.flip = False
        self.ema: float | None = None
        # timing model (relative to one plain step); priors until measured
        self.t_step: float | None = None
        self.beta = 0.15
        self.draft_scale = 1.0

    # -- scores from the prompt pass
    def hooks(self):
        """Forward hooks measuring how much each block changes the stream (installed for the prompt pass)."""
        cur: dict = {}
        hs = []
        for i, layer in enumerate(self.layers):
            norm = pre_mlp_norm(layer)
            if norm is None:
                continue

            def pre(mod, args, kwargs, i=i):
                cur[("in", i)] = (args[0] if args else kwargs["hidden_states"]).detach()

            def post(mod, args, kwargs, out, i=i):
                cur[("out", i)] = (out[0] if isinstance(out, tuple) else out).detach()

            def mid(mod, args, i=i):
                cur[("mid", i)] = args[0].detach()

            hs.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            hs.append(layer.register_forward_hook(post, with_kwargs=True))
            hs.append(norm.register_forward_pre_hook(mid))
        return hs, cur

    def set_influence(self, cur: dict) -> None:
        def cos(a, b):
            a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
            return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())

        for u in self.cost:
            i, k = u
            if ("mid", i) not in cur:
                continue
            a, b = (cur[("in", i)], cur[("mid", i)]) if k == "attn" else (cur[("mid", i)], cur[("out", i)])
            self.influence[u] = 1.0 - cos(a, b)
        if not self.influence:  # no hooks fit this family: rank by distance from the middle
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
        a = min(max(agreement, 0.0), 0.99)
        best = (1.0, 0)
        for k in range(1, self.max_draft + 1):
            e = (1 - a ** (k + 1)) / (1 - a)
            v = e / (1.0 + k * c + k * self.beta)
            if v > best[0]:
                best = (v, k)
        return best

    def need(self, units) -> float:
        """The smallest agreement at which drafting with ``units`` would beat plain decoding (1.0: never)."""
        lo, hi = 0.0, 0.99
        if self.predict(hi, units)[0] <= 1.0:
            return 1.0
        for _ in range(20):
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
        if self.retrying:  # plain mode: alternate re-scoring the best set on new text and trying a neighbour
            self.retrying = False
            self.flip = not self.flip
            if self.flip and self.best is not None:
                return self.best
        if self.ratio_steps > 0:
            return self.ranked(self.ratio)
        base = set(self.best or self.ranked(self.ratio))
        outside = sorted(u for u in self.cost if u not in base)
        for _ in range(20):
            cand = set(base)
            move = self.rng.random()
            if move < 0.5 and cand and outside:  # swap one block for another
                cand.remove(self.rng.choice(sorted(cand)))
                cand.add(self.rng.choice(outside))
            elif move < 0.75 and outside:  # skip one more: the least influential left
                cand.add(min(outside, key=lambda u: (self.influence.get(u, 1.0), u)))
            elif len(cand) > 1:  # skip one fewer: the most influential skipped
                cand.remove(max(cand, key=lambda u: (self.influence.get(u, 1.0), u)))
            f = frozenset(cand)
            if f and f not in self.scores:
                return f
        return None

    def unwinnable(self, units: frozenset) -> None:
        """A candidate whose draft costs too much to pay off at any acceptance: skip more next time."""
        self.scores.setdefault(units, 0.0)
        if self.ratio_steps > 0 and units == self.ranked(self.ratio):
            self.ratio_steps -= 1
            self.ratio = min(0.6, self.ratio * 1.8)
        else:
            self.left -= 1

    def record(self, units: frozenset, agreement: float) -> None:
        self.left -= 1
        if self.ratio_steps > 0 and units == self.ranked(self.ratio):
            self.ratio_steps -= 1
            self.ratio = min(0.6, self.ratio * 1.8) if agreement >= 0.85 else self.ratio / 2.5
        old = self.scores.get(units)
        self.scores[units] = agreement if old is None else 0.5 * (old + agreement)
        if self.best is None or self.predict(self.scores[units], units)[0] > self.predict(self.scores[self.best], self.best)[0]:
            self.best = units
        if self.ratio_steps <= 0 and self.best is not None and self.scores[self.best] < self.need(self.best) - 0.15:
            self.left = 0  # the best set is far from paying: small changes to it will not get there

    def observe(self, drafted: int, accepted: int, draft_steps: int, t_draft: float, t_verify: float) -> None:
        """One cycle's acceptance and timings: update the timing model; re-search when acceptance falls."""
        if drafted == 0:
            self.t_step = t_verify if self.t_step is None else 0.8 * self.t_step + 0.2 * t_verify
            return
        if self.t_step:
            b = (t_verify / self.t_step - 1.0) / drafted
            self.beta = min(2.0, max(0.0, 0.8 * self.beta + 0.2 * b))
            if draft_steps and self.best is not None:
                s = t_draft / (draft_steps * self.t_step * self.draft_cost(self.best))
                self.draft_scale = min(3.0, max(0.5, 0.8 * self.draft_scale + 0.2 * s))
        r = accepted / drafted
        self.ema = r if self.ema is None else 0.8 * self.ema + 0.2 * r
        if self.best is not None:
            # what drafting really gives feeds back into the candidate's score
            self.scores[self.best] = 0.9 * self.scores[self.best] + 0.1 * r
            if self.left <= 0 and self.ema < 0.6 * self.scores[self.best]:
                self.left = max(2, self.budget // 2)
                self.ema = None


# ------------------------------------------------------------------ the decoder


class SelfSpeculativeDecoder:
    """Lossless self-speculative decoding for one ``transformers`` causal LM.

    ``skip``: ``"auto"``, a skip-set string (``"8-15,mlp20"``) or a set of
    ``(layer, kind)`` units. ``max_draft``: longest draft per cycle;
    ``draft_length``: fix the draft length (no adaptation); ``confidence``: stop
    drafting when the draft's top probability falls below it (0 disables).
    """

    def __init__(
        self,
        model,
        skip: str | Iterable[Unit] = "auto",
        *,
        max_draft: int = 8,
        draft_length: int | None = None,
        confidence: float = 0.3,
        window: int = 12,
        search_budget: int = 6,
        seed: int = 0,
    ):
        self.model = model
        L = len(decoder_layers(model))
        self.auto = isinstance(skip, str) and skip.strip().lower() == "auto"
        if self.auto:
            self.units: set[Unit] = set()
        else:
            units = parse_units(skip, L) if isinstance(skip, str) else normalize(skip)
            self.units = check_units(model, units)
            if not self.units:
                raise SkipError("self-speculative decoding needs a non-empty skip set (or 'auto')")
        if max_draft < 1:
            raise SkipError(f"max_draft must be >= 1, got {max_draft}")
        self.max_draft = max_draft
        self.draft_length = draft_length
        self.confidence = confidence
        self.window = window
        self.search_budget = search_budget
        self.seed = seed

    @torch.inference_mode()
    def generate(
        self,
        input_ids,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Iterable[int] | None = None,
    ) -> GenerationResult:
        model = self.model
        ids = _as_list(input_ids)
        eos = _eos_set(eos_token_id)
        greedy = temperature <= 0
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        st = GenerationStats()
        auto = (
            AutoSkip(model, window=self.window, budget=self.search_budget, max_draft=self.max_draft, seed=self.seed) if self.auto else None
        )
        k_len = self.draft_length or (4 if self.auto else min(4, self.max_draft))
        t0 = time.perf_counter()

        # prompt pass with the full model (hooks give the auto search its first ranking)
        cache = _new_cache(model)
        keep = min(len(ids), self.window + 1) if auto else 1
        hooks, cur = auto.hooks() if auto else ([], {})
        try:
            logits = _forward(model, ids, cache, keep=keep)
        finally:
            for h in hooks:
                h.remove()
        tokens = list(ids)
        # full_argmax[j]: the full model's argmax after tokens[:j+1] (known for recent positions)
        full_argmax: dict[int, int] = {len(ids) - keep + r: int(a) for r, a in enumerate(logits.argmax(-1))}
        if auto:
            auto.set_influence(cur)
            cur.clear()
        last = logits[-1]
        first = int(last.argmax()) if greedy else _sample(warp(last, temperature, top_k, top_p), gen)
        out = [first]
        tokens.append(first)
        st.prefill_seconds = time.perf_counter() - t0
        done = first in eos or max_new_tokens <= 1

        while not done:
            # cache holds tokens[:-1]; tokens[-1] is pending
            base = len(tokens) - 1
            if auto and auto.wants_search(len(out)):
                t = time.perf_counter()
                self._search_step(auto, tokens, full_argmax, cache)
                st.search_seconds += time.perf_counter() - t
                st.searches += 1
                if not self.draft_length and auto.best is not None:
                    k_len = max(1, auto.draft_length())
            units = auto.current() if auto else self.units
            if auto and auto.t_step is None:
                units = frozenset()  # one plain step first: the timing model needs its cost
            budget = max_new_tokens - len(out)
            k_max = max(0, min(k_len, self.max_draft, budget - 1)) if units else 0

            # draft
            t = time.perf_counter()
            drafts: list[int] = []
            qs: list[torch.Tensor] = []
            steps = 0
            if k_max > 0:
                with skipping(model, units):
                    x = tokens[-1]
                    for i in range(k_max):
                        lg = _forward(model, [x], cache)[-1]
                        steps += 1
                        if greedy:
                            if self.confidence > 0 and i > 0 and float(torch.softmax(lg, -1).max()) < self.confidence:
                                break
                            d = int(lg.argmax())
                        else:
                            q = warp(lg, temperature, top_k, top_p)
                            # the stop rule looks at q only (never at the sampled token): no bias
                            if self.confidence > 0 and i > 0 and float(q.max()) < self.confidence:
                                break
                            d = _sample(q, gen)
                            qs.append(q)
                        drafts.append(d)
                        if d in eos:
                            break
                        x = d
                crop_cache(cache, base)
            t_draft = time.perf_counter() - t
            st.draft_seconds += t_draft

            # verify with the full model in one pass
            t = time.perf_counter()
            lg = _forward(model, [tokens[-1]] + drafts, cache, keep=len(drafts) + 1)
            am = lg.argmax(-1)
            if greedy:
                m = 0
                while m < len(drafts) and drafts[m] == int(am[m]):
                    m += 1
                nxt = int(am[m])
            else:
                p = warp(lg, temperature, top_k, top_p)
                m, nxt = accept_drafts(p, torch.stack(qs) if qs else p[:0], drafts, gen)
            crop_cache(cache, base + 1 + m)
            t_verify = time.perf_counter() - t
            st.verify_seconds += t_verify
            for r in range(m + 1):
                full_argmax[base + r] = int(am[r])

            st.cycles += 1
            st.drafted += len(drafts)
            st.accepted += m
            key = format_units(units) if drafts else "none (plain step)"
            st.skip_sets[key] = st.skip_sets.get(key, 0) + 1
            if auto:
                auto.observe(len(drafts), m, steps, t_draft, t_verify)
            if not self.draft_length:
                if drafts and m == len(drafts) and len(drafts) == k_max:
                    k_len = min(self.max_draft, k_len + 1)
                elif drafts and m + 1 < len(drafts):
                    k_len = max(1, k_len - 1)

            for tok in drafts[:m] + [nxt]:
                out.append(tok)
                tokens.append(tok)
                if tok in eos or len(out) >= max_new_tokens:
                    done = True
                    break
        st.seconds = time.perf_counter() - t0
        st.new_tokens = len(out)
        return GenerationResult(out, st)

    def _search_step(self, auto: AutoSkip, tokens: list[int], full_argmax: dict[int, int], cache) -> None:
        """Score one candidate skip set on the recent text: one teacher-forced draft pass."""
        for _ in range(8):
            cand = auto.next_candidate()
            if cand is None:
                auto.left = 0
                return
            if auto.predict(0.99, cand)[0] > 1.0:
                break
            auto.unwinnable(cand)  # too little skipped to pay even if every draft were accepted: no pass needed
        else:
            return
        end = len(tokens) - 1  # positions [start, end) are in the cache
        start = end - self.window
        while start < end and (start < 1 or any(j not in full_argmax for j in range(start, end))):
            start += 1
        if end - start < 4:
            return  # not enough known positions yet; try next cycle
        view = _prefix_cache(self.model, cache, start)
        with skipping(self.model, cand):
            lg = _forward(self.model, tokens[start:end], view, keep=end - start)
        pred = lg.argmax(-1).tolist()
        agree = sum(int(p == full_argmax[start + r]) for r, p in enumerate(pred)) / len(pred)
        auto.record(cand, agree)


def _prefix_cache(model, cache, length: int):
    """A new cache holding the first ``length`` positions of ``cache`` (the original is untouched)."""
    c = _new_cache(model)
    for i, lay in enumerate(cache.layers):
        if getattr(lay, "is_initialized", False) and lay.keys is not None and lay.keys.numel():
            c.update(lay.keys[..., :length, :], lay.values[..., :length, :], i)
    return c


def self_speculative_generate(model, input_ids, max_new_tokens: int, skip: str | Iterable[Unit] = "auto", **kw) -> GenerationResult:
    """Functional form of :class:`SelfSpeculativeDecoder` (decoder options and sampling options in ``kw``)."""
    dec_keys = ("max_draft", "draft_length", "confidence", "window", "search_budget")
    dec = {k: kw.pop(k) for k in dec_keys if k in kw}
    if "seed" in kw:
        dec["seed"] = kw["seed"]
    return SelfSpeculativeDecoder(model, skip, **dec).generate(input_ids, max_new_tokens, **kw)
