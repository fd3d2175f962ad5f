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
- data-aware methods (``statistics="inputs"`` or ``"fisher"``) receive ``statistics=``: per
  model, the calibration statistics of this parameter, or None (see ``methods/regmean.py``).

Call a method through its ``MergeMethod`` (``get_method("ties")(tensors, base,
**params)``): that checks the inputs once for every method (a base where one is
required, the number of models, equal shapes, one value per model for per-model
parameters, every value inside its parameter's range) and then calls ``fn``.
``fn`` itself assumes checked inputs.

No I/O, no globals: the engine decides which tensors to load and where to write.
This module imports no torch, so ``splice methods`` and the recipe checks stay light.
"""

from __future__ import annotations

import keyword
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..registry import Registry

NO_DEFAULT = object()


@dataclass(frozen=True)
class Range:
    """The values a numeric parameter may take: an interval of finite numbers (ends optional)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # True: ``low`` itself is excluded
    high_open: bool = False

    def __contains__(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below

    def __str__(self) -> str:
        """ "" (any finite number), ">= 1", "< 2" or an interval such as "(0, 1]"."""
        if self.low == -math.inf and self.high == math.inf:
            return ""
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low == -math.inf:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


FINITE = Range()
FRACTION = Range(0.0, 1.0)  # [0, 1]
POSITIVE = Range(0.0, low_open=True)  # > 0
NON_NEGATIVE = Range(0.0)  # >= 0


@dataclass(frozen=True)
class Param:
    name: str  # name as written in recipes (mergekit's spelling)
    default: Any = NO_DEFAULT  # NO_DEFAULT means required
    per_model: bool = False  # True: one value per model; False: global
    help: str = ""
    kind: str = "float"  # "float" (any number), "int" or "bool"
    range: Range = FINITE  # of numbers (booleans have none)
    optional: bool = False  # True: None (unset) is a valid value

    @property
    def required(self) -> bool:
        return self.default is NO_DEFAULT

    @property
    def py_name(self) -> str:
        return self.name + "_" if keyword.iskeyword(self.name) else self.name

    @property
    def bounds(self) -> str:
        """The range in words for the methods table: "" (any finite number, or a boolean), "in [0, 1]", "integer >= 1"."""
        if self.kind == "bool":
            return ""
        text = str(self.range)
        text = f"in {text}" if text.startswith(("[", "(")) else text
        return f"integer {text}".strip() if self.kind == "int" else text

    @property
    def valid(self) -> str:
        """What the parameter accepts, for messages: "true or false", "a number in [0, 1]", ..."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "int":
            return f"an {self.bounds}"
        return f"a number {self.bounds}" if self.bounds else "a finite number"

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not valid for this parameter, or None when it is.

        Booleans also accept 0 and 1 (mergekit's pydantic does); numbers accept
        ints and floats (not booleans), integers also integral floats.
        """
        if value is None and self.optional:
            return None
        if self.kind == "bool":
            ok = isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            ok = False
        else:
            ok = value in self.range and (self.kind != "int" or float(value).is_integer())
        return None if ok else f"must be {self.valid}, got {value!r}"


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
    # Which calibration statistics fn takes as ``statistics=`` (per model, or None where none were
    # measured; see splice.calibration): "inputs" (a Linear's input Gram, an embedding's token
    # counts) or "fisher" (the diagonal Fisher); "" none. The engine loads them from the files
    # a recipe's ``calibration:`` names, and refuses a recipe without them.
    statistics: str = ""
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

    def __call__(self, tensors: Sequence[Any], base: Any = None, **params: Any) -> Any:
        """Check the inputs (see the module docstring), then ``fn(tensors, base, **params)``.

        Args:
            tensors: the contributing models' tensors, base excluded.
            base: the base model's tensor, or None.
            **params: parameters by Python name (``lambda_``); per-model ones as a
                list (one per tensor) or a scalar for every model; missing ones
                take their defaults. Other keywords (``generator``) pass through.

        Returns:
            The merged tensor.

        Raises:
            ValueError: the inputs or a parameter value are not valid for this method.
        """
        tensors = list(tensors)
        self.check_tensors(tensors, base)
        return self.fn(tensors, base, **self.bind(params, len(tensors)))

    def check_tensors(self, tensors: Sequence[Any], base: Any) -> None:
        """A base where one is required, the number of models, equal shapes; ValueError otherwise."""
        if self.base == "required" and base is None:
            raise ValueError("needs a base model")
        n = len(tensors)
        lo, hi = self.min_models, self.max_models
        if n < lo or (hi is not None and n > hi):
            want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            raise ValueError(f"needs {want} model tensor(s) besides the base, got {n}")
        shapes = [tuple(t.shape) for t in (*tensors, *(() if base is None else (base,)))]
        if len(set(shapes)) > 1:
            raise ValueError(f"tensors have different shapes {sorted(set(shapes))}")

    def bind(self, params: dict[str, Any], n_models: int) -> dict[str, Any]:
        """Every parameter by Python name: defaults filled in, per-model ones as lists of n values, all checked."""
        kw = dict(params)
        for p in self.params:
            value = kw.get(p.py_name, p.default)
            if value is NO_DEFAULT:
                raise ValueError(f"needs parameter {p.name!r}")
            if p.per_model:
                value = list(value) if isinstance(value, (list, tuple)) else [value] * n_models
                if len(value) != n_models:
                    raise ValueError(f"parameter {p.name!r} has {len(value)} values for {n_models} models")
            for v in value if p.per_model else (value,):
                problem = p.problem(v)
                if problem is not None:
                    raise ValueError(f"parameter {p.name!r} {problem}")
            kw[p.py_name] = value
        return kw


def _discover() -> None:
    """Import every method module in this package once (one file per method or per family)."""
    import importlib
    import pkgutil

    from . import __path__ as pkg_path

    for info in pkgutil.iter_modules(pkg_path):
        if not info.name.startswith("_") and info.name != "registry":
            importlib.import_module(f"{__package__}.{info.name}")


METHODS: Registry[MergeMethod] = Registry("merge method", loader=_discover)


def register(method: MergeMethod) -> MergeMethod:
    return METHODS.add(method.name, method, aliases=method.aliases)


def merge_method(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``@merge_method("slerp", params=(...), base="required")``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        register(MergeMethod(name=name, fn=fn, **kwargs))
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    """The method recipes call ``name``; ``UnknownName`` (with a suggestion) if there is none."""
    return METHODS.get(name)


def all_methods() -> list[MergeMethod]:
    return sorted(METHODS.values(), key=lambda m: m.name)


def known_param_names() -> set[str]:
    """Every parameter name some registered method takes."""
    return {p.name for m in METHODS.values() for p in m.params}
