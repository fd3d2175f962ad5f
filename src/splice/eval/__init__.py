"""``splice eval``: measure what a checkpoint (or a composition) is worth on real text and tasks.

from splice.eval import evaluate
res = evaluate(["zoo/models/base", "merged/"], domains={"news": "zoo/data/news/heldout.txt"},
               tasks={"bbc_topics": "zoo/data/tasks/bbc_topics.jsonl"}, max_tokens=4096)
res["models"]["merged/"]["domains"]["news"]["loss"]
res = evaluate(["merged/"], zoo="zoo/tiny", max_tokens=256)   # = splice eval merged/ --zoo zoo/tiny --tokens 256
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from .. import options
from ..errors import SpliceError
from .choice import multiple_choice, read_task
from .harness import run_lm_eval
from .perplexity import DomainResult, domain_loss, read_text
from .results import check_results_file, write_json
from .scores import normalized_scores

__all__ = [
    "evaluate",
    "evaluate_model",
    "resolve_inputs",
    "check_results_file",
    "write_json",
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


def check_settings(max_tokens: int | None, seq_len: int, batch_size: int) -> None:
    """Refuse evaluation settings that measure nothing: a window needs two tokens, a batch one window."""
    options.optional(options.positive_int, max_tokens, "max_tokens")
    options.integer(seq_len, "seq_len", minimum=2)
    options.positive_int(batch_size, "batch_size")


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
    """Evaluate one checkpoint on every domain and task; returns a JSON-ready dict.

    Args:
        ref: the model (folder, .gguf, cached HF id).
        domains, tasks: name -> text file / task JSONL file.
        max_tokens: tokens per domain (None: all); seq_len: window length (>= 2); batch_size: windows per forward.
        quiet: no progress bar; label: the name the progress bar shows.
        texts, task_items: the files' contents, when the caller has read them already.
    Returns:
        ``{"path", "domains": {name: loss, ppl, bpb, ...}, "tasks": {name: acc, ...}, "seconds", ...}``.
    """
    import torch

    from ..hf import load_causal_lm

    check_settings(max_tokens, seq_len, batch_size)
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


def resolve_inputs(
    models: Iterable = (),
    domains: dict[str, str] | None = None,
    tasks: dict[str, str] | None = None,
    *,
    zoo: str | os.PathLike | None = None,
    base: str | None = None,
    experts: dict[str, str] | None = None,
    general: str | None = None,
) -> dict:
    """What an evaluation runs on, with a built zoo's defaults filled in.

    A zoo adds its held-out domains and tasks (a domain or task given by the same name
    wins) and, unless ``base`` is given, its base, its experts (given ones win) and its
    general domain; the zoo's models (or the given base and experts) join ``models``.
    A base that is not among the models is evaluated first.

    Args:
        models: model references; domains, tasks: name -> file.
        zoo: a built zoo's folder, or None.
        base, experts (domain -> model), general: what normalized scores compare against.
    Returns:
        ``{"models": [...], "domains", "tasks", "base", "experts", "general"}``, paths as strings.
    """
    models = [str(m) for m in models]
    domains = {d: str(p) for d, p in (domains or {}).items()}
    tasks = {t: str(p) for t, p in (tasks or {}).items()}
    experts = {d: str(m) for d, m in (experts or {}).items()}
    base = None if base is None else str(base)
    if zoo is not None:
        from ..zoo import zoo_paths

        zp = zoo_paths(options.existing_folder(zoo, "zoo"))
        domains = {**{d: str(p) for d, p in zp["heldout"].items()}, **domains}
        tasks = {**{t: str(p) for t, p in zp["tasks"].items()}, **tasks}
        if base is None:
            base = str(zp["models"]["base"])
            experts = {**{d: str(zp["models"][d]) for d in zp["manifest"]["experts"]}, **experts}
            general = general or zp["manifest"]["general_domain"]
        models += [ref for ref in dict.fromkeys([base, *experts.values()]) if ref not in models]
    if base is not None and base not in models:
        models.insert(0, base)
    if not models:
        raise SpliceError("no model to evaluate: name at least one (or a zoo)")
    return {"models": models, "domains": domains, "tasks": tasks, "base": base, "experts": experts, "general": general}


def evaluate(
    models: Iterable = (),
    domains: dict[str, str] | None = None,
    tasks: dict[str, str] | None = None,
    *,
    zoo: str | os.PathLike | None = None,
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

    The arguments are ``splice eval``'s: ``zoo`` fills in a built zoo's domains, tasks,
    base, experts and general domain (see :func:`resolve_inputs`); ``base`` and
    ``experts`` (domain -> model reference) name models that are evaluated too.

    Args:
        models: model references (folders, .gguf files, cached HF ids).
        domains, tasks: name -> text file / multiple-choice JSONL file.
        zoo: a built zoo's folder, or None.
        max_tokens: tokens per domain (None: all); seq_len: window length (>= 2); batch_size: windows per forward.
        quiet: no progress bars.
        base, experts, general: normalize scores against the base and the experts; forgetting on ``general``.
        names: display name per model reference (default: the folder names, made unique).
    Returns:
        ``{"domains", "tasks", "max_tokens", "models": {name: evaluate_model's dict (+ "scores")}, ...}``.
    """
    check_settings(max_tokens, seq_len, batch_size)
    run = resolve_inputs(models, domains, tasks, zoo=zoo, base=base, experts=experts, general=general)
    refs, domains, tasks, base = run["models"], run["domains"], run["tasks"], run["base"]
    if not domains and not tasks:
        raise SpliceError("nothing to evaluate on: give at least one domain text file or task file (or a zoo)")
    names = names or _name_models(refs)
    texts = {d: read_text(p) for d, p in domains.items()}
    items = {t: read_task(p) for t, p in tasks.items()}
    res: dict = {"domains": dict(domains), "tasks": dict(tasks), "max_tokens": max_tokens, "models": {}}
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
        ex = {d: names.get(e, e) for d, e in run["experts"].items()}
        scores = normalized_scores(losses, names.get(base, base), ex, run["general"])
        for n, s in scores.items():
            res["models"][n]["scores"] = s
        res["base"] = names.get(base, base)
        res["experts"] = ex
        res["general_domain"] = run["general"]
    return res


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
