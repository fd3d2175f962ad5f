"""``splice search``: find the merge recipe that scores best, composed of what splice has.

A candidate is an ordinary recipe (``space``), merged in memory by the same methods
into one resident model (``resident``) and scored by splice eval's losses and normalized
scores (``objectives``) on a search split of the held-out text (``splits``); optimizers
live in one registry (``optimizers``); a study is a folder whose ``best.yaml`` is a
recipe ``splice merge`` runs (``study``)::

    from splice.search import run_search
    summary = run_search("search.yaml", "study/", budget=50)

Importing this package imports neither torch nor optuna.
"""

from .optimizers import OPTIMIZERS, Optimizer, SearchError
from .spec import SearchSpec, load_spec, parse_spec
from .study import SearchOptions, format_leaderboard, read_trials, run_search, trace

__all__ = [
    "OPTIMIZERS",
    "Optimizer",
    "SearchError",
    "SearchOptions",
    "SearchSpec",
    "format_leaderboard",
    "load_spec",
    "parse_spec",
    "read_trials",
    "run_search",
    "trace",
]
