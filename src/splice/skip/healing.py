"""Healing: a short fine-tune of a pruned model on calibration text, as the pruning papers do.

Only the layers next to each cut are trained (the kept layer just before and
just after every dropped block), with AdamW on next-token loss; everything
else is frozen, so a few hundred steps fit on a CPU. The loss is measured
before and after on a held-out tenth of the calibration text (never trained
on). The result is written through the engine's ``write_checkpoint``, with the
pruned folder's config, tokenizer and card.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

from .. import architecture as arch
from .calibration import chunks, tokenize
from .errors import SkipError, check_float, check_int


def neighbours(plan, new_layers: int) -> list[int]:
    """New indices of the kept layers adjacent to a dropped layer or MLP block."""
    kept = plan.kept_layers
    new_of = {old: new for new, old in enumerate(kept)}
    cut = set(plan.drop_layers) | set(plan.drop_mlp)
    out = set()
    for old in cut:
        for nb in (old - 1, old + 1):
            while nb in plan.drop_layers:
                nb += 1 if nb > old else -1
            if nb in new_of and nb not in plan.drop_mlp:
                out.add(new_of[nb])
    return sorted(i for i in out if i < new_layers)


@torch.no_grad()
def heldout_loss(model, seqs: list[torch.Tensor]) -> float:
    tot, n = 0.0, 0
    for s in seqs:
        x = s.view(1, -1)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        tot += float(loss) * (len(s) - 1)
        n += len(s) - 1
    return tot / max(n, 1)


def heal(
    pruned: str | os.PathLike,
    text: str,
    out: str | os.PathLike,
    *,
    steps: int,
    lr: float = 1e-4,
    batch: int = 4,
    seq_len: int = 256,
    max_tokens: int = 16384,
    seed: int = 0,
    force: bool = False,
    quiet: bool = True,
    plan=None,
    layers: list[int] | None = None,
    tune_malloc: bool = False,
) -> dict:
    """Fine-tune the layers next to the cuts of the model in ``pruned`` and write it to ``out``.

    Args:
        pruned: the pruned model's folder.
        text: the calibration text; a tenth of its tokens is held out to measure the loss.
        out: the output folder.
        steps: AdamW steps (>= 1); lr: peak learning rate (> 0, warm-up then cosine); batch:
            sequences per step (>= 1); seq_len: tokens per sequence (>= 2); max_tokens: text used (>= 1).
        plan: the plan that pruned it: the layers next to its cuts are trained. Or give ``layers``
            (new numbering); with neither, every layer is.

    Returns:
        The trained layers, steps, held-out loss before and after, seconds, first and last training loss.
    """
    from ..hf import load_causal_lm

    check_int("steps", steps, 1)
    check_float("lr", lr, 0.0, low_open=True)
    check_int("batch", batch, 1)
    check_int("seq_len", seq_len, 2)
    check_int("max_tokens", max_tokens, 1)
    torch.manual_seed(seed)
    model, tok = load_causal_lm(pruned, with_tokenizer=True, bypass_zero_mlps=True)
    ids = tokenize(tok, text, max_tokens)
    n_held = max(len(ids) // 10, 2)
    if len(ids) - n_held < 8:
        raise SkipError(f"calibration text: {len(ids)} tokens is too little to heal on (need a few hundred)")
    train, held = ids[:-n_held], ids[-n_held:]
    held_seqs = chunks(held, seq_len)
    dec = arch.decoder_layers(model)
    if layers is None:
        layers = neighbours(plan, len(dec)) if plan is not None else list(range(len(dec)))
    if not layers:
        raise SkipError("nothing to heal: the plan drops nothing")
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for i in layers:
        for name, p in dec[i].named_parameters():
            p.requires_grad_(True)
            params.append(p)
    before = heldout_loss(model, held_seqs)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    L = min(seq_len, len(train) - 1)
    t0 = time.perf_counter()
    model.train()
    train_losses = []
    for step in range(steps):
        starts = torch.randint(0, len(train) - L, (batch,), generator=g)
        x = torch.stack([train[s : s + L] for s in starts.tolist()])
        lr_now = lr * min(1.0, (step + 1) / max(1, steps // 10)) * (0.5 * (1 + math.cos(math.pi * step / steps)))
        for grp in opt.param_groups:
            grp["lr"] = lr_now
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_losses.append(float(loss.detach()))
        if not quiet:
            print(f"\rhealing: step {step + 1}/{steps} loss {float(loss):.4f}", end="", file=sys.stderr, flush=True)
    if not quiet:
        print(file=sys.stderr)
    model.eval()
    after = heldout_loss(model, held_seqs)
    seconds = time.perf_counter() - t0

    _write_healed(
        model.state_dict(),
        pruned,
        out,
        force=force,
        quiet=quiet,
        tune_malloc=tune_malloc,
        note=(
            f"\n## Healing\n\nAfter pruning, layers {layers} (new numbering) were fine-tuned for {steps} steps "
            f"(AdamW, lr {lr}, batch {batch}x{L} tokens) on calibration text. Held-out loss "
            f"{before:.4f} -> {after:.4f}.\n"
        ),
    )
    return {
        "layers": layers,
        "steps": steps,
        "loss_before": before,
        "loss_after": after,
        "seconds": seconds,
        "train_loss_first": train_losses[0],
        "train_loss_last": train_losses[-1],
    }


def _write_healed(sd: dict, pruned, out, *, force: bool, quiet: bool, tune_malloc: bool, note: str) -> None:
    """The pruned folder's tensors (trained ones replaced) and side files, with ``note`` added to its card."""
    from ..checkpoint import SideFiles, open_model
    from ..engine.write import Entry, write_checkpoint

    src = open_model(pruned)
    try:
        entries = []
        for n in src.keys():
            info = src.info(n)
            compute = (lambda t=sd[n]: t.detach()) if n in sd else (lambda n=n: src.get(n))
            entries.append(Entry(n, info.dtype, tuple(info.shape), compute, info.nbytes, check_finite=n in sd))
        card = Path(pruned) / "README.md"
        old_card = card.read_text(encoding="utf-8") if card.exists() else ""
        side = SideFiles(
            config=src.config,
            model=str(pruned),
            tokenizer_dir=src.tokenizer_dir(),
            generation_config=src.generation_config(),
            card=lambda _hashes, _tokenizer_files: old_card + note,
        )
        write_checkpoint(out, entries, side, inputs=[pruned], force=force, tune_malloc=tune_malloc, label="heal", quiet=quiet)
    finally:
        src.close()
