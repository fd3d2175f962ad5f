"""A study is a folder: the trials so far, the best recipe, and what a resume needs.

    study/
      study.json        what the study was made from: the spec's fingerprint, optimizer, seed, objectives
      asks.jsonl        one line per candidate the optimizer proposed (trial number, params, how many
                        results it had been told then), synced before the candidate is evaluated
      trials.jsonl      one line per finished trial, in the order they finish (params, decoded recipe,
                        per-domain losses and scores, objective values, seconds, seed), synced before
                        the optimizer is told
      best.yaml         the best recipe so far (first objective), an ordinary recipe `splice merge` runs;
                        replaced atomically on each improvement
      best.json         its trial, for readers that want numbers
      pareto.json       with several objectives: the non-dominated trials
      leaderboard.json  at the end: the best against the base and the experts on the test split

A resume replays the recorded asks and tells, in their order, through a fresh optimizer
(which must propose the same candidates: the same seed gives the same trace) and goes on;
a candidate asked but never finished (a kill mid-trial, or a half-written last line) is
run again first. A study folder is not reused
unless ``resume`` (continue it) or ``force`` (start over) says so, and a study made from
another spec, optimizer, seed or objectives is never resumed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .. import options
from ..errors import SpliceError, option
from ..eval.results import write_text_atomic
from .evaluate import MERGE_SEED
from .fidelity import Promotion, fidelity_of, fidelity_windows
from .objectives import better, pareto_front, scores_of
from .optimizers import OPTIMIZERS, SearchError
from .spec import SearchSpec, load_spec, objectives_list, parse_time
from .workers import Task

STUDY_FORMAT = 1
STUDY_FILES = ("study.json", "asks.jsonl", "trials.jsonl", "best.yaml", "best.json", "pareto.json", "leaderboard.json")


@dataclass
class SearchOptions:
    budget: int | None = None  # trials in the study in all (a resume goes on to this many)
    time: float | str | None = None  # seconds (or "30m") for this run
    optimizer: str | None = None  # default: the spec's
    seed: int | None = None  # default: the spec's
    objectives: list[str] | str | None = None  # default: the spec's
    threads: int | None = None  # torch threads in all; default: the spec's, else every core this process may use
    workers: int = 1  # processes evaluating candidates; each gets threads // workers torch threads
    resume: bool = False
    force: bool = False
    quiet: bool = False
    leaderboard: bool = True  # score the best, the base and the experts on the test split at the end
    write_best: str | os.PathLike | None = None  # a folder: splice merge best.yaml into it at the end (force replaces it)
    ray: str | None = None  # "auto" or a Ray cluster's address: the workers are Ray actors there (``workers`` of them)

    def __post_init__(self) -> None:
        options.optional(options.positive_int, self.budget, "budget")
        if self.time is not None:
            self.time = parse_time(self.time)
        options.optional(options.seed, self.seed, "seed")
        options.optional(options.positive_int, self.threads, "threads")
        options.positive_int(self.workers, "workers")
        if self.resume and self.force:
            raise SearchError(f"{option('resume')} continues a study and {option('force')} starts it over; give one")


@dataclass
class Trial:
    number: int  # 1, 2, ... (the line of trials.jsonl it is on)
    params: dict
    recipe: dict
    status: str = "ok"  # "ok" | "failed"
    losses: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    values: list[float] | None = None
    seconds: float = 0.0
    seed: int = 0
    error: str | None = None
    level: str | None = None  # with a fidelity: "screen" (few tokens) or "full" (every search window)
    screen: dict | None = None  # a re-scored trial's screen result ({"values", "losses"})

    def to_json(self) -> dict:
        d = {
            "trial": self.number,
            "status": self.status,
            "params": self.params,
            "recipe": self.recipe,
            "losses": {k: round(v, 6) for k, v in self.losses.items()},
            "scores": self.scores,
            "values": self.values,
            "seconds": round(self.seconds, 3),
            "seed": self.seed,
            "merge_seed": MERGE_SEED,
        }
        if self.error is not None:
            d["error"] = self.error
        if self.level is not None:
            d["level"] = self.level
        if self.screen is not None:
            d["screen"] = {"values": self.screen["values"], "losses": {k: round(v, 6) for k, v in self.screen["losses"].items()}}
        return d


def trace(records: list[dict]) -> list[tuple]:
    """What must be the same between a resumed and an uninterrupted study: params, status, values per trial."""
    return [(r["trial"], json.dumps(r["params"], sort_keys=True), r["status"], r["values"]) for r in records]


def read_trials(path: str | os.PathLike, check: bool = True) -> list[dict]:
    """The records of a study's ``trials.jsonl`` (or ``asks.jsonl``); a half-written last line is cut off the file.

    Trials are in the order they finished (with several workers not the order they were asked).
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    records, good = [], 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except ValueError:
            break
        good += len(line)
    if good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    seen = set()
    for i, r in enumerate(records):
        n = r.get("trial")
        if not isinstance(n, int) or n < 1 or n in seen:
            raise SearchError(f"{path}:{i + 1}: trial {n!r} again or not a trial number; the file was edited?")
        seen.add(n)
    return records


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def best_yaml(trial: Trial, spec: SearchSpec, study: Path) -> str:
    """best.yaml's text: a comment saying where it comes from, then the recipe."""
    vals = ", ".join(f"{o} {v:.4f}" for o, v in zip(spec.objectives, trial.values or []))
    head = f"# splice search: trial {trial.number} of study {study}, {vals} on the search split\n"
    return head + yaml.safe_dump(trial.recipe, sort_keys=False, default_flow_style=None)


class Study:
    """A study folder opened for running (see the module docstring)."""

    def __init__(self, folder: Path, spec: SearchSpec, opts: SearchOptions, optimizer: str, seed: int, objectives: list[str]):
        self.folder = folder
        self.spec = spec
        self.opts = opts
        self.optimizer = optimizer
        self.seed = seed
        self.objectives = objectives
        self.trials_path = folder / "trials.jsonl"
        self.asks_path = folder / "asks.jsonl"

    def meta(self) -> dict:
        from .. import __version__

        return {
            "format": STUDY_FORMAT,
            "fingerprint": self.spec.fingerprint(),
            "spec": self.spec.file,
            "optimizer": self.optimizer,
            "seed": self.seed,
            "objectives": self.objectives,
            "splice": __version__,
        }

    def open(self) -> list[dict]:
        """Check the folder against the rules (writing nothing); returns the recorded trials (empty for a new study)."""
        f = self.folder
        meta_path = f / "study.json"
        exists = f.exists() and any(f.iterdir())
        if self.opts.resume:
            if not meta_path.exists():
                raise SearchError(f"{f}: no study to resume (no study.json); run without {option('resume')} to start one")
            try:
                old = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise SearchError(f"{meta_path}: cannot read the study ({e})") from None
            new = self.meta()
            if old.get("fingerprint") != new["fingerprint"]:
                raise SearchError(
                    f"{f} is a study of another spec ({old.get('spec')}, fingerprint {old.get('fingerprint')}; "
                    f"{new['spec']} is {new['fingerprint']}); refusing to resume it"
                )
            for k in ("optimizer", "seed", "objectives"):
                if old.get(k) != new[k]:
                    raise SearchError(f"{f}: the study was run with {k} {old.get(k)!r}, not {new[k]!r}; refusing to resume it")
            return read_trials(self.trials_path)
        if exists and not self.opts.force:
            raise SearchError(
                f"study folder {f} exists and is not empty; pass {option('resume')} to continue it or {option('force')} to start over"
            )
        if exists:
            others = [p.name for p in f.iterdir() if p.name not in STUDY_FILES]
            if others:
                raise SearchError(
                    f"{f} holds files that are not a study's ({', '.join(sorted(others)[:3])}); refusing to start a study over them"
                )
        return []

    def create(self) -> None:
        """Start a new study in the folder (once the set-up succeeded); ``force`` clears an old one first."""
        for name in STUDY_FILES:
            (self.folder / name).unlink(missing_ok=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.folder / "study.json", json.dumps(self.meta(), indent=2) + "\n")


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run_search(spec: SearchSpec | str | os.PathLike, out: str | os.PathLike, opts: SearchOptions | None = None, **kw: Any) -> dict:
    """Search the spec's space for the best merge; the study goes to the folder ``out``.

    Args:
        spec: a spec file, YAML text or a ``SearchSpec``.
        out: the study folder.
        opts: the options; ``kw`` sets single fields of them (``budget=20``, ``resume=True``).

    Returns:
        ``{"study", "trials", "best" (the best trial's record), "leaderboard" (test split), "seconds_per_eval",
        "written" (the folder ``write_best`` wrote, or None)}``.

    Raises:
        SpliceError: one line for a bad spec, a study folder the rules refuse, a budget below one.
    """
    opts = opts or SearchOptions()
    if kw:
        for k in kw:
            if not hasattr(opts, k):
                raise TypeError(f"unknown option {k!r}")
        opts = replace(opts, **kw)
    spec = spec if isinstance(spec, SearchSpec) else load_spec(spec)
    optimizer = OPTIMIZERS.get(opts.optimizer).name if opts.optimizer is not None else spec.optimizer
    budget = opts.budget if opts.budget is not None else spec.budget
    limit = opts.time if opts.time is not None else spec.time
    if budget is None and limit is None:
        raise SearchError(f"no budget: give {option('budget', 'N')} trials or {option('time', '30m')} (or budget: / time: in the spec)")
    seed = opts.seed if opts.seed is not None else spec.seed
    objectives = spec.objectives
    if opts.objectives is not None:
        objectives = objectives_list(
            opts.objectives, list(spec.experts), spec.general, where=lambda m: SearchError(f"{option('objectives')}: {m}")
        )
    entry = OPTIMIZERS.get(optimizer)
    problem = entry.problem(spec.space)
    if problem:
        raise SearchError(problem)
    if len(objectives) > 1 and not entry.multi_objective:
        raise SearchError(
            f"optimizer {optimizer!r} follows one objective, and {len(objectives)} are asked ({', '.join(objectives)}); use nsga2 or tpe"
        )
    folder = options.output_folder(out, "out")
    from ..checkpoint.writer import check_output

    inputs = [spec.base, *spec.experts.values(), *spec.domains.values()]
    check_output(folder, force=True, inputs=inputs)
    if opts.write_best is not None:  # refused now, not after the search
        check_output(opts.write_best, force=opts.force, inputs=[*inputs, folder])
    spec = replace(spec, objectives=objectives)
    study = Study(folder, spec, opts, optimizer, seed, objectives)
    records = study.open()
    summary = _run(study, records, budget, limit)
    summary["written"] = None
    if opts.write_best is not None and summary["best"] is not None:
        from ..engine import run_merge

        _progress(f"writing the best (trial {summary['best']['trial']}) to {opts.write_best}", opts.quiet)
        summary["written"] = run_merge(summary["best"]["recipe"], opts.write_best, force=opts.force, quiet=True)["out"]
    return summary


def _run(study: Study, records: list[dict], budget: int | None, limit: float | None) -> dict:
    from ..eval.perplexity import read_text
    from .evaluate import Evaluator, references
    from .resident import ResidentModel
    from .splits import make_splits
    from .workers import InlinePool, ProcessPool, RayPool

    spec, opts = study.spec, study.opts
    quiet = opts.quiet
    threads = opts.threads or spec.threads or _default_threads()
    space = make_space(spec)
    directions = spec.directions()
    drop = space.kind == "drop"

    t_setup = time.perf_counter()
    workers = opts.workers
    pool = None
    models = {
        "base": spec.base,
        "models": list(spec.experts.values()),
        "threads": max(1, threads // workers),
        "batch_size": spec.batch_size,
    }
    if opts.ray is not None:  # Ray actors, each asking Ray for its torch threads as CPUs
        pool = RayPool(workers, models, opts.ray)
    elif workers > 1:  # the workers load their models while this process sets up; each pins its torch threads to its share of the cores
        pool = ProcessPool(workers, models)
    try:
        resident = ResidentModel(spec.base, list(spec.experts.values()), threads=threads, batch_size=spec.batch_size)
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    try:
        texts = {d: read_text(p) for d, p in spec.domains.items()}
        splits = make_splits(resident.tokenizer, texts, spec.seq_len, spec.search_share, spec.tokens)
        fid = fidelity_of(spec, study.optimizer, space)
        windows = fidelity_windows(splits.search, fid)
        refs = references(resident, spec.base, spec.experts, windows["full"], drop=drop)
        refs_screen = references(resident, spec.base, spec.experts, windows["screen"], drop=drop) if fid is not None else None
        for d in spec.experts:
            if refs[d][d] >= refs["base"][d]:
                raise SearchError(
                    f"expert {d!r} is no better than the base on its own domain's search split (loss {refs[d][d]:.4f}, base "
                    f"{refs['base'][d]:.4f}): a normalized score measures an expert's gain, and this one has none"
                )
        if drop:
            space.seed_from_planners(_planner_stats(resident, windows["full"]))
        space.keep = fid.keep if fid is not None else None
        opt = OPTIMIZERS.get(study.optimizer).make(space, directions, study.seed)
        staged = getattr(opt, "staged", False)
        evaluator = Evaluator(resident, windows, refs, refs_screen, spec.objectives, list(spec.experts), spec.general, directions, drop)
        tokens = {k: {d: sum(len(w) - 1 for w in ws) for d, ws in v.items()} for k, v in windows.items() if v is not None}
        screen = f", screened on {tokens['screen']} (keep {fid.keep:g})" if fid is not None else ""
        _progress(
            f"search: {space.describe()}, {study.optimizer} optimizer, {workers} worker(s), tokens per domain "
            f"{tokens['full']} (search){screen} / {splits.tokens('test')} (test); set up in {time.perf_counter() - t_setup:.1f}s",
            quiet,
        )

        if not opts.resume:
            study.create()
        asks = read_trials(study.asks_path) if opts.resume else []
        rule = Promotion(fid, directions[0]) if fid is not None and not staged else None
        best, pending = _replay(study, opt, space, asks, records, rule)
        if records or pending:
            _progress(f"resumed {study.folder}: {len(records)} trial(s) replayed, {len(pending)} asked and unfinished run again", quiet)

        if pool is None:
            pool = InlinePool(evaluator)
        else:
            pool.configure(evaluator.setup_of())
        asked = max([len(records), *(a["trial"] for a in asks)])
        told = len(records)
        t0 = time.perf_counter()
        evals: list[float] = []
        out_of_time = False
        while True:
            while pool.free() > 0:  # hand out candidates until every worker has one
                if pending:
                    task = pending.popleft()
                    if rule is not None:
                        task.promote = rule.threshold()
                else:
                    if budget is not None and asked >= budget:
                        break
                    if limit is not None and time.perf_counter() - t0 >= limit:
                        if not out_of_time:
                            _progress(f"time limit reached after {asked} trial(s)", quiet)
                        out_of_time = True
                        break
                    got = opt.ask()
                    if got is None:  # the optimizer waits for a result first
                        break
                    params, level = got if staged else (got, "screen" if rule is not None else None)
                    asked += 1
                    record = {"trial": asked, "told": told, "params": params}
                    if level is not None:
                        record["level"] = level
                    _append(study.asks_path, record)  # persisted before it is evaluated
                    task = Task(asked, params, space.decode(params), level, rule.threshold() if rule is not None else None)
                pool.submit(task)
            if pool.busy() == 0:
                break
            task, res = pool.result()
            trial = _trial(task, res, study.seed)
            _append(study.trials_path, trial.to_json())  # persisted before the next is asked
            opt.tell(task.params, trial.values)
            if rule is not None:
                rule.add(trial)
            told += 1
            evals.append(trial.seconds)
            if _improves(trial, best, spec.objectives):
                best = trial
                write_text_atomic(study.folder / "best.yaml", best_yaml(trial, spec, study.folder))
                write_text_atomic(study.folder / "best.json", json.dumps(trial.to_json(), indent=2) + "\n")
            left = f", {_duration(limit - (time.perf_counter() - t0))} left" if limit is not None else ""
            _progress(_line(trial, best, budget, spec.objectives, space) + left, quiet)
        pool.close()
        pool = None
        all_records = read_trials(study.trials_path)
        if len(spec.objectives) > 1:
            _write_pareto(study, all_records)
        summary: dict[str, Any] = {
            "study": str(study.folder),
            "trials": len(all_records),
            "best": best.to_json() if best is not None else None,
            "seconds_per_eval": round(sum(evals) / len(evals), 3) if evals else None,
            "leaderboard": None,
        }
        if best is not None and opts.leaderboard:
            board = _leaderboard(resident, spec, space, splits, best)
            write_text_atomic(study.folder / "leaderboard.json", json.dumps(board, indent=2) + "\n")
            summary["leaderboard"] = board
        return summary
    finally:
        if pool is not None:
            pool.close()
        resident.close()


PLANNER_TOKENS = 4096  # search tokens (all domains) the skip planners' hidden-state statistics are taken on


def make_space(spec: SearchSpec):
    """The spec's space over its base: a ``DropSpace`` (space.drop) or a ``MergeSpace``."""
    from ..architecture import num_layers
    from ..checkpoint.reader import open_model

    src = open_model(spec.base)
    try:
        if spec.space.drop is not None:
            from ..skip.costs import layer_costs
            from .drop import DropSpace

            return DropSpace(spec, layer_costs(src))
        from .space import MergeSpace

        return MergeSpace(spec, num_layers(src.config, src.keys()))
    finally:
        src.close()


def _planner_stats(resident, windows: dict):
    """splice skip's hidden-state statistics of the base on the search windows (the planners' calibration text)."""
    import torch

    from ..engine.write import torch_threads
    from ..skip.calibration import hidden_stats

    seqs, n = [], 0
    per_domain = [list(ws) for ws in windows.values()]
    while n < PLANNER_TOKENS and any(per_domain):  # interleave the domains
        for ws in per_domain:
            if ws and n < PLANNER_TOKENS:
                w = ws.pop(0)
                seqs.append(torch.tensor(w, dtype=torch.long))
                n += len(w)
    with torch_threads(resident.threads):
        return hidden_stats(resident.model, seqs)


def _improves(trial: Trial, best: Trial | None, objectives: list[str]) -> bool:
    """Whether ``trial`` becomes the best: it succeeded, was scored on every search window (not a screen only), and beats ``best``."""
    if trial.values is None or trial.level == "screen":
        return False
    return best is None or better(trial.values, best.values, objectives)


def _replay(study: Study, opt, space, asks: list[dict], records: list[dict], rule: Promotion | None = None):
    """Replay the recorded asks and tells through the fresh optimizer ``opt``, checking it proposes the same candidates.

    Returns (the best trial so far, the asked candidates with no result, as tasks to run again).
    """
    from collections import deque

    from .optimizers import params_key

    staged = getattr(opt, "staged", False)
    if not asks and records:  # a study without asks.jsonl: one worker, each trial asked after the one before was told
        asks = [{"trial": r["trial"], "told": i, "params": r["params"]} for i, r in enumerate(records)]
    out: dict[int, dict] = {}
    k = 0

    def ask_up_to(told: int) -> None:
        nonlocal k
        while k < len(asks) and asks[k]["told"] <= told:
            a = asks[k]
            got = opt.ask()
            params, level = got if staged and got is not None else (got, a.get("level"))
            if params is None or params_key(params) != params_key(a["params"]) or level != a.get("level"):
                raise SearchError(
                    f"{study.asks_path}:{k + 1}: the optimizer proposes another candidate than the recorded trial "
                    f"{a['trial']} on replay; this study cannot be resumed (was it made by another splice version?)"
                )
            out[a["trial"]] = a
            k += 1

    best = None
    for i, r in enumerate(records):
        ask_up_to(i)
        if out.pop(r["trial"], None) is None:
            raise SearchError(f"{study.trials_path}:{i + 1}: trial {r['trial']} has a result but was never asked; the file was edited?")
        opt.tell(r["params"], r["values"] if r["status"] == "ok" else None)
        t = _trial_from(r)
        if rule is not None:
            rule.add(t)
        if _improves(t, best, study.spec.objectives):
            best = t
    ask_up_to(len(records))
    return best, deque(Task(a["trial"], a["params"], space.decode(a["params"]), a.get("level")) for a in out.values())


def _trial_from(r: dict) -> Trial:
    return Trial(
        r["trial"],
        r["params"],
        r["recipe"],
        r["status"],
        r.get("losses", {}),
        r.get("scores", {}),
        r.get("values"),
        r.get("seconds", 0.0),
        r.get("seed", 0),
        r.get("error"),
        r.get("level"),
        r.get("screen"),
    )


def _trial(task, res: dict, seed: int) -> Trial:
    """A finished task's trial record."""
    failed = res.get("failed")
    return Trial(
        task.number,
        task.params,
        task.recipe,
        "failed" if failed else "ok",
        res.get("losses", {}),
        res.get("scores", {}),
        None if failed else res.get("values"),
        res.get("seconds", 0.0),
        seed,
        failed,
        res.get("level"),
        res.get("screen"),
    )


def _line(trial: Trial, best: Trial | None, budget: int | None, objectives: list[str], space) -> str:
    total = f"/{budget}" if budget is not None else ""
    level = {"screen": " (screen)", "full": " (re-scored)" if trial.screen else " (full)"}.get(trial.level or "", "")
    head = f"trial {trial.number}{total} {space.label(trial.params)}{level}"
    score = f"{objectives[0]} {trial.values[0]:.4f}" if trial.values is not None else f"failed ({trial.error})"
    b = f"best {best.values[0]:.4f} (trial {best.number})" if best is not None else "best -"
    return f"{head}: {score}, {b}, {trial.seconds:.2f}s/eval"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _write_pareto(study: Study, records: list[dict]) -> None:
    ok = [(r["trial"], r["values"]) for r in records if r["status"] == "ok" and r["values"] is not None]
    front = pareto_front(ok, study.spec.directions())
    rows = [
        {"trial": r["trial"], "values": dict(zip(study.objectives, r["values"])), "recipe": r["recipe"]}
        for r in records
        if r["trial"] in front
    ]
    write_text_atomic(study.folder / "pareto.json", json.dumps({"objectives": study.objectives, "front": rows}, indent=2) + "\n")


def _leaderboard(resident, spec: SearchSpec, space, splits, best: Trial) -> dict:
    """The best trial, the base, each expert and the space's baselines (each method's hand-tuned point, or splice
    skip's planners' drop sets), scored on the test split (never shown to the search)."""
    from .evaluate import references

    drop = space.kind == "drop"
    test_refs = references(resident, spec.base, spec.experts, splits.test, drop=drop)

    def losses(params: dict, recipe: dict) -> dict:
        if drop:
            return resident.losses(splits.test, units={(int(i), "layer") for i in params["drop"]})
        resident.apply(recipe, seed=MERGE_SEED)
        return resident.losses(splits.test)

    rows = [{"model": f"best (trial {best.number})", "losses": losses(best.params, best.recipe)}]
    rows += [{"model": "base", "losses": test_refs["base"]}]
    rows += [{"model": f"expert {d}", "losses": test_refs[d]} for d in spec.experts]
    for name, params in space.baselines():
        try:
            rows.append({"model": name, "losses": losses(params, space.decode(params))})
        except SpliceError:
            continue
    for row in rows:
        row["scores"] = scores_of(row["losses"], test_refs, list(spec.experts), spec.general) if spec.experts else {}
        row["loss"] = round(sum(row["losses"].values()) / len(row["losses"]), 6)
        row["losses"] = {k: round(v, 6) for k, v in row["losses"].items()}
    search_scores = best.scores
    return {
        "split": "test",
        "tokens": splits.tokens("test"),
        "rows": rows,
        "best_search_split": {
            "normalized": search_scores.get("normalized"),
            "min_normalized": search_scores.get("min_normalized"),
            "loss": round(sum(best.losses.values()) / len(best.losses), 6) if best.losses else None,
        },
    }


def format_leaderboard(board: dict, domains: list[str]) -> str:
    """The leaderboard as a plain-text table: loss per domain and their mean, mean and worst normalized score, forgetting."""
    head = ["model", *[f"{d} loss" for d in domains], "loss", "mean", "worst", "forget%"]
    rows = [head]
    for r in board["rows"]:
        s = r["scores"]

        def num(v, fmt="{:.3f}"):
            return "-" if v is None else fmt.format(v)

        rows.append(
            [
                r["model"],
                *[f"{r['losses'][d]:.4f}" for d in domains],
                f"{r['loss']:.4f}",
                num(s.get("normalized")),
                num(s.get("min_normalized")),
                num(None if s.get("forgetting") is None else 100 * s["forgetting"], "{:+.2f}"),
            ]
        )
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows)
