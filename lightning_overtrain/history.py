"""The monitor's history: one flat record per snapshot, and its files.

A record maps relative metric keys (see :mod:`lightning_overtrain.keys`) to
numbers. The history is written whole at every snapshot as ``history.jsonl`` and
``history.csv``, so a resumed run's files hold the curves from the start.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from lightning_overtrain import keys

Record = dict[str, float]
SETTINGS_FILE = "monitor.json"  # the run's settings, beside its history
PLOTS_DIR = "plots"  # the figures, under the run's directory (a live run and `report` alike)


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
        writer = csv.DictWriter(f, fieldnames=columns(records))
        writer.writeheader()
        writer.writerows(records)
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


def infer_signals(record_keys: Iterable[str]) -> list[keys.Signal]:
    """The built-in declarations of the keys in ``record_keys``, from the grammar alone.

    For a history written without declarations (an older run, a bare record): the
    reference loss, the noise probe's keys and any ``<probe>/lr=<lr>/<quantity>``
    fine-tune keys, whatever the probe's name. Other keys get no declaration.
    """
    names = list(dict.fromkeys(record_keys))
    gammas: list[float] = []
    layers: dict[float, list[str]] = {}
    finetunes: dict[str, list[float]] = {}
    for key in names:
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "noise" and parts[1].startswith("gamma="):
            if parts[2] in keys.NOISE_QUANTITIES:
                gammas.append(float(parts[1][len("gamma=") :]))
        elif (layer := keys.parse_layer_noise_key(key)) is not None and layer[2] == "delta":
            layers.setdefault(layer[0], []).append(layer[1])
        elif (ft := keys.parse_finetune_key(key)) is not None and ft[2] in keys.FINETUNE_QUANTITIES:
            finetunes.setdefault(ft[0], []).append(ft[1])
    declared = [keys.reference_signal(), *keys.noise_signals(gammas, layers)]
    for probe, lrs in finetunes.items():
        declared += keys.finetune_signals(lrs, probe)
    present = set(names)
    return [s for s in declared if s.key in present]


def merge_signals(declared: Iterable[keys.Signal], record_keys: Iterable[str]) -> list[keys.Signal]:
    """``declared``, then the inferred declarations of the other keys in ``record_keys``."""
    out = list(declared)
    known = {s.key for s in out}
    return out + [s for s in infer_signals(record_keys) if s.key not in known]
