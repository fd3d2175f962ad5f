"""Self-speculative decoding: greedy output identical to plain greedy; sampling keeps the full model's distribution."""

import math

import pytest
import torch
import transformers as tf

from splice.hf import load_causal_lm
from splice.skip import SelfSpeculativeDecoder, SkipError, accept_drafts, generate_plain, parse_units, skipping, warp

PROMPTS = [[2, 5, 7], [9, 8, 7, 6, 5, 4, 3, 40, 41], [17]]


@pytest.fixture(scope="module")
def m64(skip_models):
    models, _ = skip_models
    return load_causal_lm(models["llama64"], dtype=torch.float64)


@pytest.mark.parametrize("skip", ["2-3", "1,4", "mlp1-4", "attn2,attn3,mlp4", "auto"])
def test_greedy_equals_plain_greedy(m64, skip):
    for prompt in PROMPTS:
        plain = generate_plain(m64, prompt, 20)
        dec = SelfSpeculativeDecoder(m64, skip, max_draft=5)
        got = dec.generate(prompt, 20)
        assert got.tokens == plain.tokens, (skip, prompt)
        assert got.stats.new_tokens == 20 and got.stats.cycles >= 1
        assert 0 <= got.stats.accepted <= got.stats.drafted


def test_plain_greedy_equals_transformers_generate(m64):
    for prompt in PROMPTS[:2]:
        hf = m64.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert generate_plain(m64, prompt, 12).tokens == hf[0, len(prompt) :].tolist()


def test_greedy_stops_at_eos_like_plain(m64):
    prompt = PROMPTS[1]
    ref = generate_plain(m64, prompt, 20).tokens
    eos = ref[6]
    plain = generate_plain(m64, prompt, 20, eos_token_id=eos)
    assert plain.tokens == ref[: ref.index(eos) + 1]
    assert SelfSpeculativeDecoder(m64, "1-3").generate(prompt, 20, eos_token_id=eos).tokens == plain.tokens


def test_float32_model_and_fixed_draft_length(skip_models):
    models, _ = skip_models
    m = load_causal_lm(models["qwen2"])
    for prompt in PROMPTS:
        plain = generate_plain(m, prompt, 16)
        got = SelfSpeculativeDecoder(m, "mlp1-4,attn2", draft_length=3, confidence=0).generate(prompt, 16)
        assert got.tokens == plain.tokens


def test_skip_sets_parse_and_fail_clearly(m64):
    assert parse_units("2-3,mlp5,attn1", 6) == {(2, "layer"), (3, "layer"), (5, "mlp"), (1, "attn")}
    assert parse_units("attn2,mlp2", 6) == {(2, "layer")}
    with pytest.raises(SkipError, match="does not exist"):
        parse_units("4-9", 6)
    with pytest.raises(SkipError, match="cannot read"):
        parse_units("layers4", 6)
    with pytest.raises(SkipError, match="non-empty"):
        SelfSpeculativeDecoder(m64, "")


def test_skipping_context_restores_the_model(m64):
    x = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        before = m64(x).logits
        with skipping(m64, {(1, "layer"), (2, "mlp"), (3, "attn")}):
            during = m64(x).logits
        after = m64(x).logits
    assert not torch.allclose(before, during)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


# ------------------------------------------------------------------ sampling


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor, n: int) -> bool:
    """Pearson chi-square against ``probs`` at p ~ 1e-4 (Wilson-Hilferty approximation of the threshold)."""
    keep = probs * n >= 1
    exp = probs[keep] * n
    stat = float(((counts[keep] - exp) ** 2 / exp).sum()) + float(counts[~keep].sum())  # mass where none is expected
    k = int(keep.sum()) - 1
    z = 3.72  # one-sided 1e-4
    crit = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return stat < crit


def test_acceptance_rule_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    V = 6
    p = torch.softmax(torch.randn(3, V, generator=g, dtype=torch.float64) * 2, -1)
    q = torch.softmax(torch.randn(2, V, generator=g, dtype=torch.float64) * 2, -1)
    n = 6000
    first = torch.zeros(V)
    for _ in range(n):
        d = [int(torch.multinomial(q[0], 1, generator=g)), int(torch.multinomial(q[1], 1, generator=g))]
        m, nxt = accept_drafts(p, q, d, g)
        toks = d[:m] + [nxt]
        first[toks[0]] += 1
    assert 0.5 * (first / n - p[0].float()).abs().sum() < 0.03
    assert _chi2_ok(first, p[0], n)
    # and the draft really was different from the target
    assert 0.5 * (p[0] - q[0]).abs().sum() > 0.2


def test_sampling_end_to_end_matches_full_model_distribution():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    m = tf.LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(6.0)  # peaky distributions that the layer-skipped draft gets visibly wrong
    prompt = [1, 2, 3]
    units = {(1, "layer"), (2, "layer")}
    with torch.no_grad():
        p1 = torch.softmax(m(torch.tensor([prompt])).logits[0, -1], -1)
        # exact distribution of the 2nd new token: sum over the 1st
        p2 = torch.zeros(8, dtype=torch.float64)
        for a in range(8):
            p2 += p1[a] * torch.softmax(m(torch.tensor([prompt + [a]])).logits[0, -1], -1)
        with skipping(m, units):
            q1 = torch.softmax(m(torch.tensor([prompt])).logits[0, -1], -1)
    assert 0.5 * float((p1 - q1).abs().sum()) > 0.1
    dec = SelfSpeculativeDecoder(m, units, draft_length=2, confidence=0)
    n = 800
    c2 = torch.zeros(8)
    drafted = accepted = 0
    for s in range(n):
        r = dec.generate(prompt, 3, temperature=1.0, seed=s)
        c2[r.tokens[1]] += 1
        drafted += r.stats.drafted
        accepted += r.stats.accepted
    assert drafted == n and 0 < accepted < drafted  # one draft per run (for the 2nd token), sometimes rejected
    assert _chi2_ok(c2, p2, n)
    assert 0.5 * float((c2 / n - p2).abs().sum()) < 0.08


def test_warp_top_k_top_p():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    p = warp(logits, 1.0, top_k=2)
    assert (p[2:] == 0).all() and p.sum().item() == pytest.approx(1)
    p = warp(logits, 1.0, top_p=0.5)
    assert p[0] == 1.0
    base = torch.softmax(logits.double(), -1)
    p = warp(logits, 1.0, top_p=float(base[0] + base[1]) + 1e-6)
    assert (p[:3] > 0).all() and p[3] == 0


def test_auto_predicts_gain_only_for_cheap_agreeing_drafts(m64):
    from splice.skip import AutoSkip

    a = AutoSkip(m64)
    few, many = a.ranked(0.02), a.ranked(0.5)
    assert len(few) >= 1 and len(many) > len(few)
    assert a.draft_cost({(2, "layer")}) == pytest.approx(a.draft_cost({(2, "attn"), (2, "mlp")}))
    assert a.predict(0.0, many) == (1.0, 0)  # nothing accepted: do not draft
    gain, k = a.predict(0.95, many)
    assert gain > 1.0 and k >= 2
    assert a.need(many) < a.need(few) <= 1.0  # cheaper drafts need less agreement to pay
    a.beta = 2.0  # verification as dear as two more steps per token: nothing pays
    assert a.predict(0.99, many) == (1.0, 0) and a.need(many) == 1.0
