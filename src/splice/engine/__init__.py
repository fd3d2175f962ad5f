"""The engine: plans a recipe into per-tensor work (``plan``) and runs it with bounded
memory through the streaming writer (``run``); ``in_memory`` merges tensors and state
dicts without files. Every operation that writes weights goes through here.
"""

from .in_memory import merge_state_dicts, merge_tensors
from .plan import TORCH_DTYPES, Input, Job, Plan, RecipePlanner, open_sources, plan_recipe
from .run import MergeOptions, Runner, job_memory, run_merge

__all__ = [
    "TORCH_DTYPES",
    "Input",
    "Job",
    "MergeOptions",
    "Plan",
    "RecipePlanner",
    "Runner",
    "job_memory",
    "merge_state_dicts",
    "merge_tensors",
    "open_sources",
    "plan_recipe",
    "run_merge",
]
