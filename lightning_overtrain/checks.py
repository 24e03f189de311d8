"""Argument checks shared by every public constructor: one wording for one mistake."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any


def check_int(name: str, value: Any, minimum: int, fix: str) -> int:
    """Return ``value`` as an int if it is a whole number (not a bool) of at least ``minimum``.

    An integral float such as ``1e6`` is accepted and returned as ``1_000_000``: token
    counts are naturally written that way. ``1.5``, ``nan`` and ``inf`` are refused.

    Args:
        name: the argument's name, for the message.
        value: what the user passed.
        minimum: the smallest value allowed.
        fix: what to pass instead, appended to the message.

    Returns:
        The value as a Python int.

    Raises:
        ValueError: ``"`name` must be an int >= minimum, got value. fix"``.

    Example::

        >>> check_int("start_tokens", 1e6, 1, "Pass e.g. start_tokens=1_000_000.")
        1000000
    """
    whole = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()
    )
    if isinstance(value, bool) or not whole or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}. {fix}")
    return int(value)


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
