"""Where a built MoE sends held-out text: the share of each domain's tokens its routers give to that domain's expert.

A MoE made from domain experts routes well when the tokens of a domain go to the
expert tuned on it. ``domain_routing`` measures that on text no router saw: per
layer, the share of a domain's tokens whose top-1 expert is the domain's own.
"""

from __future__ import annotations


def domain_routing(
    model,
    tokenizer,
    texts: dict[str, str],
    own: dict[str, int],
    *,
    seq_len: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> dict[str, list[float]]:
    """Per domain in ``own``: for each layer, the share of its tokens whose top-1 expert is ``own[domain]``.

    Args:
        model: a loaded ``transformers`` MoE causal LM (one that returns ``router_logits``).
        tokenizer: its tokenizer.
        texts: domain -> held-out text; domains not in ``own`` are left out.
        own: domain -> index of that domain's expert in the MoE.
        seq_len, max_tokens, batch_size: the windows, as ``splice eval`` cuts them (``splice.eval.perplexity.windows``).
    Returns:
        ``{domain: [share at layer 0, share at layer 1, ...]}``, each share in [0, 1].
    """
    import torch

    from ..eval.perplexity import padded_batch, windows

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[str, list[float]] = {}
    with torch.inference_mode():
        for dom, expert in own.items():
            if dom not in texts:
                continue
            wins, _ = windows(tokenizer, texts[dom], seq_len, max_tokens)
            hits = None
            count = 0
            for b in range(0, len(wins), batch_size):
                ids, mask = padded_batch(wins[b : b + batch_size], pad)
                res = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
                valid = mask.reshape(-1).bool()
                per = torch.stack([(r.reshape(-1, r.shape[-1])[valid].argmax(-1) == expert).sum() for r in res.router_logits])
                hits = per if hits is None else hits + per
                count += int(valid.sum())
            out[dom] = [] if hits is None else [float(h) / count for h in hits]
    return out
