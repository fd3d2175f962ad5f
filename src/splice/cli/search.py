"""``splice search``: parse, call ``splice.search.run_search``, print the leaderboard."""

from __future__ import annotations

import argparse
import sys

from .. import options
from .common import POSITIVE_INT, add_common, add_force, add_threads, checked


def cmd_search(args: argparse.Namespace) -> int:
    from ..search import SearchOptions, format_leaderboard, load_spec, run_search

    spec = load_spec(args.spec)
    opts = SearchOptions(
        budget=args.budget,
        time=args.time,
        optimizer=args.optimizer,
        seed=args.seed,
        objectives=args.objectives,
        threads=args.threads,
        workers=args.workers,
        ray=args.ray,
        resume=args.resume,
        force=args.force,
        write_best=args.write_best,
        quiet=args.quiet,
    )
    try:
        s = run_search(spec, args.out, opts)
    except KeyboardInterrupt:  # every finished trial is on disk already: say so, not "nothing was written"
        print(f"splice: interrupted; the study in {args.out} keeps its finished trials; --resume continues it", file=sys.stderr)
        return 130
    best = s["best"]
    if best is None:
        print(f"{s['study']}: {s['trials']} trial(s), none succeeded; no best.yaml")
        return 0
    if s["leaderboard"] is not None:
        print(f"test split ({', '.join(f'{d} {n}' for d, n in s['leaderboard']['tokens'].items())} tokens):")
        print(format_leaderboard(s["leaderboard"], list(spec.domains)))
        on_test = s["leaderboard"]["rows"][0]["scores"]
        seen = s["leaderboard"]["best_search_split"]
        if seen.get("normalized") is None:  # no experts (a drop space): the mean loss
            on_test_loss = s["leaderboard"]["rows"][0]["loss"]
            print(f"best: loss {_num(seen.get('loss'), 4)} on the search split, {_num(on_test_loss, 4)} on the test split")
        else:
            print(
                f"best: mean {_num(seen['normalized'])} / worst {_num(seen['min_normalized'])} on the search split, "
                f"{_num(on_test['normalized'])} / {_num(on_test['min_normalized'])} on the test split"
            )
    per = f", {s['seconds_per_eval']:.2f}s per evaluation" if s["seconds_per_eval"] is not None else ""
    print(f"{s['study']}: {s['trials']} trial(s){per}; best is trial {best['trial']}: {s['study']}/best.yaml (splice merge runs it)")
    if s.get("written"):
        print(f"best model written to {s['written']}")
    return 0


def _num(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _duration(text: str, name: str = "value") -> float:
    from ..search.spec import parse_time

    return parse_time(text, name)


def add_search(sub) -> None:
    p = sub.add_parser("search", help="search merge recipes for the one that scores best (a study folder; best.yaml is a recipe)")
    p.add_argument("spec", help="search spec YAML file (models, evaluation, space, objective, optimizer)")
    p.add_argument("-o", "--out", required=True, help="the study folder (trials.jsonl, best.yaml, ...)")
    p.add_argument("--budget", type=POSITIVE_INT, default=None, metavar="N", help="trials in the study in all (default: the spec's budget)")
    p.add_argument(
        "--time",
        type=checked(_duration),
        default=None,
        metavar="DURATION",
        help="stop asking for trials after this long, e.g. 30m, 2h, 90s",
    )
    p.add_argument(
        "--optimizer",
        default=None,
        metavar="NAME",
        help="default, random, tpe, cmaes, nsga2 or evopress (default: the spec's, else default)",
    )
    p.add_argument(
        "--objectives",
        default=None,
        metavar="LIST",
        help="comma-separated objectives: mean, worst, forgetting or a domain (default: the spec's)",
    )
    p.add_argument(
        "--write-best",
        default=None,
        metavar="DIR",
        help="at the end, write the best model to DIR (splice merge of best.yaml; an existing DIR needs --force)",
    )
    p.add_argument("--resume", action="store_true", help="continue the study in -o (same spec, optimizer and seed: the same trace)")
    add_force(p)
    p.add_argument(
        "--seed",
        type=checked(options.seed),
        default=None,
        metavar="N",
        help="seed of the optimizer; the same seed gives the same trace (default: the spec's, else 0)",
    )
    add_threads(p)
    p.add_argument(
        "--workers",
        type=POSITIVE_INT,
        default=1,
        metavar="N",
        help="local worker processes evaluating candidates at once, asynchronously; each gets its share of --threads (default: 1)",
    )
    p.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="evaluate on Ray: 'auto' (a cluster on this machine, else a local one) or a cluster's address; --workers actors (needs ray installed)",
    )
    add_common(p)
    p.set_defaults(func=cmd_search)
