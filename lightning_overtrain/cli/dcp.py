"""Read a distributed checkpoint's model tensors into the user's model, in one process.

Through ``torch.distributed.checkpoint`` itself: :func:`torch.distributed.checkpoint.load`
with a state dict holding only the model's tensors (under the layout's key prefix)
and ``no_dist=True``, so no process group is needed and only those tensors' bytes
are read; the optimizer's state in the same shards is never touched. Nothing is
consolidated on disk. The tensors are loaded in place into the model built from
the user's class: the host memory is the model plus the largest tensor read.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lightning_overtrain.cli.dcp_metadata import UnsafeMetadataError, metadata_reader
from lightning_overtrain.cli.layouts import MODEL_PREFIXES
from lightning_overtrain.cli.series import Checkpoint, CheckpointError, SeriesError

_SHOWN = 3  # keys quoted in a mismatch line


def build_model(factory: Any, hyper_parameters: Mapping[str, Any] | None, option: str) -> nn.Module:
    """The model from the user's class (or function), on the CPU, in eval mode.

    Lightning saves the module's hyperparameters (``save_hyperparameters()``): they are
    passed as keyword arguments, as ``load_from_checkpoint`` does; other engines save
    none, so the class is called with no arguments. A LightningModule whose layers are
    made in ``configure_model`` gets it called when ``__init__`` made no parameters; one
    that only shards there (``fully_shard`` needs the run's device mesh) is left unsharded.

    Raises:
        SeriesError: naming ``option`` if the class cannot be called this way.
    """
    kwargs = dict(hyper_parameters or {})
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        params = []
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        names = {p.name for p in params}
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    try:
        model = factory(**kwargs)
        if not any(True for _ in model.parameters()) and hasattr(model, "configure_model"):
            model.configure_model()
    except Exception as exc:
        given = f"with {sorted(kwargs)}" if kwargs else "with no arguments"
        raise SeriesError(
            f"{option} {getattr(factory, '__qualname__', factory)!r} cannot build the model"
            f" {given}: {type(exc).__name__}: {exc}. For a distributed checkpoint, pass a class"
            " (or a function, path/to/file.py:make_model) that builds the model the run"
            " trained with those arguments."
        ) from exc
    if not isinstance(model, nn.Module):
        raise SeriesError(f"{option} returned a {type(model).__name__}, not a torch nn.Module.")
    return model.eval()


def stored_keys(dcp_dir: str, unsafe_load: bool = False) -> dict[str, Any]:
    """Every key of the checkpoint's ``.metadata`` with its storage metadata (no tensor read).

    Without ``unsafe_load``, ``.metadata`` is unpickled with an allow-list
    (:mod:`lightning_overtrain.cli.dcp_metadata`), never a plain ``pickle.load``.

    Raises:
        CheckpointError: if ``.metadata`` cannot be read, or names something a
            checkpoint's metadata never holds (the line names the file and --unsafe-load).
    """
    try:
        return dict(metadata_reader(dcp_dir, unsafe_load).read_metadata().state_dict_metadata)
    except UnsafeMetadataError as exc:
        raise CheckpointError(str(exc)) from exc
    except Exception as exc:
        raise CheckpointError(f"its .metadata is unreadable: {type(exc).__name__}: {exc}") from exc


def model_prefix(
    model_keys: Sequence[str], stored: Mapping[str, Any], layout: str, dcp_key: str | None
) -> str:
    """The prefix under which the checkpoint holds the model's tensors.

    ``--dcp-key`` when given; else the first of the layout's prefixes that holds every
    model key; else the one prefix that, put before the model's keys, finds them all.
    Falls back to the layout's first prefix (the mismatch is then reported by the caller).
    """
    if dcp_key is not None:
        return dcp_key if not dcp_key or dcp_key.endswith(".") else dcp_key + "."
    candidates = MODEL_PREFIXES.get(layout, MODEL_PREFIXES["dcp"])
    for prefix in candidates:
        if all(prefix + k in stored for k in model_keys):
            return prefix
    if model_keys:  # e.g. a plain loop that saved {"net": model.state_dict(), ...}
        first = model_keys[0]
        guesses = {s[: -len(first)] for s in stored if s.endswith("." + first)}
        found = [p for p in guesses if all(p + k in stored for k in model_keys)]
        if len(found) == 1:
            return found[0]
    return max(candidates, key=lambda p: sum(p + k in stored for k in model_keys))


def mismatch(
    model: nn.Module, target: Mapping[str, Any], stored: Mapping[str, Any], prefix: str
) -> str | None:
    """One line on how the checkpoint does not fit the model, or None if it fits."""
    model_keys = list(target)
    missing = [k for k in model_keys if prefix + k not in stored]
    roots = {k.split(".")[0] for k in model_keys}
    unexpected = [
        s[len(prefix) :]
        for s in stored
        if s.startswith(prefix)
        and s[len(prefix) :] not in target
        and (prefix or s.split(".")[0] in roots)  # at the top level, only the model's names
    ]
    sizes = [
        f"{k} {list(stored[prefix + k].size)} in the checkpoint, {list(v.shape)} in the model"
        for k, v in target.items()
        if prefix + k in stored
        and hasattr(stored[prefix + k], "size")
        and tuple(stored[prefix + k].size) != tuple(v.shape)
    ]
    if not (missing or unexpected or sizes):
        return None
    parts = []
    if missing:
        parts.append(f"missing keys {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_first(unexpected)}")
    if sizes:
        parts.append(f"other shapes: {_first(sizes)}")
    where = f"under the key prefix {prefix!r}" if prefix else "at the top level"
    return (
        f"it does not fit {type(model).__name__} ({'; '.join(parts)}; looked {where}):"
        " pass the --module-class the run trained, or --dcp-key PREFIX where the model's"
        " tensors are stored under another prefix"
    )


def load_dcp_model(
    ckpt: Checkpoint,
    factory: Any,
    option: str = "--module-class",
    dcp_key: str | None = None,
    unsafe_load: bool = False,
) -> nn.Module:
    """The model of a DCP checkpoint, built from ``factory`` and filled with its tensors.

    Args:
        ckpt: a ``"dcp"`` checkpoint (its metadata read).
        factory: the user's class or function.
        option: the option that named it, for messages.
        dcp_key: the key prefix of the model's tensors, when the layout does not say.
        unsafe_load: read ``.metadata`` with torch's plain ``pickle.load``.

    Raises:
        SeriesError: if the class cannot be built.
        CheckpointError: if the checkpoint does not fit the model or cannot be read (a
            checkpoint deleted while it is read, say).

    Example::

        model = load_dcp_model(ckpt, MyLM)  # ckpt.path = "checkpoints/step10.ckpt"
    """
    import torch.distributed.checkpoint as dcp

    dcp_dir = ckpt.dcp_dir or ckpt.path
    stored = stored_keys(dcp_dir, unsafe_load)
    model = build_model(factory, ckpt.hyper_parameters, option)
    target = model.state_dict()
    prefix = model_prefix(list(target), stored, ckpt.layout or "dcp", dcp_key)
    problem = mismatch(model, target, stored, prefix)
    if problem is not None:
        raise CheckpointError(problem)
    request = {prefix + k: v for k, v in target.items()}
    try:
        with warnings.catch_warnings():
            # no_dist=True is the intent here; torch warns that it assumes so.
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a")
            dcp.load(
                request,
                checkpoint_id=dcp_dir,
                storage_reader=metadata_reader(dcp_dir, unsafe_load),
                no_dist=True,
            )
    except Exception as exc:  # a shard gone (retention), truncated, unreadable
        raise CheckpointError(f"cannot read its tensors: {_cause(exc)}") from exc
    # The tensors were loaded in place; load_state_dict runs the module's own load hooks.
    model.load_state_dict(target)
    return model


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]


def _first(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")
