"""A study is a folder: the trials so far, the best recipe, and what a resume needs.

    study/
      study.json        what the study was made from: the spec's fingerprint, optimizer, seed, objectives
      trials.jsonl      one line per trial (params, decoded recipe, per-domain losses and scores,
                        objective values, seconds, seed), written and synced before the next is asked
      best.yaml         the best recipe so far (first objective), an ordinary recipe `splice merge` runs;
                        replaced atomically on each improvement
      best.json         its trial, for readers that want numbers
      pareto.json       with several objectives: the non-dominated trials
      leaderboard.json  at the end: the best against the base and the experts on the test split

A resume replays the recorded trials through a fresh optimizer (which must propose the
same candidates: the same seed gives the same trace) and goes on; a half-written last line
(a kill mid-write) is dropped and that trial is run again. A study folder is not reused
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
from .objectives import better, objective_values, pareto_front, scores_of
from .optimizers import OPTIMIZERS, SearchError
from .spec import SearchSpec, load_spec, objectives_list, parse_time

STUDY_FORMAT = 1
STUDY_FILES = ("study.json", "trials.jsonl", "best.yaml", "best.json", "pareto.json", "leaderboard.json")
MERGE_SEED = 0  # the seed random methods (DARE, DELLA) merge with: splice merge's default, so best.yaml gives the same weights


@dataclass
class SearchOptions:
    budget: int | None = None  # trials in the study in all (a resume goes on to this many)
    time: float | str | None = None  # seconds (or "30m") for this run
    optimizer: str | None = None  # default: the spec's
    seed: int | None = None  # default: the spec's
    objectives: list[str] | str | None = None  # default: the spec's
    threads: int | None = None  # torch threads; default: the spec's, else every core this process may use
    resume: bool = False
    force: bool = False
    quiet: bool = False
    leaderboard: bool = True  # score the best, the base and the experts on the test split at the end

    def __post_init__(self) -> None:
        options.optional(options.positive_int, self.budget, "budget")
        if self.time is not None:
            self.time = parse_time(self.time)
        options.optional(options.seed, self.seed, "seed")
        options.optional(options.positive_int, self.threads, "threads")
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
        return d


def trace(records: list[dict]) -> list[tuple]:
    """What must be the same between a resumed and an uninterrupted study: params, status, values per trial."""
    return [(r["trial"], json.dumps(r["params"], sort_keys=True), r["status"], r["values"]) for r in records]


def read_trials(path: str | os.PathLike) -> list[dict]:
    """The trials of a study's ``trials.jsonl``; a half-written last line is cut off the file."""
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
    for i, r in enumerate(records):
        if r.get("trial") != i + 1:
            raise SearchError(f"{path}:{i + 1}: trial {r.get('trial')!r} where trial {i + 1} was expected; the file was edited?")
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
        ``{"study", "trials", "best" (the best trial's record), "leaderboard" (test split), "seconds_per_eval"}``.

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
    if len(objectives) > 1 and not entry.multi_objective:
        raise SearchError(
            f"optimizer {optimizer!r} follows one objective, and {len(objectives)} are asked ({', '.join(objectives)}); use nsga2 or tpe"
        )
    folder = options.output_folder(out, "out")
    from ..checkpoint.writer import check_output

    check_output(folder, force=True, inputs=[spec.base, *spec.experts.values(), *spec.domains.values()])
    spec = replace(spec, objectives=objectives)
    study = Study(folder, spec, opts, optimizer, seed, objectives)
    records = study.open()
    return _run(study, records, budget, limit)


def _run(study: Study, records: list[dict], budget: int | None, limit: float | None) -> dict:
    from ..architecture import num_layers
    from ..checkpoint.reader import open_model
    from ..eval.perplexity import read_text
    from .resident import ResidentModel
    from .space import MergeSpace
    from .splits import make_splits

    spec, opts = study.spec, study.opts
    quiet = opts.quiet
    threads = opts.threads or spec.threads or _default_threads()
    src = open_model(spec.base)
    try:
        n_layers = num_layers(src.config, src.keys())
    finally:
        src.close()
    space = MergeSpace(spec, n_layers)
    directions = spec.directions()
    opt = OPTIMIZERS.get(study.optimizer).make(space, directions, study.seed)

    t_setup = time.perf_counter()
    resident = ResidentModel(spec.base, list(spec.experts.values()), threads=threads, batch_size=spec.batch_size)
    try:
        texts = {d: read_text(p) for d, p in spec.domains.items()}
        splits = make_splits(resident.tokenizer, texts, spec.seq_len, spec.search_share, spec.tokens)
        refs = _reference_losses(resident, spec, splits.search)
        for d in spec.experts:
            if refs[d][d] >= refs["base"][d]:
                raise SearchError(
                    f"expert {d!r} is no better than the base on its own domain's search split (loss {refs[d][d]:.4f}, base "
                    f"{refs['base'][d]:.4f}): a normalized score measures an expert's gain, and this one has none"
                )
        _progress(
            f"search: {len(space.methods)} method(s), {len(space.all_genes())} genes, {study.optimizer} optimizer, "
            f"tokens per domain {splits.tokens('search')} (search) / {splits.tokens('test')} (test); set up in "
            f"{time.perf_counter() - t_setup:.1f}s",
            quiet,
        )

        if not opts.resume:
            study.create()
        best: Trial | None = None
        # replay: the optimizer must propose the recorded candidates again
        for r in records:
            params = opt.ask()
            if json.dumps(params, sort_keys=True) != json.dumps(r["params"], sort_keys=True):
                raise SearchError(
                    f"{study.trials_path}:{r['trial']}: the optimizer proposes another candidate than the recorded trial "
                    f"{r['trial']} on replay; this study cannot be resumed (was it made by another splice version?)"
                )
            opt.tell(params, r["values"] if r["status"] == "ok" else None)
            t = _trial_from(r)
            if t.values is not None and (best is None or better(t.values, best.values, spec.objectives)):
                best = t
        if records:
            _progress(f"resumed {study.folder}: {len(records)} trial(s) replayed", quiet)

        t0 = time.perf_counter()
        n = len(records)
        evals: list[float] = []
        while budget is None or n < budget:
            if limit is not None and time.perf_counter() - t0 >= limit:
                _progress(f"time limit reached after {n} trial(s)", quiet)
                break
            params = opt.ask()
            trial = _evaluate(resident, space, params, refs, splits.search, spec, n + 1, study.seed)
            _append(study.trials_path, trial.to_json())  # persisted before the next is asked
            opt.tell(params, trial.values)
            evals.append(trial.seconds)
            improved = trial.values is not None and (best is None or better(trial.values, best.values, spec.objectives))
            if improved:
                best = trial
                write_text_atomic(study.folder / "best.yaml", best_yaml(trial, spec, study.folder))
                write_text_atomic(study.folder / "best.json", json.dumps(trial.to_json(), indent=2) + "\n")
            left = f", {_duration(limit - (time.perf_counter() - t0))} left" if limit is not None else ""
            _progress(_line(trial, best, budget, spec.objectives, space) + left, quiet)
            n += 1
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
        resident.close()


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
    )


def _reference_losses(resident, spec: SearchSpec, windows: dict) -> dict[str, dict[str, float]]:
    """Loss per domain of the base (``"base"``) and of each expert (by its domain)."""
    out = {}
    for name, ref in [("base", spec.base), *spec.experts.items()]:
        resident.load_reference(ref)
        out[name] = resident.losses(windows)
    return out


def _evaluate(resident, space, params: dict, refs: dict, windows: dict, spec: SearchSpec, number: int, seed: int) -> Trial:
    recipe = space.decode(params)
    trial = Trial(number, params, recipe, seed=seed)
    t0 = time.perf_counter()
    try:
        resident.apply(recipe, seed=MERGE_SEED)
        trial.losses = resident.losses(windows)
        trial.scores = scores_of(trial.losses, refs, list(spec.experts), spec.general)
        trial.values = objective_values(trial.scores, spec.objectives)
        if trial.values is None:
            trial.status, trial.error = "failed", "an objective is undefined (a non-finite loss, or an expert no better than the base)"
    except SpliceError as e:  # a candidate the methods refuse (e.g. weights that normalize to 0): a failed trial, the study goes on
        trial.status, trial.error = "failed", str(e)
        trial.values = None
    trial.seconds = time.perf_counter() - t0
    return trial


def _line(trial: Trial, best: Trial | None, budget: int | None, objectives: list[str], space) -> str:
    total = f"/{budget}" if budget is not None else ""
    head = f"trial {trial.number}{total} {space.method_of(trial.params)}"
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
    """The best trial, the base, each expert and each method's hand-tuned point, scored on the test split (never shown to the search)."""
    test_refs = _reference_losses(resident, spec, splits.test)
    resident.apply(best.recipe, seed=MERGE_SEED)
    best_test = resident.losses(splits.test)
    rows = [{"model": f"best (trial {best.number})", "losses": best_test}]
    rows += [{"model": "base", "losses": test_refs["base"]}]
    rows += [{"model": f"expert {d}", "losses": test_refs[d]} for d in spec.experts]
    for method in space.methods:  # the hand-tuned baselines: each method at the point the default optimizer starts from
        try:
            resident.apply(space.decode(space.start(method)), seed=MERGE_SEED)
        except SpliceError:
            continue
        rows.append({"model": f"hand-tuned {method}", "losses": resident.losses(splits.test)})
    for row in rows:
        row["scores"] = scores_of(row["losses"], test_refs, list(spec.experts), spec.general)
        row["losses"] = {k: round(v, 6) for k, v in row["losses"].items()}
    search_scores = best.scores
    return {
        "split": "test",
        "tokens": splits.tokens("test"),
        "rows": rows,
        "best_search_split": {"normalized": search_scores.get("normalized"), "min_normalized": search_scores.get("min_normalized")},
    }


def format_leaderboard(board: dict, domains: list[str]) -> str:
    """The leaderboard as a plain-text table: loss per domain, mean and worst normalized score, forgetting."""
    head = ["model", *[f"{d} loss" for d in domains], "mean", "worst", "forget%"]
    rows = [head]
    for r in board["rows"]:
        s = r["scores"]

        def num(v, fmt="{:.3f}"):
            return "-" if v is None else fmt.format(v)

        rows.append(
            [
                r["model"],
                *[f"{r['losses'][d]:.4f}" for d in domains],
                num(s.get("normalized")),
                num(s.get("min_normalized")),
                num(None if s.get("forgetting") is None else 100 * s["forgetting"], "{:+.2f}"),
            ]
        )
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows)
