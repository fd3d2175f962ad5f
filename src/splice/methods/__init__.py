"""Merge methods: one module per method (or per family, as task arithmetic), each a pure function on tensors.

Modules whose names start with ``_`` hold helpers shared by several methods.
"""

from .registry import METHODS, NO_DEFAULT, MergeMethod, Param, Range, all_methods, get_method, known_param_names, merge_method, register

__all__ = [
    "METHODS",
    "NO_DEFAULT",
    "MergeMethod",
    "Param",
    "Range",
    "all_methods",
    "get_method",
    "known_param_names",
    "merge_method",
    "register",
]
