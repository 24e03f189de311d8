"""Loading a checkpoint's model, and its init std, for the CLI."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_overtrain.cli.series import (
    DCP,
    LIGHTNING,
    Checkpoint,
    CheckpointError,
    SeriesError,
    TokensRule,
)
from lightning_overtrain.engine.init_std import (
    config_initializer_range,
    init_std_from_value,
    init_std_from_weights,
)


# ---------------------------------------------------------------------- loading
def import_object(spec: str, what: str) -> Any:
    """Import ``package.module:name``, ``package.module.name`` or ``path/to/file.py:name``.

    A module name resolves as ``python -m`` would: the current directory comes first
    (it is put on ``sys.path`` for the rest of the process, so the module's own
    imports and pickled objects in a checkpoint resolve too). A file's directory is
    put on ``sys.path`` as ``python path/to/file.py`` would, for its sibling imports.

    Args:
        spec: what the user wrote.
        what: the option, for the message (``--module-class``).

    Raises:
        SeriesError: naming ``what`` (the option) if the import fails; a module that is
            not found gets the ``path/to/module.py:name`` form to pass instead.

    Example::

        cls = import_object("mygpt:MyGPT", "--module-class")  # ./mygpt.py
    """
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise SeriesError(f"{what} {spec!r}: write it as `package.module:name`.")
    try:
        if module_name.endswith(".py"):
            module = _import_file(module_name)
        else:
            _on_path(os.getcwd())
            module = importlib.import_module(module_name)
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ModuleNotFoundError as exc:
        hint = ""
        if exc.name and module_name.split(".")[0] == exc.name.split(".")[0]:
            hint = (
                f" (looked in the current directory {os.getcwd()} and on sys.path). If the"
                f" file is elsewhere, pass its path: {what}"
                f" path/to/{module_name.replace('.', '/')}.py:{attr}"
            )
        raise SeriesError(f"{what} {spec!r} cannot be imported: {exc}{hint}.") from exc
    except (ImportError, AttributeError, SyntaxError) as exc:
        raise SeriesError(
            f"{what} {spec!r} cannot be imported: {type(exc).__name__}: {exc}."
        ) from exc
    return obj


def _import_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise ImportError(f"no such file {path!r}")
    name = "_lightning_overtrain_user_" + re.sub(r"\W", "_", path)
    loader = importlib.util.spec_from_file_location(name, path)
    if loader is None or loader.loader is None:
        raise ImportError(f"{path!r} cannot be loaded as a Python module")
    _on_path(os.path.dirname(os.path.abspath(path)))
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module  # so pickle and dataclasses find the module by its name
    try:
        loader.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _on_path(directory: str) -> None:
    """Put ``directory`` first on ``sys.path`` unless it is there already."""
    if not any(os.path.abspath(p or os.curdir) == directory for p in sys.path):
        sys.path.insert(0, directory)


def load_model(
    checkpoint: Checkpoint,
    module_class: type | None,
    auto_class: Any,
    device: torch.device,
    unsafe_load: bool = False,
    dcp_key: str | None = None,
) -> nn.Module:
    """Load one checkpoint's model onto ``device``, in eval mode.

    Args:
        checkpoint: the checkpoint.
        module_class: the LightningModule class (``.ckpt`` files), or the class or function
            that builds the model (distributed checkpoints).
        auto_class: a class with ``from_pretrained`` (for directories).
        device: where the model goes.
        unsafe_load: allow arbitrary pickled objects in ``.ckpt`` files and in a
            distributed checkpoint's ``.metadata``.
        dcp_key: the key prefix of the model's tensors in a distributed checkpoint.

    Raises:
        SeriesError: for a ``.ckpt`` file without ``module_class``.
        CheckpointError: if the checkpoint cannot be loaded, or does not fit the model
            (one line: the first missing and unexpected keys, and the fix).
    """
    if checkpoint.kind == DCP:
        from lightning_overtrain.cli.dcp import load_dcp_model

        if module_class is None:
            raise SeriesError(
                "distributed checkpoints need the class that builds the model: pass"
                " --module-class, e.g. --module-class my_project.model:MyLM."
            )
        model = load_dcp_model(checkpoint, module_class, dcp_key=dcp_key, unsafe_load=unsafe_load)
        return model.to(device).eval()
    try:
        if checkpoint.kind == LIGHTNING:
            if module_class is None:
                raise SeriesError(
                    "Lightning .ckpt files need the LightningModule class to load them:"
                    " pass --module-class, e.g. --module-class my_project.model:MyLM."
                )
            model = module_class.load_from_checkpoint(
                checkpoint.path, map_location="cpu", weights_only=not unsafe_load
            )
        else:
            model = auto_class.from_pretrained(checkpoint.path)
    except SeriesError:
        raise
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"it holds Python objects that a safe load refuses; pass --unsafe-load if you"
            f" trust this file ({str(exc).splitlines()[0]})"
        ) from exc
    except Exception as exc:  # any loader fault is this checkpoint's failure, not the run's
        factory = module_class if checkpoint.kind == LIGHTNING else auto_class
        line = state_dict_mismatch(str(exc), getattr(factory, "__name__", str(factory)))
        raise CheckpointError(line or f"cannot load it: {type(exc).__name__}: {exc}") from exc
    return model.to(device).eval()


_KEYS = {
    "missing keys": re.compile(r"Missing key\(s\) in state_dict: (.*?)\.\s*(?:\n|$|Unexpected)"),
    "unexpected keys": re.compile(r"Unexpected key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)"),
    "other shapes": re.compile(r"size mismatch for ([^:]+):"),
}


def state_dict_mismatch(message: str, model_name: str) -> str | None:
    """torch's multi-line ``Error(s) in loading state_dict`` as one line with the fix."""
    if "Error(s) in loading state_dict" not in message:
        return None
    parts = []
    for what, pattern in _KEYS.items():
        found = [k.strip().strip('"') for m in pattern.findall(message) for k in m.split(", ")]
        if found:
            more = f" and {len(found) - 3} more" if len(found) > 3 else ""
            parts.append(f"{what} {', '.join(found[:3])}{more}")
    return (
        f"it does not fit {model_name} ({'; '.join(parts) or 'its keys differ'}): pass the"
        " --module-class the run trained (the class and hyperparameters that wrote it)"
    )


def order_series(
    checkpoints: list[Checkpoint], rule: TokensRule
) -> tuple[list[Checkpoint], list[tuple[str, str]], list[tuple[Checkpoint, Checkpoint]]]:
    """Give every checkpoint its tokens and sort them by tokens.

    Returns:
        ``(ordered, failures, duplicates)``: failures are ``(path, reason)`` for
        checkpoints whose tokens are unknown; ``duplicates`` pairs each checkpoint
        dropped with the kept one at the same token count (e.g. ``last.ckpt``).
    """
    failures: list[tuple[str, str]] = []
    by_tokens: dict[int, Checkpoint] = {}
    duplicates: list[tuple[Checkpoint, Checkpoint]] = []
    for ckpt in sorted(checkpoints, key=lambda c: c.path):
        try:
            ckpt.tokens, ckpt.tokens_source = rule(ckpt)
        except CheckpointError as exc:
            failures.append((ckpt.path, str(exc)))
            continue
        if ckpt.tokens in by_tokens:
            duplicates.append((ckpt, by_tokens[ckpt.tokens]))
        else:
            by_tokens[ckpt.tokens] = ckpt
    return [by_tokens[t] for t in sorted(by_tokens)], failures, duplicates


class SeriesInitStd:
    """``sigma_t`` for every checkpoint of a series, from the first source that has it.

    Sources, in order (the monitor's own order, with the checkpoint's state first):
    the user's ``init_std``; the ``init_stds`` the monitor saved in a Lightning
    checkpoint; the weights of a checkpoint at step 0 (or 0 tokens); the model
    config's ``initializer_range``. :attr:`source` says which was used.

    Args:
        init_std: the user's value, or None.
        ordered: the series' checkpoints, with their metadata read.
        load: loads a checkpoint's model (used for a step-0 checkpoint).

    Raises:
        SeriesError: if a step-0 checkpoint cannot be loaded.

    Example::

        init = SeriesInitStd(None, checkpoints, load)
        sigmas = init.sigmas(model, [n for n, _ in model.named_parameters()])
    """

    def __init__(
        self,
        init_std: float | None,
        ordered: list[Checkpoint],
        load: Callable[[Checkpoint], nn.Module],
    ) -> None:
        self.value: float | None = init_std
        self.by_name: dict[str, float] | None = None
        self.source = "--init-std"
        if init_std is not None:
            return
        saved = next(
            (c for c in ordered if c.monitor_state and c.monitor_state.get("init_stds")), None
        )
        if saved is not None:
            assert saved.monitor_state is not None
            self.by_name = dict(saved.monitor_state["init_stds"])
            origin = saved.monitor_state.get("init_std_source") or "unknown"
            self.source = f"the monitor's state in {saved.path} (measured from {origin})"
            return
        first = next((c for c in ordered if c.tokens == 0 or c.step == 0), None)
        if first is not None:
            try:
                self.by_name = init_std_from_weights(load(first))
            except CheckpointError as exc:
                raise SeriesError(
                    f"the step-0 checkpoint {first.path} gives the init std but {exc}."
                    " Pass --init-std instead."
                ) from exc
            self.source = f"the weights of the step-0 checkpoint {first.path}"
            return
        self.source = "config.initializer_range"

    def sigmas(self, model: nn.Module, names: Sequence[str]) -> list[float]:
        """``sigma_t`` aligned with ``names`` (the model's parameters)."""
        if self.by_name is None:
            value = self.value if self.value is not None else config_initializer_range(model)
            if value is None:
                raise SeriesError(
                    "Cannot tell the std the weights were initialized with: no step-0"
                    " checkpoint, no monitor state and no config.initializer_range. Pass"
                    " --init-std, e.g. --init-std 0.02."
                )
            self.source = (
                f"config.initializer_range = {value}" if self.value is None else self.source
            )
            stds = init_std_from_value(model, value)
            return [stds[n] for n in names]
        missing = [n for n in names if n not in self.by_name]
        if missing:
            raise CheckpointError(
                f"the init stds (from {self.source}) do not name its parameters (e.g."
                f" {missing[0]!r}); pass --init-std"
            )
        return [self.by_name[n] for n in names]
