"""Keeping the best snapshot: which file, and writing it where no framework does it for us."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from lightning_overtrain.engine.backup import ModelBackup, presented
from lightning_overtrain.engine.collectives import Collectives
from lightning_overtrain.engine.sharding import full_tensor
from lightning_overtrain.reporting.guard import output_failed

BEST_FILE = "best.ckpt"
#: With a cooldown the probes measure the cooled branch: the kept snapshot holds its weights.
BEST_COOLED_FILE = "best-cooled.ckpt"


def default_state_key(prefix: str) -> str:
    """The key the monitor's state goes under in a checkpoint (Lightning's for the callback)."""
    return f"OvertrainingMonitor{ {'prefix': prefix}!r}"


def save_weights(
    module: nn.Module,
    collectives: Collectives,
    path: str,
    backup: ModelBackup,
    cooled: bool,
    state_key: str,
    state: dict[str, Any],
) -> Exception | None:
    """Write the snapshot just measured to ``path`` as ``{"state_dict", "callbacks"}``.

    The layout of a Lightning checkpoint without the optimizer, so
    ``lightning-overtrain probe`` and ``torch.load`` read it alike: the weights
    the probes measured (the cooled branch's when ``cooled``) and the monitor's
    state under ``state_key``. Rank 0 writes; every rank calls it and agrees on
    failure, so a full disk on rank 0 is skipped on every rank alike.

    Written under a temporary name in the target's directory and renamed into place
    once complete, so a failed write never destroys the previous best snapshot.

    Under FSDP2 (``DTensor`` parameters) the whole tensors are gathered, one at a
    time, so the file holds the full weights, not rank 0's shards.

    Returns:
        None once ``path`` holds the new snapshot; else the error, on every rank alike.
    """
    with presented(module, backup) if cooled else nullcontext():
        weights = gathered_weights(module, collectives.is_global_zero)
    checkpoint = {
        "state_dict": weights,
        "callbacks": {state_key: {**state, "weights": "cooled" if cooled else "live"}},
    }
    error: Exception | None = None
    if collectives.is_global_zero:
        tmp = os.path.join(
            os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp"
        )
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            torch.save(checkpoint, tmp)
            replace_path(tmp, path)
        except Exception as exc:  # e.g. a full disk on rank 0, which alone writes
            error = exc
            remove_path(tmp)
    if collectives.any_rank(error is not None):
        return error or OSError(f"another rank could not write the best snapshot {path}")
    return None


def gathered_weights(module: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """``module``'s state dict as whole CPU tensors (empty where ``keep`` is false).

    Every rank calls it: gathering a ``DTensor`` (FSDP2) is a collective, done one
    tensor at a time in the state dict's order (the same on every rank), so the
    device holds one whole tensor at a time and only the rank that keeps them
    (``keep``, rank 0) holds the whole model in host memory.

    Example::

        weights = gathered_weights(model, keep=collectives.is_global_zero)
    """
    weights = {}
    for name, value in module.state_dict().items():
        whole = full_tensor(value).detach()
        if keep:
            weights[name] = whole.cpu()
    return weights


def best_not_written(
    best: dict[str, Any] | None, path: str, error: BaseException, failures: int
) -> int:
    """Say that the best snapshot was judged but not written; name no file for it.

    The detector and the policy keep the snapshot (a full disk is not a judgement):
    only ``best["path"]`` is cleared, so ``best_path`` never names a file that holds
    other weights (the previous best, left whole at ``path``) or none.

    Returns:
        ``failures`` plus this one.
    """
    if best is not None:
        best["path"] = None
    failures += 1
    output_failed(f"the best snapshot {path}", error, failures)
    return failures


def replace_path(new: str, path: str) -> None:
    """Move the complete file or directory ``new`` to ``path``, replacing what is there.

    A file replaces a file in one atomic rename. A directory cannot be renamed onto
    a non-empty one, so the old one is first moved aside, then deleted: in between,
    ``path`` briefly names nothing (never a partial checkpoint).

    Raises:
        OSError: if a rename fails; ``path`` then holds what it held before.
    """
    if not (os.path.isdir(new) or os.path.isdir(path)) or not os.path.lexists(path):
        os.replace(new, path)
        return
    aside = f"{path}.{secrets.token_hex(4)}.old"
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except OSError:
        os.replace(aside, path)  # put the previous snapshot back
        raise
    remove_path(aside)


def remove_path(path: str) -> None:
    """Remove a file or directory if it is there; never raises."""
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
