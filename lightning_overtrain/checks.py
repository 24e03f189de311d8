"""Argument checks shared by every public constructor: one wording for one mistake.

Every message names the argument, quotes the value received and ends with the fix:
``"`name` must be <what>, got <value>. <fix>"``. Counts have an upper bound as well
as a lower one, so a plausible typo (``points_per_decade=1e30``) is refused before
training instead of running forever.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Sequence
from typing import Any

#: The largest count any argument accepts by default: far beyond any run, small enough
#: that a loop bounded by it still ends.
MAX_COUNT = 10**18


def _refuse(name: str, requirement: str, value: Any, fix: str) -> ValueError:
    shown = repr(value)
    if len(shown) > 200:  # a huge value is quoted by its start
        shown = shown[:200] + "..."
    return ValueError(f"`{name}` must be {requirement}, got {shown}. {fix}".rstrip())


def check_int(
    name: str,
    value: Any,
    minimum: int,
    fix: str,
    maximum: int | None = MAX_COUNT,
    integral_floats: bool = True,
) -> int:
    """Return ``value`` as an int if it is a whole number (not a bool) in ``[minimum, maximum]``.

    An integral float such as ``1e6`` is accepted and returned as ``1_000_000``: token
    counts are naturally written that way. ``1.5``, ``nan`` and ``inf`` are refused.

    Args:
        name: the argument's name, for the message.
        value: what the user passed.
        minimum: the smallest value allowed.
        fix: what to pass instead, appended to the message.
        maximum: the largest value allowed (None: no bound).
        integral_floats: accept ``1e6`` for ``1_000_000`` (counts of tokens); False
            for settings that are never written as floats (``pairs``, ``seed``).

    Returns:
        The value as a Python int.

    Raises:
        ValueError: ``"`name` must be an int >= minimum, got value. fix"``.

    Example::

        >>> check_int("start_tokens", 1e6, 1, "Pass e.g. start_tokens=1_000_000.")
        1000000
    """
    whole = isinstance(value, numbers.Integral) or (
        integral_floats
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and float(value).is_integer()
    )
    if isinstance(value, bool) or not whole or value < minimum:
        raise _refuse(name, f"an int >= {minimum}", value, fix)
    if maximum is not None and value > maximum:
        raise _refuse(name, f"an int from {minimum} to {maximum:,}", value, fix)
    return int(value)


def check_optional_int(
    name: str, value: Any, minimum: int, fix: str, integral_floats: bool = True
) -> int | None:
    """:func:`check_int`, with None passing through as None (and said in the message)."""
    if value is None:
        return None
    try:
        return check_int(name, value, minimum, fix, integral_floats=integral_floats)
    except ValueError:
        raise _refuse(name, f"an int >= {minimum} or None", value, fix) from None


def check_number(
    name: str,
    value: Any,
    fix: str,
    minimum: float = -math.inf,
    maximum: float = math.inf,
    above_minimum: bool = False,
) -> float:
    """Return ``value`` as a float if it is a finite real number (not a bool) in range.

    Args:
        name: the argument's name.
        value: what the user passed.
        fix: what to pass instead.
        minimum: the smallest value allowed ...
        maximum: ... and the largest.
        above_minimum: the minimum itself is not allowed (``> minimum``).

    Raises:
        ValueError: naming the argument, the value and the fix.

    Example::

        >>> check_number("min_interval_s", 2, "Pass e.g. 1.0.", minimum=0)
        2.0
    """
    lower = f"> {minimum:g}" if above_minimum else f">= {minimum:g}"
    what = "a finite number" + ("" if math.isinf(minimum) else f" {lower}")
    what += "" if math.isinf(maximum) else f" and <= {maximum:g}"
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < minimum
        or (above_minimum and value == minimum)
        or value > maximum
    ):
        raise _refuse(name, what, value, fix)
    return float(value)


def check_choice(
    name: str, value: Any, choices: Collection[Any], fix: str = "", requirement: str = ""
) -> Any:
    """Return ``value`` if it is one of ``choices``.

    Args:
        requirement: the choices in words (default ``one of (...)``).

    Raises:
        ValueError: ``"`name` must be one of (...), got value. fix"``.
    """
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise _refuse(name, requirement or f"one of {tuple(choices)!r}", value, fix)
    return value


def check_callable(name: str, value: Any, fix: str = "") -> Any:
    """Return ``value`` if it is callable or None.

    Raises:
        ValueError: naming the argument and the value.
    """
    if value is not None and not callable(value):
        raise _refuse(name, "callable or None", value, fix)
    return value


def check_instance(
    name: str, value: Any, kind: type | tuple[type, ...], what: str, fix: str
) -> Any:
    """Return ``value`` if it is an instance of ``kind`` (``what`` says it in words).

    Raises:
        ValueError: naming the argument, the value and the fix.
    """
    if not isinstance(value, kind):
        raise _refuse(name, what, value, fix)
    return value


def check_name(name: str, value: Any, fix: str, forbidden: str = "/") -> str:
    """Return ``value`` if it is a non-empty string without spaces or ``forbidden`` characters.

    Raises:
        ValueError: naming the argument and the value.
    """
    if not isinstance(value, str) or not value or any(c.isspace() or c in forbidden for c in value):
        without = " or ".join([*(repr(c) for c in forbidden), "spaces"])
        raise _refuse(name, f"a non-empty string without {without}", value, fix)
    return value


def check_positive_numbers(
    name: str, values: float | Sequence[float], requirement: str, fix: str
) -> tuple[float, ...]:
    """One number or a sequence of distinct finite numbers > 0, as a tuple of floats.

    A string or bytes is refused as a whole (never read character by character:
    ``b"x"`` is not the number 120, ``"0.5"`` is not ``("0", ".", "5")``).

    Raises:
        ValueError: ``"`name` must be <requirement>, got values. fix"``, or on duplicates.

    Example::

        >>> check_positive_numbers("gammas", 0.5, "numbers > 0", "Pass e.g. gammas=(0.5,).")
        (0.5,)
    """
    if isinstance(values, (str, bytes, bytearray)):
        raise _refuse(
            name,
            f"{requirement} (numbers, not a {type(values).__name__})",
            values,
            fix,
        )
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        values = (values,)
    try:
        values = tuple(values)  # type: ignore[arg-type]
    except TypeError:
        raise _refuse(name, requirement, values, fix) from None
    if not values or any(
        isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0
        for v in values
    ):
        raise _refuse(name, requirement, values, fix)
    if len(set(values)) != len(values):
        raise ValueError(f"`{name}` has duplicates: {values!r}. List each value once.")
    return tuple(float(v) for v in values)
