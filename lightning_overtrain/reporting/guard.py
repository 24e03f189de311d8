"""Reporters behind a guard: a fault writing the monitor's output never reaches training.

A full disk, a read-only directory or a reporter's own bug while writing history,
settings, plots or alerts becomes one warning that says what was not written and
why; the monitor counts it (``output_failures`` in the record) and training goes on.
Reporters run on rank zero only and make no collectives, so a failure there needs
no agreement between ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lightning.fabric.utilities.rank_zero import rank_zero_warn

from lightning_overtrain.reporting.base import Reporter

#: The record key counting the monitor's failed writes so far.
OUTPUT_FAILURES = "output_failures"


def output_failed(what: str, exc: BaseException, failures: int) -> None:
    """Warn that ``what`` was not written, and why; ``failures`` counts this one."""
    rank_zero_warn(
        f"OvertrainingMonitor: {what} was not written ({type(exc).__name__}: {exc})."
        f" Output failures so far: {failures}. Training goes on; the measurements are kept"
        " in memory and in checkpoints."
    )


def call_reporters(
    reporters: Sequence[Reporter], event: str, call: Callable[[Reporter], None], failures: int
) -> int:
    """Call ``call(reporter)`` for each reporter; a reporter that raises is warned about.

    Args:
        reporters: the monitor's reporters.
        event: the hook, for the message (``"setup"``, ``"report"``, ``"alert"``, ...).
        call: calls the hook on one reporter.
        failures: the failures counted before this call.

    Returns:
        The failures counted after it.

    Example::

        >>> call_reporters([Reporter()], "report", lambda r: r.report(None, None, {}), 0)
        0
    """
    for reporter in reporters:
        try:
            call(reporter)
        except Exception as exc:  # the output's fault, never training's
            failures += 1
            output_failed(f"{type(reporter).__name__}'s {event} output", exc, failures)
    return failures
