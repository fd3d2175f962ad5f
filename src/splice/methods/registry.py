"""The registry of merge methods, keyed by the name recipes use.

A merge method is a pure function on the tensors of one parameter:

    fn(tensors, base, *, <parameters>, generator=None) -> Tensor

- ``tensors``: list of the contributing models' tensors (same shape), in recipe
  order, with the base model removed when the method uses a base.
- ``base``: the base model's tensor, or None for methods without one.
- per-model parameters arrive as lists aligned with ``tensors``; global
  parameters as scalars. Parameter names that are Python keywords get a
  trailing underscore (``lambda`` -> ``lambda_``).
- random methods receive a ``torch.Generator``; same generator state, same output.

No I/O, no globals: the engine decides which tensors to load and where to write.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

NO_DEFAULT = object()


@dataclass(frozen=True)
class Param:
    name: str  # name as written in recipes (mergekit's spelling)
    default: Any = NO_DEFAULT  # NO_DEFAULT means required
    per_model: bool = False  # True: one value per model; False: global
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is NO_DEFAULT

    @property
    def py_name(self) -> str:
        return self.name + "_" if keyword.iskeyword(self.name) else self.name


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., Any]
    params: tuple[Param, ...] = ()
    base: str = "none"  # "none" | "optional" | "required"
    randomized: bool = False
    # True: fn takes inputs in their stored float dtype (bf16/f16 included), computes in
    # float32 itself and returns float32; the engine then skips the float32 copies of the inputs.
    native_dtype: bool = False
    summary: str = ""
    paper: str = ""
    min_models: int = 1
    max_models: int | None = None
    aliases: tuple[str, ...] = field(default=())

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]


_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    for key in (method.name, *method.aliases):
        if key in _METHODS:
            raise ValueError(f"merge method {key!r} registered twice")
        _METHODS[key] = method
    return method


def merge_method(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``@merge_method("ties", params=(...), base="required")``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        register(MergeMethod(name=name, fn=fn, **kwargs))
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    _discover()
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(name) from None


def all_methods() -> list[MergeMethod]:
    _discover()
    seen: dict[str, MergeMethod] = {}
    for m in _METHODS.values():
        seen.setdefault(m.name, m)
    return sorted(seen.values(), key=lambda m: m.name)


_discovered = False


def _discover() -> None:
    """Import every method module in this package once (one file per method)."""
    global _discovered
    if _discovered:
        return
    import importlib
    import pkgutil

    from . import __path__ as pkg_path

    for info in pkgutil.iter_modules(pkg_path):
        if not info.name.startswith("_") and info.name != "registry":
            importlib.import_module(f"{__package__}.{info.name}")
    _discovered = True
