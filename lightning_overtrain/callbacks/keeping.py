"""Keeping the best snapshot: the weights that were measured, with their tokens and settings.

The snapshot is written under a temporary name in its own directory and renamed
into place only once complete, so a good ``best.ckpt`` is never destroyed by a
failed write (a full disk) and ``best_path`` names only a complete checkpoint. This
holds for a single file and for the distributed-checkpoint *directory* that
Lightning's ``ModelParallelStrategy`` writes.
"""

from __future__ import annotations

import os
import secrets
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl

from lightning_overtrain.core.keeping import remove_path, replace_path
from lightning_overtrain.engine.backup import ModelBackup, presented


def save_best(
    trainer: pl.Trainer,
    path: str,
    backup: ModelBackup,
    cooled: bool,
    state_key: str,
    state: dict[str, Any],
) -> Exception | None:
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

    Returns:
        None once ``path`` holds the new snapshot; else the error, the same verdict on
        every rank (``path`` then still holds the previous snapshot, whole, or nothing).
    """
    with presented(trainer.lightning_module, backup) if cooled else nullcontext():
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=True)
    checkpoint["callbacks"] = {state_key: {**state, "weights": "cooled" if cooled else "live"}}
    # One random temporary name, rank 0's, in the target's directory (a rename stays
    # within one file system; nobody can plant a link at a name it cannot guess).
    token = trainer.strategy.broadcast(secrets.token_hex(8), src=0)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{token}.tmp")
    error: Exception | None = None
    try:
        trainer.strategy.save_checkpoint(checkpoint, tmp)
        if trainer.is_global_zero:
            replace_path(tmp, path)
    except Exception as exc:  # e.g. a full disk on rank 0, which alone writes
        error = exc
        if trainer.is_global_zero:
            remove_path(tmp)
    # Every rank reaches this one agreement (never a barrier a failed rank skips), and
    # all fail alike, so the monitor treats this best snapshot alike on every rank.
    if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
        return error or OSError(f"another rank could not write the best snapshot {path}")
    return None
