"""Keeping the best snapshot: the weights that were measured, with their tokens and settings."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl

from lightning_overtrain.core.keeping import BEST_COOLED_FILE, BEST_FILE  # noqa: F401
from lightning_overtrain.engine.backup import ModelBackup, presented


def save_best(
    trainer: pl.Trainer,
    path: str,
    backup: ModelBackup,
    cooled: bool,
    state_key: str,
    state: dict[str, Any],
) -> None:
    """Write the snapshot just measured to ``path``: weights only, plus the monitor's state.

    Without a cooldown the measured weights are the live ones. With one, the probes
    measured the cooled branch, whose weights are still in the backup (the probes
    borrowed them last). No optimizer state; the monitor's state (its ``tokens``,
    what ``lightning-overtrain probe`` reads, and its settings under ``"config"``)
    goes under its state key as in a full checkpoint. Every rank calls it (building
    the checkpoint is a collective under sharded strategies); rank 0 writes.

    Lightning has no public call for a weights-only checkpoint that keeps a
    callback's state (``save_checkpoint(weights_only=True)`` drops it), hence the
    checkpoint connector.
    """
    with presented(trainer.lightning_module, backup) if cooled else nullcontext():
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=True)
    checkpoint["callbacks"] = {state_key: {**state, "weights": "cooled" if cooled else "live"}}
    error: Exception | None = None
    try:
        trainer.strategy.save_checkpoint(checkpoint, path)
    except Exception as exc:  # e.g. a full disk on rank 0, which alone writes
        error = exc
    # Every rank reaches this one agreement (never a barrier a failed rank skips), and
    # all fail alike, so the monitor skips this best snapshot on every rank.
    if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
        raise error or RuntimeError(f"another rank could not write the best snapshot {path}")
