"""Argument checks shared by every public constructor: one wording for one mistake."""

from __future__ import annotations

from typing import Any


def check_int(name: str, value: Any, minimum: int, fix: str) -> int:
    """Return ``value`` if it is an int (not a bool) of at least ``minimum``.

    Raises:
        ValueError: ``"`name` must be an int >= minimum, got value. fix"``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}. {fix}")
    return value
