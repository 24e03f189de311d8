"""The monitor's directory for this run: never one that holds another run's history.

With ``logger=False`` (or loggers that share one directory), two fits with the same
``default_root_dir`` would both write ``<root>/overtrain``, and the second would replace
the first one's ``history.jsonl`` and ``best.ckpt`` without a word. Like Lightning's
loggers (``version_0``, ``version_1``...), a new run instead takes the next free
sibling: ``overtrain``, then ``overtrain_1``, ``overtrain_2``... Siblings, not
``overtrain/version_1``: each run's directory then holds one run only, so
``lightning-overtrain report overtrain`` reads that run, and moving or deleting one run
never takes another with it.

A resumed run keeps its directory. "The same run" is decided from what is on disk
against the monitor's restored state: the directory's first recorded snapshot (tokens,
step, reference loss, as written to ``history.jsonl``) equals the first record of the
history the checkpoint brought back. A resume whose checkpoint holds no snapshot yet
(taken before the first one, or restored after set-up by the strategy) counts as the
same run when the trainer was given a checkpoint to resume from.

Rank zero looks at the disk and decides; the strategy broadcasts its choice, so every
rank writes (and keeps its best snapshot) in the same directory even when the ranks do
not share a file system.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_overtrain import keys

if TYPE_CHECKING:
    import lightning.pytorch as pl

HISTORY_FILE = "history.jsonl"
#: What identifies a run's first snapshot.
_IDENTITY = (keys.TOKENS, keys.STEP, keys.REFERENCE_LOSS)


def first_record(directory: str) -> dict[str, Any] | None:
    """The first record of ``<directory>/history.jsonl``; None when there is none.

    A file that cannot be read or parsed counts as a record of an unknown run (``{}``),
    so it is never overwritten.
    """
    path = os.path.join(directory, HISTORY_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}
    return None


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
    return a is None and b is None  # json writes NaN as null


def same_run(on_disk: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``on_disk`` (a directory's first record) is the first snapshot of ``history``."""
    if not history or not on_disk:
        return False
    first = history[0]
    return all(_same_value(on_disk.get(k), first.get(k)) for k in _IDENTITY if k in first)


def choose_dirpath(base: str, history: Sequence[Mapping[str, Any]], resuming: bool) -> str:
    """``base``, unless it holds another run's history: then the first free ``base_<n>``.

    Args:
        base: the directory asked for (``dirpath=``, or ``<log_dir>/overtrain``).
        history: the monitor's history as restored from a checkpoint (empty for a new run).
        resuming: whether the trainer resumes from a checkpoint (``ckpt_path``).

    Returns:
        The directory this run writes to. A directory is free when it holds no
        ``history.jsonl``.

    Example::

        choose_dirpath("lightning_logs/overtrain", history=[], resuming=False)
        # -> "lightning_logs/overtrain_1" when "overtrain" holds an earlier run's history
    """
    base = os.path.normpath(base)
    on_disk = first_record(base)
    if on_disk is None or same_run(on_disk, history) or (resuming and not history):
        return base
    n = 1
    while first_record(f"{base}_{n}") is not None:
        n += 1
    return f"{base}_{n}"


def run_dirpath(trainer: pl.Trainer, base: str, history: Sequence[Mapping[str, Any]]) -> str:
    """:func:`choose_dirpath` on rank zero, broadcast so every rank agrees; says so when
    it is not ``base``. A collective: every rank calls it, at the same hook."""
    from lightning.pytorch.utilities import rank_zero_info

    chosen = None
    if trainer.is_global_zero:
        chosen = choose_dirpath(base, history, resuming=trainer.ckpt_path is not None)
    chosen = trainer.strategy.broadcast(chosen, src=0)
    if chosen != os.path.normpath(base):
        rank_zero_info(
            f"OvertrainingMonitor: {base} holds the history of another run, which is kept;"
            f" this run writes to {chosen}. Pass `dirpath=` to choose the directory."
        )
    return chosen
