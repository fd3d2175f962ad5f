"""``splice eval``: measure what a checkpoint (or a composition) is worth on real text and tasks.

from splice.eval import evaluate
res = evaluate(["zoo/models/base", "merged/"], domains={"news": "zoo/data/news/heldout.txt"},
               tasks={"bbc_topics": "zoo/data/tasks/bbc_topics.jsonl"}, max_tokens=4096)
res["models"]["merged/"]["domains"]["news"]["loss"]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .choice import multiple_choice, read_task
from .perplexity import DomainResult, domain_loss, read_text
from .scores import normalized_scores

__all__ = [
    "evaluate",
    "evaluate_model",
    "normalized_scores",
    "domain_loss",
    "multiple_choice",
    "read_task",
    "read_text",
    "DomainResult",
    "run_lm_eval",
]


def _name_models(refs: list[str]) -> dict[str, str]:
    """Short unique display names: the folder name, or the full reference when names clash."""
    base = [Path(str(r).rstrip("/")).name or str(r) for r in refs]
    return {str(r): (b if base.count(b) == 1 else str(r)) for r, b in zip(refs, base)}


def evaluate_model(
    ref,
    domains: dict[str, str],
    tasks: dict[str, str] | None = None,
    *,
    max_tokens: int | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    quiet: bool = False,
    label: str | None = None,
    texts: dict[str, str] | None = None,
    task_items: dict[str, list] | None = None,
) -> dict:
    """Evaluate one checkpoint on every domain and task; returns a JSON-ready dict."""
    import torch

    from ..hf import load_causal_lm

    t0 = time.time()
    model, tok = load_causal_lm(ref, with_tokenizer=True)
    if tok.pad_token_id is None:  # batches are right-padded; padded positions are masked out of the loss
        tok.pad_token = tok.eos_token
    load_s = time.time() - t0
    texts = texts or {d: read_text(p) for d, p in domains.items()}
    task_items = task_items or {t: read_task(p) for t, p in (tasks or {}).items()}
    ctx = getattr(model.config, "max_position_embeddings", None) or seq_len
    sl = min(seq_len, int(ctx))
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"eval {label or ref}", unit="win", leave=False, file=sys.stderr)
    upd = bar.update if bar is not None else None
    out = {"path": str(ref), "domains": {}, "tasks": {}}
    n_threads = torch.get_num_threads()
    try:
        for d, text in texts.items():
            out["domains"][d] = domain_loss(
                model, tok, text, seq_len=sl, max_tokens=max_tokens, batch_size=batch_size, progress=upd
            ).to_dict()
        for t, items in task_items.items():
            out["tasks"][t] = multiple_choice(model, tok, items, progress=upd)
    finally:
        if bar is not None:
            bar.close()
    out["seconds"] = round(time.time() - t0, 2)
    out["load_seconds"] = round(load_s, 2)
    out["seq_len"] = sl
    out["threads"] = n_threads
    del model
    return out


def evaluate(
    models: list,
    domains: dict[str, str],
    tasks: dict[str, str] | None = None,
    *,
    max_tokens: int | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    quiet: bool = False,
    base: str | None = None,
    experts: dict[str, str] | None = None,
    general: str | None = None,
    names: dict[str, str] | None = None,
) -> dict:
    """Evaluate several checkpoints on the same domains/tasks; add normalized scores when a base is named.

    ``base`` and ``experts`` (domain -> model reference) name models among ``models``.
    """
    refs = [str(m) for m in models]
    names = names or _name_models(refs)
    texts = {d: read_text(p) for d, p in domains.items()}
    items = {t: read_task(p) for t, p in (tasks or {}).items()}
    res: dict = {
        "domains": {d: str(p) for d, p in domains.items()},
        "tasks": {t: str(p) for t, p in (tasks or {}).items()},
        "max_tokens": max_tokens,
        "models": {},
    }
    for r in refs:
        res["models"][names[r]] = evaluate_model(
            r,
            domains,
            tasks,
            max_tokens=max_tokens,
            seq_len=seq_len,
            batch_size=batch_size,
            quiet=quiet,
            label=names[r],
            texts=texts,
            task_items=items,
        )
    if base is not None:
        losses = {n: {d: v["loss"] for d, v in m["domains"].items()} for n, m in res["models"].items()}
        ex = {d: names.get(str(e), str(e)) for d, e in (experts or {}).items()}
        scores = normalized_scores(losses, names.get(str(base), str(base)), ex, general)
        for n, s in scores.items():
            res["models"][n]["scores"] = s
        res["base"] = names.get(str(base), str(base))
        res["experts"] = ex
        res["general_domain"] = general
    return res


def run_lm_eval(ref, tasks: list[str], *, batch_size: int = 8, limit: int | None = None) -> dict:
    """Run EleutherAI lm-evaluation-harness tasks on a checkpoint (needs ``lm_eval`` importable).

    Non-folder sources (e.g. GGUF) are converted to a temporary HF folder first.
    """
    try:
        import lm_eval  # noqa: F401
        from lm_eval import simple_evaluate
    except ImportError:
        from ..errors import SpliceError

        raise SpliceError("--lm-eval needs the lm-eval package (pip install lm-eval); it is not importable") from None
    import tempfile

    from ..checkpoint.reader import FolderSource, open_model

    src = open_model(ref)
    tmp = None
    path = Path(src.path)
    if type(src) is not FolderSource:
        from ..checkpoint.gguf import gguf_to_folder

        tmp = tempfile.TemporaryDirectory(prefix="splice-lmeval-")
        path = gguf_to_folder(src, tmp.name)
    src.close()
    try:
        r = simple_evaluate(
            model="hf",
            model_args=f"pretrained={path},dtype=float32,trust_remote_code=False",
            tasks=tasks,
            batch_size=batch_size,
            limit=limit,
            device="cpu",
        )
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"results": r.get("results", {}), "versions": r.get("versions", {})} if r else {}


def format_table(res: dict) -> str:
    """A plain-text table: one row per model, loss per domain, task accuracy, normalized score, forgetting."""
    doms = list(res["domains"])
    tasks = list(res.get("tasks", {}))
    head = ["model"] + [f"{d} loss" for d in doms] + [f"{t} acc" for t in tasks]
    has_scores = any("scores" in m for m in res["models"].values())
    if has_scores:
        head += ["norm", "forget%"]
    head += ["sec"]
    rows = [head]
    for n, m in res["models"].items():
        row = [n] + [f"{m['domains'][d]['loss']:.4f}" for d in doms] + [f"{m['tasks'][t]['acc']:.3f}" for t in tasks]
        if has_scores:
            s = m.get("scores", {})
            row += [
                "-" if s.get("normalized") is None else f"{s['normalized']:.3f}",
                "-" if s.get("forgetting") is None else f"{100 * s['forgetting']:+.2f}",
            ]
        row.append(f"{m['seconds']:.1f}")
        rows.append(row)
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows)


def write_json(res: dict, path: str | os.PathLike) -> None:
    import json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res, indent=2) + "\n")
