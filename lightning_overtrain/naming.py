"""The metric naming scheme: one place, so logs, files and plots agree.

Every record key is relative (``noise/gamma=0.5/delta``); loggers see it under the
monitor's prefix (``overtrain/noise/gamma=0.5/delta``), and every logged row carries
``overtrain/tokens`` so any logger can plot against tokens.
"""

from __future__ import annotations

TOKENS = "tokens"
STEP = "step"
REFERENCE_LOSS = "reference_loss"
PROBE_FAILURES = "probe_failures"
PROBE_SECONDS = "probe_seconds"


def noise_key(gamma: float, quantity: str) -> str:
    """``noise/gamma=<gamma>/<quantity>``, e.g. ``noise/gamma=0.5/delta``."""
    return f"noise/gamma={gamma:g}/{quantity}"


def prefixed(prefix: str, record: dict[str, float]) -> dict[str, float]:
    """The record as loggers see it: every key under ``<prefix>/``."""
    return {f"{prefix}/{key}": value for key, value in record.items()}
