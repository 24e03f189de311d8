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
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lightning_overtrain import keys
from lightning_overtrain.safe_io import HISTORY_MAX_BYTES, read_regular, write_atomic

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

    Each file is replaced atomically through an exclusive temporary file (see
    :func:`~lightning_overtrain.safe_io.write_atomic`), so a reader never sees half a
    history and two writers never share a temporary file.

    Returns:
        The two paths.

    Raises:
        OSError: when the directory cannot hold them; the previous files are left whole.
    """
    os.makedirs(directory, exist_ok=True)
    jsonl = os.path.join(directory, "history.jsonl")
    csv_path = os.path.join(directory, "history.csv")

    def write_jsonl(f: Any) -> None:
        for record in records:
            f.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")

    def write_csv(f: Any) -> None:
        rows = [scalars(record) for record in records]  # per-sample lists: JSONL only
        writer = csv.DictWriter(f, fieldnames=columns(rows))
        writer.writeheader()
        writer.writerows(rows)

    write_atomic(jsonl, write_jsonl)
    write_atomic(csv_path, write_csv)
    return jsonl, csv_path


def parse_history(text: str, path: str) -> tuple[list[Record], str | None]:
    """The complete records of a ``history.jsonl``'s text, and what did not load.

    A line that is not a JSON object (a truncated last line, a torn copy) is
    skipped; every other record still loads.

    Args:
        text: the file's content.
        path: the file's name, for the message.

    Returns:
        ``(records, problem)``: ``problem`` is None, or one line naming the file, the
        first bad line and how many records still load.
    """
    records: list[Record] = []
    bad: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            bad.append(number)
            continue
        records.append({k: (float("nan") if v is None else v) for k, v in data.items()})
    if not bad:
        return records, None
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return records, (
        f"{path}: line {bad[0]}{more} is not a complete JSON record (truncated or corrupt);"
        f" skipped, {len(records)} complete record(s) loaded."
    )


def read_history_checked(path: str) -> tuple[list[Record], str | None]:
    """Read a ``history.jsonl`` back, with a note on what did not load (see :func:`parse_history`).

    Raises:
        FileNotFoundError: if there is none.
        UnsafeFile: if it is not a regular file, or larger than ``HISTORY_MAX_BYTES``.
    """
    return parse_history(read_regular(path, HISTORY_MAX_BYTES), path)


def read_history(path: str) -> list[Record]:
    """Read a ``history.jsonl`` back (``null`` becomes NaN).

    Every complete record loads; a truncated or corrupt line is skipped with one
    warning naming the file and the line.

    Raises:
        FileNotFoundError: if there is none.
        UnsafeFile: if it is not a regular file, or larger than ``HISTORY_MAX_BYTES``.
    """
    records, problem = read_history_checked(path)
    if problem is not None:
        warnings.warn(problem, stacklevel=2)
    return records


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
