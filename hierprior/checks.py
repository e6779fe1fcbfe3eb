"""Argument checks shared by the whole package: one home, one wording of the errors.

Each check returns the value (converted where it says so) or raises a one-line
``ValueError`` / ``TypeError`` that names the argument, the rule and the value given, so bad
input fails early and clearly. The wording:

- integers: ``"<name> must be an integer >= 1, got 0"`` (or ``"in [1, 4]"``); any integer
  type but bool (numpy integers too), returned as a Python int;
- numbers: ``"<name> must be a finite number >= 0, got -1.0"``, ``"... > 0 ..."``,
  ``"<name> must be a number in [0, 1], got 1.5"`` (``(0, 1)``, ``[0, 1)``: open ends are
  strict); a non-number is a ``TypeError`` ``"<name> must be a number, got str"``;
- choices: ``"unknown <name> 'x'; expected one of ['a', 'b']"``;
- shapes: ``"<name> must be a tuple of positive integers, got (2, 0)"``;
- tensors: ``"<name> must be a floating-point tensor, got list"``, ``"<name> holds NaN or
  Inf"``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only by check_tensor: config checks stay light
    from torch import Tensor

__all__ = [
    "check_int",
    "check_float",
    "check_positive",
    "check_optional_int",
    "check_choice",
    "check_shape",
    "check_tensor",
]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(
    value: object, name: str, minimum: int | None = 1, maximum: int | None = None
) -> int:
    """An integer (not a bool) >= ``minimum`` and <= ``maximum`` (None: unbounded), as an int."""
    low_bad = minimum is not None and _is_int(value) and value < minimum
    high_bad = maximum is not None and _is_int(value) and value > maximum
    if not _is_int(value) or low_bad or high_bad:
        if minimum is not None and maximum is not None:
            rule = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            rule = f"an integer >= {minimum}"
        elif maximum is not None:
            rule = f"an integer <= {maximum}"
        else:
            rule = "an integer"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return int(value)


def check_float(
    value: object,
    name: str,
    minimum: float | None = 0.0,
    strict: bool = False,
    maximum: float | None = None,
    strict_maximum: bool = False,
) -> float:
    """A finite number >= ``minimum`` (> with ``strict``) and <= ``maximum`` (< with
    ``strict_maximum``), as a float; None bounds are open."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    bad = not math.isfinite(value)
    if minimum is not None:
        bad = bad or (value <= minimum if strict else value < minimum)
    if maximum is not None:
        bad = bad or (value >= maximum if strict_maximum else value > maximum)
    if bad:
        rule = _interval(minimum, strict, maximum, strict_maximum)
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def _interval(low, strict, high, strict_high) -> str:
    """The rule of :func:`check_float` in words, ending before ", got ..."."""
    if low is not None and high is not None:
        return (
            f"a number in {'(' if strict else '['}{low:g}, {high:g}{')' if strict_high else ']'}"
        )
    if low is not None:
        return f"a finite number {'>' if strict else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if strict_high else '<='} {high:g}"
    return "a finite number"


def check_positive(value: object, name: str) -> float:
    """A finite number > 0, as a float."""
    return check_float(value, name, 0.0, strict=True)


def check_optional_int(value: object, name: str, minimum: int = 1) -> int | None:
    """None (a default resolved later), or an integer >= minimum."""
    return None if value is None else check_int(value, name, minimum)


def check_choice(value: object, name: str, choices: Iterable[str]) -> str:
    """One of ``choices`` (strings)."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")
    return value


def check_shape(value: object, name: str) -> tuple[int, ...]:
    """A non-empty sequence of positive integers (an int is one dim), as a tuple of ints."""
    shape = (value,) if _is_int(value) else value
    if (
        not isinstance(shape, Sequence)
        or isinstance(shape, str)
        or not shape
        or not all(_is_int(v) and v >= 1 for v in shape)
    ):
        raise ValueError(f"{name} must be a tuple of positive integers, got {value!r}")
    return tuple(int(v) for v in shape)


def check_tensor(
    value: object, name: str, *, floating: bool = False, finite: bool = False
) -> Tensor:
    """A tensor (``floating``: of a floating-point dtype; ``finite``: without NaN or Inf)."""
    import torch

    kind = "a floating-point tensor" if floating else "a tensor"
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be {kind}, got dtype {value.dtype}")
    if finite and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} holds NaN or Inf")
    return value
