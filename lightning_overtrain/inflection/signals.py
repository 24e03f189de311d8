"""A declared signal's numbers in a record: its two terms, standard error and samples.

The policy feeds these to each signal's detector; the declarations themselves
(:class:`~lightning_overtrain.keys.Signal`) live with the key grammar.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning_overtrain import keys
from lightning_overtrain.keys import Signal


def decomposed_terms(record: Mapping[str, float], signal: Signal) -> dict[str, float | None]:
    """The declared two terms of ``signal``, for the detector's forecast, when the record has them.

    A perturbed loss is ``reference_loss + delta`` and a post-fine-tune reference loss is
    ``reference_loss + forgetting``: the falling base and the rising sensitivity are
    measured separately, and fitting each on its own forecasts ``T*`` far better than
    fitting their noisy sum (``benchmarks/detector_validation.py``).
    """
    if signal.base is None or signal.sensitivity is None:
        return {}
    base, sensitivity = record.get(signal.base), record.get(signal.sensitivity)
    if not (finite(base) and finite(sensitivity)):
        return {}
    return {
        "base": float(base),
        "sensitivity": float(sensitivity),
        "sensitivity_stderr": stderr_of(record, signal.sensitivity + keys.STDERR_SUFFIX),
    }


def samples_of(record: Mapping[str, Any], signal: Signal) -> list[float] | None:
    """The per-sample values of ``signal`` in the record (see :func:`keys.samples_key`),
    when there are two or more, all finite; else None (the detector's unpaired rule)."""
    values = record.get(keys.samples_key(signal.key))
    if not isinstance(values, (list, tuple)) or len(values) < 2 or not all(map(finite, values)):
        return None
    return [float(v) for v in values]


def stderr_of(record: Mapping[str, float], key: str) -> float | None:
    """``record[key]`` as a standard error: a finite number >= 0, else None."""
    value = record.get(key)
    return float(value) if finite(value) and value >= 0 else None


def finite(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
