"""Argument checks shared by every public constructor: each error names the argument.

One family for the whole package (policies, detectors, remedies, the guard, sinks).
"""
from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_positive", "check_open_unit", "check_choice"]


def check_int(name: str, value, minimum: int = 1) -> int:
    """An int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_positive(name: str, value, *, allow_zero: bool = False, allow_inf: bool = False) -> float:
    """A real number > 0 (>= 0 with ``allow_zero``), finite unless ``allow_inf``.

    A one-element tensor is accepted (read once, at configuration time).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        numel = getattr(value, "numel", None)
        if callable(numel) and numel() == 1 and hasattr(value, "is_floating_point"):
            value = float(value)  # host sync: configuration time, not per step
        else:
            raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    value = float(value)
    low_ok = value >= 0 if allow_zero else value > 0
    if math.isnan(value) or not low_ok or (math.isinf(value) and not allow_inf):
        rng = (">= 0" if allow_zero else "> 0") + (" or inf" if allow_inf else " (finite)")
        raise ValueError(f"{name} must be a number {rng}, got {value!r}")
    return value


def check_open_unit(name: str, value) -> float:
    """A number strictly inside (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in (0, 1), got {type(value).__name__}")
    value = float(value)
    if not 0.0 < value < 1.0:  # NaN fails too
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return value


def check_choice(name: str, value, choices) -> str:
    """One of ``choices`` (compared with ==)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
