"""Distributed checkpoints (torch DCP) on disk: which engine wrote one, and whether it is complete.

A DCP checkpoint is a directory of ``*.distcp`` shards and a ``.metadata`` index
that ``torch.distributed.checkpoint`` writes last. The engines put it in their own
layouts (see ``docs/cli.md``):

============  =======================================  ==================================
layout        what is on disk                          complete when
============  =======================================  ==================================
lightning     ``NAME.ckpt/``: ``.metadata``, shards,    ``.metadata`` and ``meta.pt``
              ``meta.pt`` (the rest of the checkpoint)  (Lightning writes ``meta.pt`` last)
torchtitan    ``step-N/``: ``.metadata``, shards        ``.metadata``
olmo-core     ``stepN/model_and_optim/`` (DCP),         ``model_and_optim/.metadata`` and
              ``stepN/train/rank0.pt``, ``.metadata.json``  ``stepN/.metadata.json``
dcp           any other directory with ``.metadata``    ``.metadata``
============  =======================================  ==================================

Nothing here reads a tensor: only names, ``meta.pt`` (Lightning's small metadata
file) and OLMo-core's trainer state (its step and tokens seen).
"""

from __future__ import annotations

import os
import re

DCP_INDEX = ".metadata"
LIGHTNING_META = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME
OLMO_DCP_DIR = "model_and_optim"
OLMO_MARKER = ".metadata.json"
_TORCHTITAN_NAME = re.compile(r"^step-(\d+)$")
_OLMO_NAME = re.compile(r"^step(\d+)$")
_ANY_STEP = re.compile(r"step[-_=]?(\d+)", re.IGNORECASE)

#: The key prefix of the model's tensors in each layout, tried in order.
MODEL_PREFIXES = {
    "lightning": ("state_dict.", "model."),  # ModelParallelStrategy, FSDPStrategy(sharded)
    "olmo-core": ("model.",),
    "torchtitan": ("",),  # torchtitan flattens the model's state dict to the top level
    "dcp": ("", "model.", "state_dict.", "module."),
}


def dcp_layout(path: str) -> tuple[str, str] | None:
    """``(layout, dcp_dir)`` for a directory that is (or is becoming) a DCP checkpoint.

    ``dcp_dir`` is the directory holding ``.metadata`` and the shards. A directory
    with shards but no ``.metadata`` yet counts only where its name says it is a
    checkpoint (``*.ckpt``, as Lightning names them; ``stepN/model_and_optim``):
    other engines' half-written directories are not seen until they are complete.

    Example::

        dcp_layout("checkpoints/step10.ckpt")  # ("lightning", "checkpoints/step10.ckpt")
    """
    if not os.path.isdir(path):
        return None
    olmo = os.path.join(path, OLMO_DCP_DIR)
    if os.path.isdir(olmo):
        return "olmo-core", olmo
    has_index = _is_file(os.path.join(path, DCP_INDEX))
    name = os.path.basename(os.path.normpath(path))
    if name.endswith(".ckpt") or _is_file(os.path.join(path, LIGHTNING_META)):
        shards = has_index or any(n.endswith(".distcp") for n in _names(path))
        return ("lightning", path) if shards else None
    if not has_index:
        return None
    return ("torchtitan" if _TORCHTITAN_NAME.match(name) else "dcp"), path


def incomplete_reason(path: str, layout: str, dcp_dir: str) -> str | None:
    """Why the checkpoint at ``path`` is not completely written yet, or None if it is."""
    if not _is_file(os.path.join(dcp_dir, DCP_INDEX)):
        return f"incomplete: no {DCP_INDEX} in {dcp_dir} yet (torch writes it last)"
    if layout == "lightning" and not _is_file(os.path.join(path, LIGHTNING_META)):
        return f"incomplete: no {LIGHTNING_META} yet (Lightning writes it after the shards)"
    if layout == "olmo-core" and not _is_file(os.path.join(path, OLMO_MARKER)):
        return f"incomplete: no {OLMO_MARKER} yet (OLMo-core writes it when the step is saved)"
    return None


def step_from_name(path: str, layout: str) -> int | None:
    """The step in the directory's name (``step-N``, ``stepN``), or None."""
    name = os.path.basename(os.path.normpath(path))
    pattern = {"torchtitan": _TORCHTITAN_NAME, "olmo-core": _OLMO_NAME}.get(layout)
    match = pattern.match(name) if pattern is not None else _ANY_STEP.search(name)
    return int(match.group(1)) if match else None


def olmo_trainer_state(path: str) -> tuple[int | None, int | None]:
    """``(global_step, global_train_tokens_seen)`` from OLMo-core's ``train/rank0.pt``.

    Read with a safe ``torch.load`` (no weights in it); ``(None, None)`` when it is
    missing or holds something else.
    """
    import torch

    state_path = os.path.join(path, "train", "rank0.pt")
    if not _is_file(state_path):
        return None, None
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception:  # an unreadable trainer state only costs the tokens it would give
        return None, None
    if not isinstance(state, dict):
        return None, None
    step, seen = state.get("global_step"), state.get("global_train_tokens_seen")
    return (
        int(step) if isinstance(step, int) else None,
        int(seen) if isinstance(seen, int) and seen > 0 else None,
    )


def _is_file(path: str) -> bool:
    """A regular file, not a link to one elsewhere and never a FIFO or a device."""
    import stat

    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _names(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
