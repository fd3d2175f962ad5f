"""Errors a user can cause. The CLI prints them as one line (traceback under --verbose)."""

from __future__ import annotations


class SpliceError(Exception):
    """A problem with the user's input: a recipe, a model folder, an output path.

    The message must say what is wrong and where (file, tensor, key) in one line.
    """


class RecipeError(SpliceError):
    pass


class CheckpointError(SpliceError):
    pass


class MergeError(SpliceError):
    pass
