"""The engine: plans a recipe into per-tensor work (``plan``), turns the plan into entries
of the one bounded streaming writer (``run``), which every operation that writes weights
uses (``write``); ``in_memory`` merges tensors and state dicts without files.
"""

from .in_memory import merge_state_dicts, merge_tensors
from .plan import TORCH_DTYPES, Input, Job, Plan, RecipePlanner, open_sources, plan_recipe
from .run import MergeOptions, job_memory, run_merge, tensor_seed
from .write import Entry, write_checkpoint

__all__ = [
    "TORCH_DTYPES",
    "Entry",
    "Input",
    "Job",
    "MergeOptions",
    "Plan",
    "RecipePlanner",
    "job_memory",
    "merge_state_dicts",
    "merge_tensors",
    "open_sources",
    "plan_recipe",
    "run_merge",
    "tensor_seed",
    "write_checkpoint",
]
