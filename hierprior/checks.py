"""Argument checks shared by the whole package: one home, one wording of the errors.

Each check returns the value (converted where it says so) or raises a one-line
``ValueError`` / ``TypeError`` that names the argument, the rule and the value given, so bad
input fails early and clearly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["check_int", "check_float", "check_optional_int", "check_choice"]


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """An integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(
    value: object, name: str, minimum: float = 0.0, strict: bool = False, maximum=None
) -> float:
    """A finite number >= ``minimum`` (> with ``strict``) and <= ``maximum``, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    low_bad = value <= minimum if strict else value < minimum
    if not math.isfinite(value) or low_bad or (maximum is not None and value > maximum):
        rng = f"{'>' if strict else '>='} {minimum}" + (
            f" and <= {maximum}" if maximum is not None else ""
        )
        raise ValueError(f"{name} must be finite and {rng}, got {value!r}")
    return value


def check_optional_int(value: object, name: str, minimum: int = 1) -> int | None:
    """None (a default resolved later), or an integer >= minimum."""
    return None if value is None else check_int(value, name, minimum)


def check_choice(value: object, name: str, choices: Iterable[str]) -> str:
    """One of ``choices`` (strings)."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")
    return value
