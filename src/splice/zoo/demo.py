"""``splice demo``: what composing the zoo's experts buys, in four parts, and which to use for what.

Steps: build the zoo if it is absent; evaluate base and experts on every
held-out domain and on the BBC topic task; then the parts asked for (``parts``,
default all four, run in this order):

- ``merge``: merge the experts with every method that takes them (data-free ones
  with their base; regmean, RegMean++ and fisher calibrated on each expert's
  training text), with sensible defaults and a small sweep of the key parameter
  for the central methods, evaluate, rank by MergeBench-style normalized score;
  ``leaderboard.json`` and ``leaderboard.png``; name the winner in one sentence.
- ``search``: a small ``splice search`` study of the zoo (default space and optimizer,
  objective mean), its best recipe merged and evaluated like the merges and ranked
  against them (``demo_search``); ``search.json`` and ``search.png``.
- ``moe``: one MoE of the same base and experts with calibrated routers, against
  the best merge (``demo_moe``); ``moe.json`` and ``moe.png``.
- ``skip``: layer-skip plans of the base, their loss cost and measured decode
  speed (``demo_skip``); ``skip.json`` and ``skip.png``.

It closes with the lines (``summary.json``) that say which composition to use
for what, with this run's numbers. Models, evaluations and timings are cached
in the output folder, keyed by their inputs and the evaluation settings, so a
rerun only redoes what changed. A rerun replaces the earlier results, so an
existing non-empty output folder needs ``force``; every file is written whole
to a temporary file and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import options
from ..errors import SpliceError, option

# method -> list of (label suffix, per-model parameters, global parameters).
# Defaults follow the papers / mergekit examples; the sweeps cover each central method's key knob.
SWEEPS: dict[str, list[tuple[str, dict, dict]]] = {
    "linear": [("", {"weight": 1.0}, {})],
    "task_arithmetic": [
        ("lambda=0.5", {"weight": 1.0}, {"lambda": 0.5}),
        ("lambda=0.75", {"weight": 1.0}, {"lambda": 0.75}),
        ("lambda=1", {"weight": 1.0}, {"lambda": 1.0}),
    ],
    "ties": [
        ("density=0.3", {"weight": 1.0, "density": 0.3}, {}),
        ("density=0.5", {"weight": 1.0, "density": 0.5}, {}),
        ("density=0.8", {"weight": 1.0, "density": 0.8}, {}),
    ],
    "dare_ties": [("density=0.5", {"weight": 1.0, "density": 0.5}, {})],
    "dare_linear": [("density=0.5", {"weight": 1.0, "density": 0.5}, {})],
    "breadcrumbs": [("density=0.9", {"weight": 1.0, "density": 0.9, "gamma": 0.01}, {})],
    "breadcrumbs_ties": [("density=0.9", {"weight": 1.0, "density": 0.9, "gamma": 0.01}, {})],
    "della": [("density=0.5", {"weight": 1.0, "density": 0.5, "epsilon": 0.15}, {})],
    "della_linear": [("density=0.5", {"weight": 1.0, "density": 0.5, "epsilon": 0.15}, {})],
    "pcb": [("density=0.2", {"weight": 1.0}, {"density": 0.2})],
    "sce": [("", {}, {"select_topk": 1.0})],
    "model_stock": [("", {}, {})],
    "karcher": [("", {}, {})],
    "multislerp": [("", {"weight": 1.0}, {})],
    # data-aware: calibrated on each expert's training text (the recipe's ``calibration:``)
    "regmean": [("alpha=1", {}, {"alpha": 1.0}), ("sequential, alpha=1", {}, {"alpha": 1.0, "sequential": True})],
    "fisher": [("", {}, {})],
}
# calibration of the data-aware merges: tokens of each expert's own training text (the methods' default)
DEMO_CALIBRATION = {"tokens": 16384, "seed": 0}

DEMO_EVAL = {"tiny": {"max_tokens": 2048, "task_items": 60, "seq_len": 128}, "smol": {"max_tokens": 2048, "task_items": 40, "seq_len": 256}}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_stamp(folder: Path) -> dict:
    """What a part recorded about the work in ``folder`` (its ``.demo.json``: the cache key and more), or {}."""
    f = folder / ".demo.json"
    return json.loads(f.read_text()) if f.exists() else {}


def write_stamp(folder: Path, info: dict) -> None:
    """Record ``info`` (with its cache ``key``) as ``folder``'s ``.demo.json``, written whole."""
    from ..eval.results import write_text_atomic

    write_text_atomic(folder / ".demo.json", json.dumps(info, indent=2) + "\n")


def applicable_methods(k: int, data_aware: bool = True) -> list:
    """Registered methods that merge ``k`` experts (with or without their base).

    With ``data_aware`` also those that need calibration statistics (regmean, fisher): the demo
    calibrates them on each expert's training text.
    """
    from ..methods import all_methods

    out = []
    for m in all_methods():
        if m.min_models > k or (m.max_models is not None and m.max_models < k) or (m.statistics and not data_aware):
            continue
        out.append(m)
    return out


def _param_split(method, per: dict, glob: dict) -> tuple[dict, dict] | None:
    """Place each parameter where the method wants it (per-model or global); None if a required one is missing."""
    p_model, p_glob = {}, {}
    for k, v in {**per, **glob}.items():
        prm = method.param(k)
        if prm is None:
            continue
        (p_model if prm.per_model else p_glob)[k] = v
    for prm in method.params:
        if prm.required and prm.name not in p_model and prm.name not in p_glob:
            if prm.name == "weight":
                p_model["weight"] = 1.0
            else:
                return None
    return p_model, p_glob


def demo_recipes(base: str, experts: list[str], calibration_texts: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """(label, recipe dict) for every applicable method and sweep point.

    ``calibration_texts`` (expert folder -> its training text) adds the data-aware methods, each
    calibrated on ``DEMO_CALIBRATION`` tokens of every expert's own text, without a base (as
    ``benchmarks/data_aware.py`` measures them); without it only the data-free methods.
    """
    recipes = []
    for m in applicable_methods(len(experts), data_aware=calibration_texts is not None):
        for suffix, per, glob in SWEEPS.get(m.name, [("", {}, {})]):
            split = _param_split(m, per, glob)
            if split is None:
                continue
            p_model, p_glob = split
            r = {
                "merge_method": m.name,
                "models": [{"model": e, "parameters": dict(p_model)} for e in experts],
                "parameters": p_glob,
                "dtype": "float32",
            }
            if m.statistics:
                r["calibration"] = {e: {"text": calibration_texts[e], **DEMO_CALIBRATION} for e in experts}
            elif m.base != "none":
                r["base_model"] = base
            recipes.append((f"{m.name}" + (f" ({suffix})" if suffix else ""), r))
    return recipes


def _safe_dirname(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label).strip("_")


PARTS = ("merge", "search", "moe", "skip")  # what the demo can show, in the order it runs them


@dataclass
class DemoRun:
    """What every part of one demo run shares: the zoo's inputs, the evaluation settings and its cache."""

    zoo: str
    zoo_dir: Path
    out: Path
    manifest: dict
    seed: int
    quiet: bool
    ev: dict  # evaluation settings: max_tokens, task_items, seq_len
    base: str
    experts: dict[str, str]  # expert domain -> model folder
    domains: dict[str, str]  # held-out domain -> text file
    tasks: dict[str, str]
    texts: dict[str, str] = field(default_factory=dict)
    items: dict[str, list] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)  # label -> evaluation (plus kind, method, ...)

    @property
    def general(self) -> str | None:
        return self.manifest.get("general_domain")

    def input_key(self) -> list:
        """The zoo models' build keys: a rebuilt zoo invalidates everything made from it."""
        return [self.manifest["models"]["base"].get("key"), [self.manifest["models"][d].get("key") for d in self.experts]]

    def say(self, msg: str) -> None:
        _say(msg, self.quiet)

    def evaluate(self, label: str, path: str, kind: str) -> dict:
        """``splice eval``'s numbers for ``path`` on the demo's domains and tasks, cached in ``eval-cache.json``.

        Cached by the evaluation settings and the model folder's safetensors (names, sizes, times), so
        a rebuilt model is re-evaluated and an unchanged one is not.
        """
        from ..eval import evaluate_model
        from ..eval.results import write_text_atomic

        ev_key = _hash([self.ev, sorted(self.domains.items()), sorted(self.tasks.items())])
        cache_f = self.out / "eval-cache.json"
        cache = json.loads(cache_f.read_text()) if cache_f.exists() else {}
        mk = _hash([ev_key, path, _folder_stamp(Path(path))])
        if mk in cache:
            r = cache[mk]
        else:
            self.say(f"evaluating: {label}")
            r = evaluate_model(
                path,
                self.domains,
                None,
                max_tokens=self.ev["max_tokens"],
                seq_len=self.ev["seq_len"],
                quiet=self.quiet,
                label=label,
                texts=self.texts,
                task_items=self.items,
            )
            cache[mk] = r
            write_text_atomic(cache_f, json.dumps(cache) + "\n")
        self.results[label] = {"kind": kind, **r}
        return self.results[label]

    def scores(self, names: list[str]) -> dict[str, dict]:
        """MergeBench-style normalized scores and forgetting of ``names`` (evaluated already) against base and experts."""
        from ..eval import normalized_scores

        keep = ["base", *(f"expert:{d}" for d in self.experts), *names]
        losses = {n: {d: v["loss"] for d, v in self.results[n]["domains"].items()} for n in keep}
        sc = normalized_scores(losses, "base", {d: f"expert:{d}" for d in self.experts}, self.general)
        return {n: sc[n] for n in names}


def check_parts(parts) -> list[str]:
    """The demo parts to run, in run order; a one-line error naming the valid parts for anything else."""
    if parts is None:
        return list(PARTS)
    given = parts.split(",") if isinstance(parts, str) else list(parts)
    names = [str(p).strip() for p in given]
    shown = ",".join(names)
    bad = [p for p in names if p not in PARTS]
    if bad or not names:
        what = f"unknown part {', '.join(repr(p) for p in bad)}" if bad else "no part named"
        raise SpliceError(f"{option('parts', shown)}: {what} (valid parts: {', '.join(PARTS)})")
    return [p for p in PARTS if p in names]


def run_demo(
    zoo: str = "tiny",
    out: str | os.PathLike = "demo-out",
    *,
    zoo_dir: str | os.PathLike | None = None,
    seed: int = 0,
    quiet: bool = False,
    methods: list[str] | None = None,
    max_tokens: int | None = None,
    chart: bool = True,
    force: bool = False,
    parts: list[str] | str | None = None,
    search_budget: int | None = None,
) -> dict:
    """Build the zoo if needed, then show what each composition buys: merges, a MoE, layer skipping.

    Args:
        zoo: the zoo tier (``tiny``, ``smol``); out: the output folder.
        zoo_dir: the zoo's folder (default: the splice cache's); built there if absent.
        seed: for the zoo and the random merge methods; quiet: no progress output.
        methods: merge methods to run (default: every one that applies); max_tokens: evaluation tokens per domain.
        chart: also write the PNG charts; force: reuse and replace the results in an existing ``out``.
        parts: which of ``merge``, ``search``, ``moe``, ``skip`` to run (a list or comma-separated; default all).
        search_budget: trials of the search part's study (default: ``demo_search.SEARCH_BUDGET`` of the tier).
    Returns:
        The leaderboard (models with their losses and scores, the ranking, the winner, a summary
        sentence), plus ``search``, ``moe`` and ``skip`` (each part's report) and ``closing`` (the lines
        that say which composition to use for what), as written to ``leaderboard.json``, ``search.json``,
        ``moe.json``, ``skip.json`` and ``summary.json``.
    """
    from ..checkpoint.writer import check_output
    from ..eval import read_task, read_text
    from ..eval.results import write_text_atomic
    from .build import build_zoo, check_zoo_folder, default_zoo_dir

    t_all = time.time()
    seed = options.seed(seed)
    max_tokens = options.optional(options.positive_int, max_tokens, "max_tokens")
    search_budget = options.optional(options.positive_int, search_budget, "search_budget")
    run_parts = check_parts(parts)
    out = options.output_folder(out, "out")
    zdir = options.output_folder(zoo_dir, "zoo_dir") if zoo_dir else default_zoo_dir(zoo)
    check_output(out.resolve(), force)  # refuse before building anything
    check_zoo_folder(zdir)
    _check_methods(methods, zoo)
    merge = None
    if "merge" in run_parts or "search" in run_parts:
        try:
            import splice

            merge = splice.merge
        except (ImportError, AttributeError):
            raise SpliceError("the demo needs splice.merge (the merge engine), which is not available") from None
    man = build_zoo(zoo, zdir, seed=seed, quiet=quiet)
    out.mkdir(parents=True, exist_ok=True)
    ev = dict(DEMO_EVAL.get(zoo, DEMO_EVAL["tiny"]))
    if max_tokens:
        ev["max_tokens"] = max_tokens
    run = DemoRun(
        zoo=zoo,
        zoo_dir=zdir,
        out=out,
        manifest=man,
        seed=seed,
        quiet=quiet,
        ev=ev,
        base=str(zdir / man["models"]["base"]["path"]),
        experts={d: str(zdir / man["models"][d]["path"]) for d in man["experts"]},
        domains={d: str(zdir / v["heldout_file"]) for d, v in man["domains"].items()},
        tasks={t: str(zdir / v["path"]) for t, v in man["tasks"].items()},
    )
    run.texts = {d: read_text(p) for d, p in run.domains.items()}
    run.items = {t: read_task(p)[: ev["task_items"]] for t, p in run.tasks.items()}

    # base and experts: every part is scored against them
    run.evaluate("base", run.base, "base")
    for d, p in run.experts.items():
        run.evaluate(f"expert:{d}", p, "expert")

    res = {
        "zoo": zoo,
        "zoo_dir": str(zdir),
        "seed": seed,
        "eval": ev,
        "domains": run.domains,
        "tasks": run.tasks,
        "experts": list(run.experts),
        "general_domain": run.general,
        "base": "base",
        "parts": run_parts,
    }
    if "merge" in run_parts:
        res.update(_merge_part(run, merge, methods))
    else:
        for n, s in run.scores(list(run.results)).items():
            run.results[n]["scores"] = s
        res.update(models=dict(run.results), ranking=[], winner=None, methods=[], skipped={})
    res["seconds"] = round(time.time() - t_all, 2)
    if "merge" in run_parts:
        res["summary"] = winner_sentence(res)
        write_text_atomic(out / "leaderboard.json", json.dumps(res, indent=2) + "\n")
        res["table"] = leaderboard_table(res)
        if chart:
            res["chart"] = write_chart(res, out / "leaderboard.png")
    if "search" in run_parts:
        from .demo_search import run_search_part

        res["search"] = run_search_part(run, merge, res, budget=search_budget, chart=chart)
    if "moe" in run_parts:
        from .demo_moe import run_moe_part

        res["moe"] = run_moe_part(run, res["winner"], chart=chart)
    if "skip" in run_parts:
        from .demo_skip import run_skip_part

        res["skip"] = run_skip_part(run, chart=chart)
    res["closing"] = closing(res)
    if "summary" not in res:
        res["summary"] = res["closing"]["lines"][0] if res["closing"]["lines"] else ""
    write_text_atomic(out / "summary.json", json.dumps(res["closing"], indent=2) + "\n")
    res["seconds"] = round(time.time() - t_all, 2)
    return res


def merge_cached(run: DemoRun, merge, label: str, recipe: dict, d: Path, seed: int | None = None) -> dict:
    """``merge(recipe)`` into folder ``d``, unless ``d`` holds that merge already (its ``.demo.json`` stamp).

    Keyed by the recipe, the seed (default: the demo's) and the zoo's model keys. Returns the stamp
    (``key``, ``seconds``, ``engine_seconds``, ``recipe``) plus ``path``; a merge error is raised.
    """

    seed = run.seed if seed is None else seed
    key = _hash([recipe, seed, *run.input_key()])
    info = read_stamp(d)
    if info.get("key") != key:
        run.say(f"merging: {label}")
        t0 = time.time()
        s = merge(recipe, d, force=True, seed=seed, quiet=True)
        info = {
            "key": key,
            "seconds": round(time.time() - t0, 2),
            "engine_seconds": round(float(s.get("seconds", 0)), 3),
            "recipe": recipe,
        }
        write_stamp(d, info)
    return {**info, "path": str(d)}


def rank_key(scores: dict) -> tuple:
    """The leaderboard's order: higher normalized score first, then less forgetting."""
    return (-(scores["normalized"] if scores["normalized"] is not None else -1e9), scores.get("forgetting") or 0)


def _merge_part(run: DemoRun, merge, methods: list[str] | None) -> dict:
    """Merge with every applicable method (cached by recipe + seed), evaluate, rank."""

    texts = {p: str(run.zoo_dir / run.manifest["domains"][d]["train_file"]) for d, p in run.experts.items()}
    recipes = demo_recipes(run.base, list(run.experts.values()), texts)
    if methods:
        recipes = [(l, r) for l, r in recipes if r["merge_method"] in methods]
    merged: dict[str, dict] = {}
    for label, recipe in recipes:
        try:
            info = merge_cached(run, merge, label, recipe, run.out / "merges" / _safe_dirname(label))
        except SpliceError as e:
            run.say(f"  skipped {label}: {e}")
            merged[label] = {"method": recipe["merge_method"], "error": str(e)}
            continue
        merged[label] = {"method": recipe["merge_method"], "path": info["path"], "merge_seconds": info["seconds"], "recipe": recipe}

    for label, m in merged.items():
        if "path" not in m:
            continue
        r = run.evaluate(label, m["path"], "merge")
        r["method"] = m["method"]
        r["merge_seconds"] = m["merge_seconds"]
        r["recipe"] = m["recipe"]
    results = {n: r for n, r in run.results.items() if r["kind"] in ("base", "expert", "merge")}
    for n, s in run.scores(list(results)).items():
        results[n]["scores"] = s
    board = sorted((n for n, r in results.items() if r["kind"] == "merge"), key=lambda n: rank_key(results[n]["scores"]))
    return {
        "models": results,
        "ranking": board,
        "winner": board[0] if board else None,
        "methods": sorted({r["merge_method"] for _, r in recipes}),
        "skipped": {l: m["error"] for l, m in merged.items() if "error" in m},
    }


def _check_methods(methods: list[str] | None, zoo: str) -> None:
    """Every named method must be one the demo can run on the tier's experts."""
    from .build import TIERS

    if not methods or zoo not in TIERS:  # an unknown tier is build_zoo's error
        return
    k = len(TIERS[zoo].experts)
    runnable = {m.name for m in applicable_methods(k)}
    unknown = [m for m in methods if m not in runnable]
    if unknown:
        raise SpliceError(
            f"{option('methods', ','.join(methods))}: the demo cannot run {', '.join(unknown)} on {k} experts "
            f"(it can run: {', '.join(sorted(runnable))})"
        )


def _folder_stamp(p: Path) -> str:
    files = sorted(p.glob("*.safetensors"))
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[demo] {msg}", file=sys.stderr, flush=True)


def winner_sentence(res: dict) -> str:
    w = res.get("winner")
    if not w:
        return "No merge was produced, so there is no winner."
    s = res["models"][w]["scores"]
    per = s["per_domain"]
    worst = min((v for v in per.values() if v is not None), default=None)
    f = s.get("forgetting")
    ftxt = f", with {100 * f:+.1f}% loss change on the general domain ({res['general_domain']})" if f is not None else ""
    wtxt = f" (worst domain {100 * worst:.0f}%)" if worst is not None else ""
    return (
        f"On the {res['zoo']} zoo, {w} wins: the merged model keeps {100 * s['normalized']:.0f}% of the experts' "
        f"improvement over the base on average{wtxt}{ftxt}."
    )


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _times(x: float | None) -> str:
    return "unmeasured" if x is None else f"{x:.2f}x"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _best_by_kind(res: dict) -> dict:
    """The best-ranked data-free and data-aware merges: {"data_free"|"data_aware": {name, normalized, min_normalized}}."""
    from ..methods import get_method

    best: dict = {}
    for n in res.get("ranking") or []:
        s = res["models"][n]["scores"]
        kind = "data_aware" if get_method(res["models"][n]["method"]).statistics else "data_free"
        if kind not in best and s["normalized"] is not None:
            best[kind] = {"name": n, "normalized": s["normalized"], "min_normalized": s["min_normalized"]}
    return best


def closing(res: dict) -> dict:
    """The lines that say which composition to use for what, and the numbers behind them (all from this run).

    Returns:
        ``{"lines": [...], "numbers": {"merge": {...}, "search": {...}, "moe": {...}, "skip": [...]}}``: a part that did not
        run (or produced nothing) has no line and no numbers.
    """
    lines: list[str] = []
    nums: dict = {}
    general = res.get("general_domain")
    w = res.get("winner")
    if w and res["models"][w]["scores"]["normalized"] is not None:
        s = res["models"][w]["scores"]
        nums["merge"] = {"name": w, "normalized": s["normalized"], "min_normalized": s["min_normalized"], "forgetting": s.get("forgetting")}
        f = s.get("forgetting")
        ftxt = f", {100 * f:+.1f}% loss on the general domain ({general})" if f is not None else ""
        lines.append(
            f"One model for all domains: the {w} merge keeps {_pct(s['normalized'])} of the experts' gains on average "
            f"(worst domain {_pct(s['min_normalized'])}){ftxt}, at the base's size."
        )
    kinds = _best_by_kind(res)
    if len(kinds) == 2:
        nums["data_aware"] = kinds
        fr, aw = kinds["data_free"], kinds["data_aware"]
        lines.append(
            f"With a little text per expert ({DEMO_CALIBRATION['tokens']} tokens of its training data): {aw['name']} keeps "
            f"{_pct(aw['normalized'])} (worst domain {_pct(aw['min_normalized'])}); the best data-free merge, {fr['name']}, "
            f"{_pct(fr['normalized'])} (worst domain {_pct(fr['min_normalized'])})."
        )
    se = res.get("search")
    if se and se["scores"]["normalized"] is not None:
        s, c = se["scores"], se.get("comparison")
        nums["search"] = {
            "trials": se["trials"],
            "label": se["label"],
            "normalized": s["normalized"],
            "min_normalized": s["min_normalized"],
            "forgetting": s.get("forgetting"),
            "rank": c["rank"] if c else None,
            "of": c["of"] if c else None,
            "best_hand_tuned": c["best_hand_tuned"] if c else None,
        }
        head = f"Searched: {se['trials']} trials found {se['label']} keeping {_pct(s['normalized'])} (worst domain {_pct(s['min_normalized'])})"
        # the demo's text overlaps the search split: the study's test split is the fair figure, so it is said too
        unseen = next((r["scores"] for r in (se.get("test_split") or {}).get("rows", []) if r["model"].startswith("best")), None)
        if unseen and unseen.get("normalized") is not None:
            nums["search"]["test_split"] = {"normalized": unseen["normalized"], "min_normalized": unseen["min_normalized"]}
            head += f" ({_pct(unseen['normalized'])}, worst {_pct(unseen['min_normalized'])}, on held-out text the search never saw)"
        hand = c["best_hand_tuned"] if c else None
        if c and hand:
            lines.append(
                f"{head}, rank {c['rank']} of {c['of']} on the merge leaderboard; the best hand-tuned data-free merge, "
                f"{hand['name']}, keeps {_pct(hand['normalized'])} (worst domain {_pct(hand['min_normalized'])})."
            )
        elif c:
            lines.append(f"{head}, rank {c['rank']} of {c['of']} on the merge leaderboard.")
        else:
            lines.append(f"{head} (the merge part did not run: no leaderboard to rank it against).")
    moe = res.get("moe")
    if moe and moe["scores"]["normalized"] is not None:
        s = moe["scores"]
        k, n = moe["experts_per_token"], len(moe["experts"])
        nums["moe"] = {
            "normalized": s["normalized"],
            "min_normalized": s["min_normalized"],
            "forgetting": s.get("forgetting"),
            "routing_accuracy": moe["routing_accuracy"],
            "params": moe["params"],
            "active_params": moe["active_params"],
            "experts": n,
            "experts_per_token": k,
        }
        vs = ""
        if moe.get("best_merge") and moe["best_merge"]["scores"]["normalized"] is not None:
            d = s["normalized"] - moe["best_merge"]["scores"]["normalized"]
            vs = f", {100 * d:+.1f} points against the best merge ({moe['best_merge']['name']})"
        acc = moe["routing_accuracy"]
        atxt = f"; {_pct(acc)} of each domain's tokens go to its own expert" if acc is not None else ""
        lines.append(
            f"If you can afford {n} experts' parameters ({_count(moe['params'])} stored, {_count(moe['active_params'])} active "
            f"per token with top-{k}): the MoE keeps {_pct(s['normalized'])} (worst domain {_pct(s['min_normalized'])}){vs}{atxt}."
        )
    sk = res.get("skip")
    if sk and sk["plans"]:
        nums["skip"] = [
            {
                "drop": p["drop"],
                "num_layers": sk["num_layers"],
                "speedup": p["decode"]["speedup"],
                "mean_loss_delta_pct": p["mean_loss_delta_pct"],
            }
            for p in sk["plans"]
        ]
        parts = [
            f"dropping {p['drop']} of {sk['num_layers']} layers gives {_times(p['decode']['speedup'])} decode "
            f"at {p['mean_loss_delta_pct']:+.1f}% held-out loss"
            for p in sk["plans"]
        ]
        lines.append("For speed: " + "; ".join(parts) + " (mean over domains).")
    return {"lines": lines, "numbers": nums}


def leaderboard_table(res: dict) -> str:
    doms = list(res["domains"])
    ex = res["experts"]
    head = ["#", "model"] + [f"{d}" for d in doms] + [f"norm:{d}" for d in ex] + ["norm", "forget%"]
    head += [f"{t} acc" for t in res["tasks"]] + ["merge s", "eval s"]
    rows = [head]
    order = ["base"] + [f"expert:{d}" for d in ex] + res["ranking"]
    for i, n in enumerate(order):
        r = res["models"][n]
        s = r["scores"]
        rank = str(res["ranking"].index(n) + 1) if n in res["ranking"] else ""
        row = [rank, n] + [f"{r['domains'][d]['loss']:.4f}" for d in doms]
        row += ["-" if s["per_domain"].get(d) is None else f"{s['per_domain'][d]:.2f}" for d in ex]
        row += [
            "-" if s["normalized"] is None else f"{s['normalized']:.3f}",
            "-" if s.get("forgetting") is None else f"{100 * s['forgetting']:+.2f}",
        ]
        row += [f"{r['tasks'][t]['acc']:.2f}" for t in res["tasks"]]
        row += [f"{r.get('merge_seconds', 0):.1f}" if r["kind"] == "merge" else "", f"{r['seconds']:.1f}"]
        rows.append(row)
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w[i]) if i == 1 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_chart(res: dict, path: Path) -> str | None:
    """Bar chart: normalized score per merge (per-domain dots), forgetting beside it. None without matplotlib."""
    from .charts import pyplot, save_png

    plt = pyplot()
    if plt is None:
        return None
    names = res["ranking"]
    if not names:
        return None
    ex = res["experts"]
    norm = [res["models"][n]["scores"]["normalized"] or 0.0 for n in names]
    forget = [100 * (res["models"][n]["scores"].get("forgetting") or 0.0) for n in names]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 0.35 * len(names) + 1.8), sharey=True, gridspec_kw={"width_ratios": [2, 1]})
    y = list(range(len(names)))
    a1.barh(y, norm, color="#4C72B0", alpha=0.8, label="mean over expert domains")
    marks = "os^vD<>"
    for j, d in enumerate(ex):
        vals = [res["models"][n]["scores"]["per_domain"].get(d) for n in names]
        a1.scatter([v if v is not None else float("nan") for v in vals], y, marker=marks[j % len(marks)], s=18, zorder=3, label=d)
    a1.axvline(1.0, color="grey", lw=0.8, ls="--")
    a1.axvline(0.0, color="black", lw=0.8)
    a1.set_yticks(y, names, fontsize=8)
    a1.invert_yaxis()
    a1.set_xlabel("normalized score: share of each expert's loss improvement kept")
    a1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.6 / max(3, len(names)) - 0.06), ncol=len(ex) + 1, frameon=False)
    a2.barh(y, forget, color=["#C44E52" if f > 0 else "#55A868" for f in forget])
    a2.axvline(0.0, color="black", lw=0.8)
    a2.set_xlabel(f"forgetting: loss change on '{res['general_domain']}' (%)")
    fig.suptitle(f"splice demo — {res['zoo']} zoo: merges of {len(ex)} experts ({', '.join(ex)})", fontsize=10)
    return save_png(fig, path)
