"""The decoding loops: plain token-by-token decoding and lossless self-speculative decoding.

One self-speculative cycle (Draft & Verify, Zhang et al. 2024; SWIFT, Xia et al. 2025):

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
   (:mod:`splice.skip.sampling`), so every token is distributed exactly as the
   full model's.

``skip="auto"`` picks the bypassed set on the fly (:mod:`splice.skip.autoskip`).
The draft length follows the acceptance of the previous cycles. ``generate``
runs either decoding (and, to compare, plain decoding on the same prompt) from
a model reference and prompt text.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .. import architecture as arch
from ..errors import option
from .autoskip import AutoSkip, AutoSkipConfig
from .calibration import read_text_file, stream_hooks
from .errors import SkipError, check_float, check_int
from .runtime import check_units, crop_cache, forward_logits, new_cache, skipping
from .sampling import accept_drafts, check_sampling, sample_token, warp
from .units import Unit, format_units, normalize, parse_units

# The first draft length before acceptance is known: a guess between drafting little and wasting verification.
FIRST_DRAFT_LENGTH = 4

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
    """Token-by-token decoding with a KV cache (optionally with ``skip`` units bypassed throughout).

    Args:
        model: a loaded ``transformers`` causal LM.
        input_ids: the prompt's token ids (a list, or a tensor of one sequence).
        max_new_tokens: at most this many new tokens (>= 1).
        temperature: 0 for greedy decoding, else the sampling temperature; ``top_k`` (0: off) and
            ``top_p`` (1: off) narrow the distribution sampled from.
        seed: seeds sampling.
        eos_token_id: stop after generating this token (or any of these).
        skip: units bypassed for the whole generation (lossy: e.g. to try a plan).

    Returns:
        The new tokens and timing statistics.
    """
    check_int("max_new_tokens", max_new_tokens, 1)
    check_sampling(temperature, top_k, top_p)
    ids = _as_list(input_ids)
    eos = _eos_set(eos_token_id)
    gen = torch.Generator().manual_seed(seed)
    st = GenerationStats()
    out: list[int] = []
    t0 = time.perf_counter()
    with skipping(model, skip):
        cache = new_cache(model)
        logits = forward_logits(model, ids, cache)[-1]
        st.prefill_seconds = time.perf_counter() - t0
        while True:
            tok = int(logits.argmax()) if temperature <= 0 else sample_token(warp(logits, temperature, top_k, top_p), gen)
            out.append(tok)
            if len(out) >= max_new_tokens or tok in eos:
                break
            logits = forward_logits(model, [tok], cache)[-1]
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


# ------------------------------------------------------------------ self-speculative decoding


@dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_k: int
    top_p: float

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return warp(logits, self.temperature, self.top_k, self.top_p)


def check_draft(max_draft: int, draft_length: int | None, confidence: float) -> None:
    """``max_draft`` >= 1, ``draft_length`` None or >= 1, ``confidence`` in [0, 1]; else a ``SkipError``."""
    check_int("max_draft", max_draft, 1)
    if draft_length is not None:
        check_int("draft_length", draft_length, 1)
    check_float("confidence", confidence, 0.0, 1.0)


class SelfSpeculativeDecoder:
    """Lossless self-speculative decoding for one ``transformers`` causal LM.

    Args:
        model: a loaded ``transformers`` causal LM.
        skip: ``"auto"``, a skip-set string (``"8-15,mlp20"``) or a set of ``(layer, kind)`` units.
        max_draft: longest draft per cycle.
        draft_length: fix the draft length (no adaptation).
        confidence: stop drafting when the draft's top probability falls below it (0 disables).
        auto: the constants of the ``auto`` policy.
        seed: seeds sampling and the ``auto`` search.
    """

    def __init__(
        self,
        model,
        skip: str | Iterable[Unit] = "auto",
        *,
        max_draft: int = 8,
        draft_length: int | None = None,
        confidence: float = 0.3,
        auto: AutoSkipConfig | None = None,
        seed: int = 0,
    ):
        check_draft(max_draft, draft_length, confidence)
        self.model = model
        self.max_draft = max_draft
        self.draft_length = draft_length
        self.confidence = confidence
        self.auto = isinstance(skip, str) and skip.strip().lower() == "auto"
        self.auto_config = auto or AutoSkipConfig()
        self.seed = seed
        self.units: set[Unit] = set()
        if not self.auto:
            units = parse_units(skip, len(arch.decoder_layers(model))) if isinstance(skip, str) else normalize(skip)
            self.units = check_units(model, units)
            if not self.units:
                raise SkipError("self-speculative decoding needs a non-empty skip set (or 'auto')")

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
        """Up to ``max_new_tokens`` tokens after ``input_ids``: greedy (``temperature`` 0) or sampled."""
        check_int("max_new_tokens", max_new_tokens, 1)
        check_sampling(temperature, top_k, top_p)
        model = self.model
        ids = _as_list(input_ids)
        eos = _eos_set(eos_token_id)
        smp = _Sampling(temperature, top_k, top_p)
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        st = GenerationStats()
        auto = AutoSkip(model, self.auto_config, max_draft=self.max_draft, seed=self.seed) if self.auto else None
        k_len = self.draft_length or (FIRST_DRAFT_LENGTH if self.auto else min(FIRST_DRAFT_LENGTH, self.max_draft))
        t0 = time.perf_counter()

        # prompt pass with the full model (hooks give the auto search its first ranking)
        cache = new_cache(model)
        if auto:
            keep = min(len(ids), self.auto_config.window + 1)
            with stream_hooks(auto.layers) as cur:
                logits = forward_logits(model, ids, cache, keep=keep)
            auto.set_influence(cur)
            cur.clear()
        else:
            keep = 1
            logits = forward_logits(model, ids, cache, keep=keep)
        tokens = list(ids)
        # full_argmax[j]: the full model's argmax after tokens[:j+1] (known for recent positions)
        full_argmax: dict[int, int] = {len(ids) - keep + r: int(a) for r, a in enumerate(logits.argmax(-1))}
        last = logits[-1]
        first = int(last.argmax()) if smp.greedy else sample_token(smp.probs(last), gen)
        out = [first]
        tokens.append(first)
        st.prefill_seconds = time.perf_counter() - t0
        done = first in eos or max_new_tokens <= 1

        while not done:
            # cache holds tokens[:-1]; tokens[-1] is pending
            base = len(tokens) - 1
            if auto and auto.wants_search(len(out)):
                t = time.perf_counter()
                auto.search_step(tokens, full_argmax, cache)
                st.search_seconds += time.perf_counter() - t
                st.searches += 1
                if not self.draft_length and auto.best is not None:
                    k_len = max(1, auto.draft_length())
            units = auto.current() if auto else self.units
            if auto and auto.t_step is None:
                units = frozenset()  # one plain step first: the timing model needs its cost
            k_max = max(0, min(k_len, self.max_draft, max_new_tokens - len(out) - 1)) if units else 0

            t = time.perf_counter()
            drafts, qs, steps = self._draft(units, tokens[-1], cache, k_max, smp, gen, eos) if k_max > 0 else ([], [], 0)
            crop_cache(cache, base)
            t_draft = time.perf_counter() - t
            st.draft_seconds += t_draft

            t = time.perf_counter()
            m, nxt, am = self._verify(tokens[-1], drafts, qs, cache, smp, gen)
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
                k_len = _next_draft_length(k_len, len(drafts), m, k_max, self.max_draft)

            for tok in drafts[:m] + [nxt]:
                out.append(tok)
                tokens.append(tok)
                if tok in eos or len(out) >= max_new_tokens:
                    done = True
                    break
        st.seconds = time.perf_counter() - t0
        st.new_tokens = len(out)
        return GenerationResult(out, st)

    def _draft(self, units, pending: int, cache, k_max: int, smp: _Sampling, gen, eos: set[int]):
        """Up to ``k_max`` draft tokens after ``pending`` with ``units`` bypassed: (drafts, their distributions, steps run)."""
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        steps = 0
        with skipping(self.model, units):
            x = pending
            for i in range(k_max):
                lg = forward_logits(self.model, [x], cache)[-1]
                steps += 1
                if smp.greedy:
                    if self.confidence > 0 and i > 0 and float(torch.softmax(lg, -1).max()) < self.confidence:
                        break
                    d = int(lg.argmax())
                else:
                    q = smp.probs(lg)
                    # the stop rule looks at q only (never at the sampled token): no bias
                    if self.confidence > 0 and i > 0 and float(q.max()) < self.confidence:
                        break
                    d = sample_token(q, gen)
                    qs.append(q)
                drafts.append(d)
                if d in eos:
                    break
                x = d
        return drafts, qs, steps

    def _verify(self, pending: int, drafts: list[int], qs: list[torch.Tensor], cache, smp: _Sampling, gen):
        """One full-model pass over ``pending`` and the drafts: (drafts kept, the next token, the full model's argmaxes)."""
        lg = forward_logits(self.model, [pending] + drafts, cache, keep=len(drafts) + 1)
        am = lg.argmax(-1)
        if smp.greedy:
            m = 0
            while m < len(drafts) and drafts[m] == int(am[m]):
                m += 1
            return m, int(am[m]), am
        p = smp.probs(lg)
        m, nxt = accept_drafts(p, torch.stack(qs) if qs else p[:0], drafts, gen)
        return m, nxt, am


def _next_draft_length(k_len: int, drafted: int, accepted: int, k_max: int, max_draft: int) -> int:
    """One longer after a full acceptance of a full-length draft, one shorter after an early rejection."""
    if drafted and accepted == drafted and drafted == k_max:
        return min(max_draft, k_len + 1)
    if drafted and accepted + 1 < drafted:
        return max(1, k_len - 1)
    return k_len


def self_speculative_generate(model, input_ids, max_new_tokens: int, skip: str | Iterable[Unit] = "auto", **kw) -> GenerationResult:
    """Functional form of :class:`SelfSpeculativeDecoder` (decoder options and sampling options in ``kw``)."""
    dec_keys = ("max_draft", "draft_length", "confidence", "auto")
    dec = {k: kw.pop(k) for k in dec_keys if k in kw}
    if "seed" in kw:
        dec["seed"] = kw["seed"]
    return SelfSpeculativeDecoder(model, skip, **dec).generate(input_ids, max_new_tokens, **kw)


# ------------------------------------------------------------------ from a model reference and prompt text


@dataclass
class Generation:
    """What ``generate`` returns: the text and tokens, and, with ``compare``, plain decoding of the same prompt."""

    tokens: list[int]  # new tokens only
    stats: GenerationStats
    text: str | None = None
    plain: GenerationResult | None = None  # plain decoding on the same prompt (``compare``)

    @property
    def identical(self) -> bool | None:
        """Whether plain decoding gave the same tokens (None without ``compare``)."""
        return None if self.plain is None else self.plain.tokens == self.tokens

    @property
    def speedup(self) -> float | None:
        """Tokens per second against plain decoding's (None without ``compare``, or when plain took no time)."""
        if self.plain is None or not self.plain.stats.tokens_per_second:
            return None
        return self.stats.tokens_per_second / self.plain.stats.tokens_per_second

    def to_dict(self) -> dict:
        d = {"text": self.text, "tokens": self.tokens, "stats": self.stats.to_dict()}
        if self.plain is not None:
            d["plain"] = {"stats": self.plain.stats.to_dict(), "identical": self.identical}
            d["speedup"] = self.speedup
        return d


def read_prompt(path: str | os.PathLike) -> str:
    """The prompt text in ``path`` (UTF-8); a one-line error when it is missing, unreadable or not text."""
    return read_text_file(path, "prompt file", allow_empty=True)


def generate(
    model,
    prompt: str | list[int],
    max_new_tokens: int = 128,
    *,
    tokenizer=None,
    self_speculative: str | Iterable[Unit] | None = None,
    skip: str | Iterable[Unit] | None = None,
    compare: bool = False,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    max_draft: int = 8,
    draft_length: int | None = None,
    confidence: float = 0.3,
    ignore_eos: bool = False,
) -> Generation:
    """Generate after ``prompt``: plainly, with ``skip`` units bypassed, or self-speculatively.

    Args:
        model: a model reference (folder, ``.safetensors``, ``.gguf``, cached id: loaded with its
            tokenizer, zeroed MLP blocks bypassed) or a loaded ``transformers`` causal LM.
        prompt: text (needs a tokenizer) or token ids.
        max_new_tokens: at most this many new tokens.
        tokenizer: the tokenizer for a loaded ``model`` (encodes a text prompt, decodes the result).
        self_speculative: draft with these units bypassed (``"auto"``, ``"8-15,mlp20"``, or units) and
            verify with the full model: the output is the full model's.
        skip: bypass these units for the whole generation (lossy). Not with ``self_speculative``.
        compare: also run plain decoding on the same prompt (``Generation.plain``, ``.identical``, ``.speedup``).
        temperature, top_k, top_p, seed: sampling (``temperature`` 0: greedy).
        max_draft, draft_length, confidence: the self-speculative draft (see :class:`SelfSpeculativeDecoder`).
        ignore_eos: do not stop at the tokenizer's end-of-sequence token.

    Returns:
        A :class:`Generation`.
    """
    check_int("max_new_tokens", max_new_tokens, 1)
    check_sampling(temperature, top_k, top_p)
    check_draft(max_draft, draft_length, confidence)
    if self_speculative is not None and skip is not None:
        raise SkipError(f"{option('skip', 'SKIP')} and {option('self_speculative', 'SKIP')} do not go together")
    if isinstance(model, (str, os.PathLike)):
        from ..hf import load_causal_lm

        model, tokenizer = load_causal_lm(model, with_tokenizer=True, bypass_zero_mlps=True)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise SkipError("a text prompt needs the model's tokenizer (pass tokenizer=...)")
        prompt = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    eos = None if ignore_eos or tokenizer is None else tokenizer.eos_token_id
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos)
    if self_speculative is not None:
        decoder = SelfSpeculativeDecoder(
            model, self_speculative, max_draft=max_draft, draft_length=draft_length, confidence=confidence, seed=seed
        )
        res = decoder.generate(prompt, max_new_tokens, **sampling)
    else:
        units = parse_units(skip, len(arch.decoder_layers(model))) if isinstance(skip, str) else (skip or ())
        res = generate_plain(model, prompt, max_new_tokens, skip=units, **sampling)
    plain = generate_plain(model, prompt, max_new_tokens, **sampling) if compare else None
    text = tokenizer.decode(res.tokens, skip_special_tokens=True) if tokenizer is not None else None
    return Generation(res.tokens, res.stats, text, plain)
