"""The monitor's history: one flat record per snapshot, and its files.

A record maps relative metric keys (see :mod:`lightning_overtrain.keys`) to
numbers (and, for a probe that samples, a list of per-sample values under
:func:`~lightning_overtrain.keys.samples_key`). The history is written whole at every
snapshot as ``history.jsonl`` and ``history.csv`` (numbers only), so a resumed run's
files hold the curves from the start.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

Record = dict[str, float]
SETTINGS_FILE = "monitor.json"  # the run's settings, beside its history
PLOTS_DIR = "plots"  # the figures, under the run's directory (a live run and `report` alike)


def scalars(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record without its list-valued fields (per-sample values): what loggers and
    CSV columns take."""
    return {k: v for k, v in record.items() if not isinstance(v, (list, tuple))}


def columns(records: Sequence[Record]) -> list[str]:
    """Every key that appears in any record, in first-seen order."""
    seen: dict[str, None] = {}
    for record in records:
        seen.update(dict.fromkeys(record))
    return list(seen)


def _json_value(value: Any) -> Any:
    # JSON has no NaN; null reads back as "not measured".
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_history(records: Sequence[Record], directory: str) -> tuple[str, str]:
    """Write ``history.jsonl`` and ``history.csv`` into ``directory`` (created if needed).

    Files are replaced atomically, so a reader never sees half a history.

    Returns:
        The two paths.
    """
    os.makedirs(directory, exist_ok=True)
    jsonl = os.path.join(directory, "history.jsonl")
    csv_path = os.path.join(directory, "history.csv")
    with open(jsonl + ".tmp", "w") as f:
        for record in records:
            f.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
    os.replace(jsonl + ".tmp", jsonl)
    with open(csv_path + ".tmp", "w", newline="") as f:
        rows = [scalars(record) for record in records]  # per-sample lists: JSONL only
        writer = csv.DictWriter(f, fieldnames=columns(rows))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(csv_path + ".tmp", csv_path)
    return jsonl, csv_path


def read_history(path: str) -> list[Record]:
    """Read a ``history.jsonl`` back (``null`` becomes NaN)."""
    with open(path) as f:
        return [
            {k: (float("nan") if v is None else v) for k, v in json.loads(line).items()}
            for line in f
            if line.strip()
        ]
