"""The settings of a ``probe --out`` directory: written first, compared on every re-run.

A re-run into the same ``--out`` adds to the history that is there, so it must
measure exactly as the first run did: the same probes, the same reference set
(by content, not only by size), the same downstream data, loss, precision and
init std. The settings are written before the first checkpoint is probed, so an
interrupted first run is protected too.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lightning_overtrain.cli.series import SeriesError
from lightning_overtrain.history import SETTINGS_FILE, Record, read_history

# A setting a re-run must share, and the options that change it (for the message).
COMPARED = {
    "probes": "the probes (--gammas, --pairs, --seed, --finetune-lrs, --finetune-steps,"
    " --downstream-text, --probes-fn)",
    "reference_tokens": "the reference set's size (--reference-batches, --batch-size,"
    " --context, --reference-text/--reference-fn)",
    "reference_fingerprint": "the reference set's content (--reference-text/--reference-fn,"
    " --tokenizer)",
    "downstream_fingerprint": "the downstream data (--downstream-text)",
    "loss_fn": "the loss (--loss-fn)",
    "precision": "--precision",
    "init_std": "--init-std",
}


def settings_path(out: str) -> str:
    """Where a run's settings are written: ``<out>/monitor.json``."""
    return os.path.join(out, SETTINGS_FILE)


def check_settings(out: str, settings: dict[str, Any]) -> None:
    """Refuse to add to ``out`` if its saved settings differ from ``settings``.

    Only the settings in :data:`COMPARED` that both sides record are compared (an
    older ``monitor.json`` without a fingerprint is not refused for lacking it).

    Raises:
        SeriesError: naming every differing setting, the old and the new value.
    """
    path = settings_path(out)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        before = json.load(f)
    now = json.loads(json.dumps(settings, default=str))  # tuples as lists, as on disk
    differences = [
        f"{COMPARED[key]}: {where} was {old!r}, now {new!r}"
        for key in COMPARED
        if key in before and key in now
        for where, old, new in _differences(key, before[key], now[key])
    ]
    if not differences:
        return
    results = os.path.isfile(os.path.join(out, "history.jsonl"))
    fix = (
        "Pass a new --out, or the same settings to resume."
        if results
        else f"It holds no results yet: delete {path} to start over with the new settings,"
        " or pass a new --out."
    )
    raise SeriesError(
        f"--out {out!r} holds a run probed with other settings, and mixing them would break"
        f" the curves. What differs: {'; '.join(differences)}. {fix}"
    )


def _differences(where: str, old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """The deepest keys at which two JSON values differ, as ``(dotted key, old, new)``."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [*old, *(k for k in new if k not in old)]
        return [d for k in keys for d in _differences(f"{where}.{k}", old.get(k), new.get(k))]
    return [] if old == new else [(where, old, new)]


def resume_history(out: str, settings: dict[str, Any]) -> list[Record]:
    """The history already in ``out`` (empty if none), once its settings are checked.

    Raises:
        SeriesError: if ``out`` was probed with other settings (see :func:`check_settings`).
    """
    check_settings(out, settings)
    path = os.path.join(out, "history.jsonl")
    return read_history(path) if os.path.isfile(path) else []


def write_settings(out: str, settings: dict[str, Any]) -> str:
    """Write ``settings`` to ``<out>/monitor.json`` (atomically); returns the path."""
    os.makedirs(out, exist_ok=True)
    path = settings_path(out)
    with open(path + ".tmp", "w") as f:
        json.dump(settings, f, indent=2, default=str)
    os.replace(path + ".tmp", path)
    return path
