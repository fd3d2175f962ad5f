"""Merge methods: one module per method, each a pure function on tensors.

Modules whose names start with ``_`` hold helpers shared by several methods.
"""

from .registry import NO_DEFAULT, MergeMethod, Param, all_methods, get_method, merge_method, register

__all__ = ["NO_DEFAULT", "MergeMethod", "Param", "all_methods", "get_method", "merge_method", "register"]
