"""A series of checkpoints on disk: find them, order them by tokens, load them.

Three formats: Lightning ``.ckpt`` files (loaded with the user's LightningModule
class), transformers ``save_pretrained`` directories (loaded with an auto class)
and torch distributed checkpoints (DCP directories of Lightning, torchtitan,
OLMo-core or any loop; their model's tensors are read into the user's class, see
:mod:`lightning_overtrain.cli.layouts` and :mod:`lightning_overtrain.cli.dcp`).
Tokens, the x-axis of every curve, come from the rules in
:mod:`lightning_overtrain.cli.token_rules`.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lightning_overtrain.cli.layouts import (
    LIGHTNING_META,
    dcp_layout,
    incomplete_reason,
    olmo_trainer_state,
    step_from_name,
)

Kind = Literal["lightning", "transformers", "dcp"]
LIGHTNING: Kind = "lightning"
TRANSFORMERS: Kind = "transformers"
DCP: Kind = "dcp"
_MONITOR_STATE_PREFIX = "OvertrainingMonitor"


class SeriesError(ValueError):
    """The series cannot be set up (a bad pattern, mapping or class): nothing is probed."""


class CheckpointError(RuntimeError):
    """One checkpoint cannot be used (missing, unreadable, no token count): it is skipped."""


@dataclass
class Checkpoint:
    """One checkpoint of the series.

    Attributes:
        path: where it is, as found.
        kind: ``"lightning"`` (a ``.ckpt`` file), ``"transformers"`` (a directory) or
            ``"dcp"`` (a torch distributed checkpoint directory).
        step: the optimizer step, when the checkpoint records it.
        tokens: tokens seen when it was saved (set by a :data:`TokensRule`).
        tokens_source: where :attr:`tokens` came from, for the log.
        monitor_state: the ``OvertrainingMonitor`` state saved in a Lightning checkpoint.
        tokens_seen: ``num_input_tokens_seen`` of a transformers ``trainer_state.json``
            (OLMo-core: ``global_train_tokens_seen``).
        layout: for DCP, the engine's layout (see :mod:`~lightning_overtrain.cli.layouts`).
        dcp_dir: for DCP, the directory holding ``.metadata`` and the shards.
        hyper_parameters: the arguments Lightning saved to build the module again.
        history_head: the first record of the monitor's history in it (the run's identity).
    """

    path: str
    kind: Kind
    step: int | None = None
    tokens: int | None = None
    tokens_source: str = ""
    monitor_state: dict[str, Any] | None = field(default=None, repr=False)
    tokens_seen: int | None = None
    layout: str | None = None
    dcp_dir: str | None = None
    hyper_parameters: dict[str, Any] | None = field(default=None, repr=False)
    history_head: dict[str, Any] | None = field(default=None, repr=False)


TokensRule = Callable[[Checkpoint], tuple[int, str]]


def checkpoint_kind(path: str) -> Kind | None:
    """``"lightning"`` for a ``.ckpt`` file, ``"dcp"`` for a distributed checkpoint directory,
    ``"transformers"`` for a directory with a config."""
    if os.path.isfile(path) and path.endswith(".ckpt"):
        return LIGHTNING
    if dcp_layout(path) is not None:
        return DCP
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return TRANSFORMERS
    return None


def make_checkpoint(path: str, kind: Kind) -> Checkpoint:
    """A :class:`Checkpoint` of ``kind`` at ``path`` (with its DCP layout, if any)."""
    ckpt = Checkpoint(path, kind)
    if kind == DCP:
        ckpt.layout, ckpt.dcp_dir = dcp_layout(path) or ("dcp", path)
    return ckpt


def is_incomplete(ckpt: Checkpoint) -> str | None:
    """Why a DCP checkpoint is not completely written yet (None: complete, or not DCP)."""
    if ckpt.kind != DCP:
        return None
    return incomplete_reason(ckpt.path, ckpt.layout or "dcp", ckpt.dcp_dir or ckpt.path)


def find_checkpoints(
    paths: Iterable[str], confined: bool = False
) -> tuple[list[Checkpoint], list[tuple[str, str]]]:
    """Expand the given paths into checkpoints; directories are searched recursively.

    Only regular files and directories are taken: a FIFO, socket or device named
    ``*.ckpt`` is never opened (it is reported). A symlink inside a searched directory
    is followed unless ``confined``; confined (``watch``), one pointing out of the
    tree is skipped and reported, and one inside it is left to its target.

    Args:
        paths: ``.ckpt`` files, checkpoint directories, or directories holding them.
        confined: stay inside each searched directory.

    Returns:
        ``(checkpoints, failures)``: each failure is ``(path, reason)`` for a path that
        does not exist, holds no checkpoint or was skipped; the others are still usable.
    """
    found: dict[str, Checkpoint] = {}
    failures: list[tuple[str, str]] = []

    def add(full: str, kind: Kind) -> None:
        found.setdefault(os.path.abspath(full), make_checkpoint(full, kind))

    for path in paths:
        if not os.path.exists(path):
            failures.append((path, "no such file or directory"))
            continue
        kind = checkpoint_kind(path)
        if kind is not None:
            add(path, kind)
            continue
        if not os.path.isdir(path):
            failures.append(
                (path, "not a checkpoint: expected a .ckpt file or a checkpoint directory")
            )
            continue
        before, root = len(found), os.path.realpath(path)
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            kind = checkpoint_kind(dirpath) if dirpath != path else None
            if kind in (TRANSFORMERS, DCP):
                add(dirpath, kind)
                dirnames.clear()  # a checkpoint directory is one checkpoint
                continue
            for name in [*dirnames, *sorted(filenames)]:
                full = os.path.join(dirpath, name)
                if os.path.islink(full):
                    reason = _link_reason(full, root, confined)
                    if reason is not None:
                        failures.append((full, reason))
                    elif not confined and name in dirnames:
                        kind = checkpoint_kind(full)
                        if kind is not None:
                            add(full, kind)
                    elif not confined and name.endswith(".ckpt") and os.path.isfile(full):
                        add(full, LIGHTNING)
                elif name in dirnames:
                    continue  # os.walk descends into it
                elif name.endswith(".ckpt"):
                    if _is_regular(full):
                        add(full, LIGHTNING)
                    else:
                        failures.append((full, "not a regular file (a FIFO, socket or device)"))
        if len(found) == before:
            failures.append((path, "no .ckpt file or checkpoint directory found in it"))
    return list(found.values()), failures


def _link_reason(full: str, root: str, confined: bool) -> str | None:
    """Why a symlink met in a search is skipped (None: use it, or leave it to its target)."""
    target = os.path.realpath(full)
    inside = target == root or target.startswith(root + os.sep)
    if confined and not inside and (full.endswith(".ckpt") or os.path.isdir(full)):
        return f"a symlink to {target}, outside the watched directory: skipped"
    if os.path.exists(full) and not (os.path.isdir(full) or _is_regular(full)):
        return "a symlink to something not a regular file (a FIFO, socket or device)"
    return None


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_metadata(checkpoint: Checkpoint, unsafe_load: bool = False) -> None:
    """Fill in the step, the monitor's state and tokens seen, reading no weights into memory.

    Raises:
        CheckpointError: if the checkpoint cannot be read.
    """
    if checkpoint.kind == DCP:
        _read_dcp_metadata(checkpoint, unsafe_load)
        return
    if checkpoint.kind == LIGHTNING:
        data = _torch_load(checkpoint.path, unsafe_load, mmap=True)
        if not isinstance(data, dict) or "state_dict" not in data:
            raise CheckpointError("not a Lightning checkpoint (no `state_dict` in it)")
        _read_lightning_state(checkpoint, data)
        return
    state_path = os.path.join(checkpoint.path, "trainer_state.json")
    if os.path.isfile(state_path):
        try:
            with open(state_path) as f:
                state = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"unreadable trainer_state.json: {exc}") from exc
        step, seen = state.get("global_step"), state.get("num_input_tokens_seen")
        checkpoint.step = int(step) if isinstance(step, int) else None
        checkpoint.tokens_seen = int(seen) if isinstance(seen, int) and seen > 0 else None


def _read_lightning_state(checkpoint: Checkpoint, data: dict[str, Any]) -> None:
    """The step, the monitor's state and the saved hyperparameters of a Lightning checkpoint."""
    step = data.get("global_step")
    checkpoint.step = int(step) if isinstance(step, int) else None
    hparams = data.get("hyper_parameters")
    checkpoint.hyper_parameters = dict(hparams) if isinstance(hparams, dict) else None
    states = {
        k: v
        for k, v in (data.get("callbacks") or {}).items()
        if str(k).startswith(_MONITOR_STATE_PREFIX)
    }
    if len(states) > 1:
        raise CheckpointError(
            f"it holds {len(states)} OvertrainingMonitor states ({sorted(states)}); pass"
            " --tokens-per-step, --tokens-pattern or --tokens-map to say which tokens to use"
        )
    checkpoint.monitor_state = next(iter(states.values()), None)
    history = (checkpoint.monitor_state or {}).get("history")
    if isinstance(history, list) and history and isinstance(history[0], dict):
        checkpoint.history_head = dict(history[0])


def _read_dcp_metadata(checkpoint: Checkpoint, unsafe_load: bool) -> None:
    layout = checkpoint.layout or "dcp"
    reason = is_incomplete(checkpoint)
    if reason is not None:
        raise CheckpointError(reason)
    if layout == "lightning":
        data = _torch_load(os.path.join(checkpoint.path, LIGHTNING_META), unsafe_load)
        if not isinstance(data, dict):
            raise CheckpointError(f"its {LIGHTNING_META} is not a Lightning checkpoint's metadata")
        _read_lightning_state(checkpoint, data)
        return
    checkpoint.step = step_from_name(checkpoint.path, layout)
    if layout == "olmo-core":
        step, checkpoint.tokens_seen = olmo_trainer_state(checkpoint.path)
        checkpoint.step = step if step is not None else checkpoint.step


def _torch_load(path: str, unsafe_load: bool, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe_load, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"it holds Python objects that a safe load refuses ({str(exc).splitlines()[0]});"
            " pass --unsafe-load if you trust this file"
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"unreadable: {type(exc).__name__}: {exc}") from exc


_MOVED = {"parse_count", "tokens_from_checkpoint", "tokens_from_pattern", "tokens_from_mapping"}


def __getattr__(name: str) -> Any:
    """The token rules live in :mod:`lightning_overtrain.cli.token_rules`; imports of them
    from here keep working (a lazy import: that module imports this one)."""
    if name in _MOVED:
        from lightning_overtrain.cli import token_rules

        return getattr(token_rules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
