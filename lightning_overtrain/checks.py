"""Argument checks shared by every public constructor: one wording for one mistake."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def check_int(name: str, value: Any, minimum: int, fix: str) -> int:
    """Return ``value`` if it is an int (not a bool) of at least ``minimum``.

    Raises:
        ValueError: ``"`name` must be an int >= minimum, got value. fix"``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}. {fix}")
    return value


def check_positive_numbers(
    name: str, values: float | Sequence[float], requirement: str, fix: str
) -> tuple[float, ...]:
    """One number or a sequence of distinct finite numbers > 0, as a tuple of floats.

    Raises:
        ValueError: ``"`name` must be <requirement>, got values. fix"``, or on duplicates.
    """
    if isinstance(values, (int, float)):
        values = (values,)
    values = tuple(values)
    if not values or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
        for v in values
    ):
        raise ValueError(f"`{name}` must be {requirement}, got {values!r}. {fix}")
    if len(set(values)) != len(values):
        raise ValueError(f"`{name}` has duplicates: {values!r}. List each value once.")
    return tuple(float(v) for v in values)
