"""The demo's ``search`` part: let ``splice search`` find a merge recipe, and rank it against the hand-tuned ones.

Writes a search spec for the demo's zoo (``out/search/spec.yaml``: the default space,
objective ``mean``, the default optimizer, which first sweeps each method at its
hand-tuned point and then runs CMA-ES on the best method's numbers) and runs a
small study of it in ``out/search/study/`` (``splice.search.run_search``). The
study scores candidates on its *search split* of the held-out text and its own
leaderboard on the *test split*; the demo then merges the best recipe to disk
(``out/search/best/``, through the merge part's cached path) and evaluates it with
the same evaluation as the merges, so its normalized score, worst domain and
forgetting sit on the merge leaderboard's scale. Writes ``search.json`` and
``search.png`` (best-so-far search objective per trial).

Cached: a finished study of the same spec, seed and zoo models is read back, not
rerun; an unfinished one (a kill mid-search, a larger budget) is resumed; the
merged best and its evaluation are cached like the merges.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .demo import DemoRun, _best_by_kind, _hash, merge_cached, rank_key, read_stamp, write_stamp

# trials per study: the four methods' hand-tuned sweep, then CMA-ES. On the tiny zoo (one torch thread,
# machine loaded) 40 trials took 25 s, and going on to 80 raised the best search objective by 0.001
# only (0.4555 -> 0.4565); smol's 135M-parameter merges cost seconds each, hence fewer there.
SEARCH_BUDGET = {"tiny": 40, "smol": 16}
SEARCH_OBJECTIVE = "mean"  # mean normalized score over the expert domains (the leaderboard's ranking number)
SEARCH_OPTIMIZER = "default"
SEARCH_LABEL = "search:best"  # the evaluated best's name in the demo's results


def search_spec(run: DemoRun) -> dict:
    """The demo's search spec: its zoo, the demo's window length and tokens per domain (and split), the default space."""
    return {
        "zoo": str(run.zoo_dir),
        "evaluation": {"seq_len": run.ev["seq_len"], "tokens": run.ev["max_tokens"]},
        "objective": SEARCH_OBJECTIVE,
        "optimizer": SEARCH_OPTIMIZER,
        "seed": run.seed,
    }


def recipe_label(recipe: dict, experts: dict[str, str]) -> str:
    """``ties (weight 0.55/0.05/0.55, density 0.28/0.56/0.55 for code/news/scripture)``: the method and its numbers."""
    by_path = {p: d for d, p in experts.items()}
    models = recipe.get("models") or []
    names = [by_path.get(m["model"], Path(m["model"]).name) for m in models]
    parts = []
    per = list(dict.fromkeys(k for m in models for k in (m.get("parameters") or {})))
    for k in per:
        vals = [(m.get("parameters") or {}).get(k) for m in models]
        parts.append(f"{k} " + "/".join("-" if v is None else _num(v) for v in vals))
    glob = [f"{k} {_num(v)}" for k, v in (recipe.get("parameters") or {}).items()]
    inner = ", ".join(parts + glob)
    if per and names:
        inner += f" for {'/'.join(names)}"
    return f"{recipe['merge_method']} ({inner})" if inner else recipe["merge_method"]


def _num(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _study_state(folder: Path, info: dict, key: str, budget: int) -> str:
    """``done`` (a finished study of this key), ``resume`` (one with fewer trials than ``budget``), or ``new``.

    ``info`` is the part's stamp (``read_stamp`` of the study's parent folder).
    """
    from ..search import read_trials

    if info.get("key") != key or not (folder / "study.json").exists():
        return "new"
    n = len(read_trials(folder / "trials.jsonl"))
    if n == budget and (folder / "best.json").exists() and (folder / "leaderboard.json").exists():
        return "done"
    return "resume" if n < budget else "new"


def run_search_part(run: DemoRun, merge, res: dict, *, budget: int | None = None, chart: bool = True) -> dict:
    """Search, merge and evaluate the best, rank it against ``res``'s merge leaderboard (if any); write ``search.json``.

    Args:
        run: the demo's shared state; merge: ``splice.merge``; res: the demo's results so far (its
            ``ranking`` and ``models`` when the merge part ran).
        budget: trials in the study (default: ``SEARCH_BUDGET`` of the tier); chart: also ``search.png``.
    Returns:
        The report written to ``search.json``.
    """
    import torch
    import yaml

    from ..eval.results import write_text_atomic
    from ..search import load_spec, read_trials, run_search
    from ..search.evaluate import MERGE_SEED

    t_part = time.time()
    budget = budget or SEARCH_BUDGET.get(run.zoo, SEARCH_BUDGET["tiny"])
    folder = run.out / "search"
    study = folder / "study"
    spec_f = folder / "spec.yaml"
    spec_d = search_spec(run)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(spec_f, "# written by splice demo; rerun with: splice search spec.yaml -o study --resume\n" + yaml.safe_dump(spec_d))
    spec = load_spec(spec_f)
    key = _hash([spec_d, spec.fingerprint(), *run.input_key()])
    stamp = read_stamp(folder)
    state = _study_state(study, stamp, key, budget)
    if state == "done":
        run.say(f"search: reusing the finished study in {study}")
    else:
        prev = stamp if state == "resume" else {"runs": []}
        run.say(
            f"search: {budget} trials, {SEARCH_OPTIMIZER} optimizer, objective {SEARCH_OBJECTIVE}"
            + (" (resuming)" if state == "resume" else "")
        )
        t0 = time.time()
        before = len(read_trials(study / "trials.jsonl")) if state == "resume" else 0
        run_search(
            spec,
            study,
            budget=budget,
            threads=torch.get_num_threads(),
            resume=state == "resume",
            force=state == "new",
            quiet=run.quiet,
        )
        runs = prev.get("runs", []) + [{"seconds": round(time.time() - t0, 2), "trials_before": before, "trials_after": budget}]
        stamp = {"key": key, "budget": budget, "runs": runs}
        write_stamp(folder, stamp)

    trials = read_trials(study / "trials.jsonl")
    best = json.loads((study / "best.json").read_text())
    board = json.loads((study / "leaderboard.json").read_text())
    recipe = best["recipe"]

    # the best recipe, merged to disk with the seed it was scored with, evaluated like every merge
    t0 = time.time()
    info = merge_cached(run, merge, "search: best", recipe, folder / "best", seed=MERGE_SEED)
    r = run.evaluate(SEARCH_LABEL, info["path"], "search")
    scores = run.scores([SEARCH_LABEL])[SEARCH_LABEL]
    r.update(method=recipe["merge_method"], recipe=recipe, merge_seconds=info["seconds"], scores=scores)
    merge_eval_s = round(time.time() - t0, 2)

    ranking = res.get("ranking") or []
    report: dict = {
        "budget": budget,
        "trials": len(trials),
        "optimizer": SEARCH_OPTIMIZER,
        "objective": SEARCH_OBJECTIVE,
        "seed": run.seed,
        "space": {"methods": spec.space.methods, "granularity": spec.space.granularity},
        "spec": str(spec_f),
        "study": str(study),
        "best_recipe": str(study / "best.yaml"),
        "best_trial": best["trial"],
        "method": recipe["merge_method"],
        "label": recipe_label(recipe, run.experts),
        "path": info["path"],
        "splits": {
            "search": (
                f"the study's search split: {spec.search_share:g} of each held-out domain's {spec.seq_len}-token windows "
                f"(dealt by a shuffle seeded by the domain's name), up to {spec.tokens} tokens per domain; every trial's "
                "objective and search_split below"
            ),
            "test": "the rest of those windows, never shown to the search; test_split below (the study's leaderboard.json)",
            "demo": (
                f"the demo's own evaluation, the same as the merge leaderboard's: the first {run.ev['max_tokens']} tokens of every "
                "held-out domain (overlapping both splits) and the tasks; scores, losses, rank and comparison below. "
                "Its text includes windows the search tuned on, which the hand-tuned merges were not, so test_split is "
                "the fairer check of the searched recipe against each method's hand-tuned point"
            ),
        },
        "search_split": {"objective": best["values"][0], "scores": best["scores"], "losses": best["losses"]},
        "test_split": {
            "tokens": board["tokens"],
            "rows": [{"model": x["model"], "scores": x["scores"], "loss": x["loss"]} for x in board["rows"]],
        },
        "losses": {d: v["loss"] for d, v in r["domains"].items()},
        "tasks": {t: v["acc"] for t, v in r["tasks"].items()},
        "scores": scores,
        "trace": _trace(trials),
        "reused_study": state == "done",
        "seconds": {
            "search": round(sum(x["seconds"] for x in stamp["runs"]), 2),
            "search_runs": stamp["runs"],
            "trials": round(sum(x.get("seconds", 0) for x in trials), 2),
            "merge_and_eval_this_run": merge_eval_s,
            "part_this_run": None,
        },
        "threads": torch.get_num_threads(),
    }
    if ranking:
        better = sum(1 for n in ranking if rank_key(res["models"][n]["scores"]) < rank_key(scores))
        hand = _best_by_kind(res)
        w = res["winner"]
        report["comparison"] = {
            "rank": better + 1,
            "of": len(ranking) + 1,
            "best_hand_tuned": hand.get("data_free"),
            "best_hand_tuned_note": "the best data-free merge of the leaderboard: the search space is data-free methods",
            "winner": {"name": w, **{k: res["models"][w]["scores"][k] for k in ("normalized", "min_normalized", "forgetting")}},
        }
    else:
        report["comparison"] = None
        report["comparison_note"] = "the merge part did not run, so there is no leaderboard to rank the searched recipe against"
    report["seconds"]["part_this_run"] = round(time.time() - t_part, 2)
    write_text_atomic(run.out / "search.json", json.dumps(report, indent=2) + "\n")
    if chart:
        report["chart"] = write_search_chart(report, run.out / "search.png", run.zoo)
    return report


def _trace(trials: list[dict]) -> list[dict]:
    """Per trial (in the order they finished): method, objective value, best-so-far value."""
    out, best = [], None
    for t in trials:
        v = t["values"][0] if t.get("values") else None
        if v is not None and t.get("level") != "screen":
            best = v if best is None else max(best, v)
        out.append({"trial": t["trial"], "method": t["recipe"].get("merge_method"), "value": v, "best_so_far": best})
    return out


def write_search_chart(report: dict, path: Path, zoo: str) -> str | None:
    """Each trial's search-split objective and the best so far; the demo evaluation's searched best and best hand-tuned merge."""
    from .charts import pyplot, save_png

    plt = pyplot()
    if plt is None:
        return None
    tr = report["trace"]
    fig, ax = plt.subplots(figsize=(10, 4))
    methods = list(dict.fromkeys(t["method"] for t in tr))
    for j, m in enumerate(methods):
        pts = [(t["trial"], t["value"]) for t in tr if t["method"] == m and t["value"] is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=16, color=f"C{j}", label=f"trial: {m}", zorder=3)
    steps = [(t["trial"], t["best_so_far"]) for t in tr if t["best_so_far"] is not None]
    ax.step([p[0] for p in steps], [p[1] for p in steps], where="post", color="black", lw=1.2, label="best so far (search split)")
    last = max((t["trial"] for t in tr), default=1)
    ax.scatter(
        [last], [report["scores"]["normalized"]], marker="*", s=120, color="#C44E52", zorder=4, label="searched best (demo evaluation)"
    )
    cmp_ = report.get("comparison") or {}
    hand = cmp_.get("best_hand_tuned")
    if hand:
        ax.axhline(hand["normalized"], color="grey", ls="--", lw=1, label=f"best hand-tuned: {hand['name']} (demo evaluation)")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{report['objective']} normalized score")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"splice demo — {zoo} zoo: splice search, {report['trials']} trials ({report['optimizer']} optimizer)", fontsize=10)
    return save_png(fig, path)
