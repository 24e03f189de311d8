"""A series of checkpoints on disk: find them, order them by tokens, load them.

Two formats: Lightning ``.ckpt`` files (loaded with the user's LightningModule
class) and transformers ``save_pretrained`` directories (loaded with an auto
class). Tokens, the x-axis of every curve, come from one of three places:

- the checkpoint itself: the monitor's ``tokens`` in a Lightning checkpoint,
  ``num_input_tokens_seen`` in a transformers ``trainer_state.json``, else its
  step times ``tokens_per_step``;
- a naming pattern: a regex with a named group ``tokens`` (``4B``, ``2.3T`` and
  ``1_000`` are read as numbers) or ``step`` (times ``tokens_per_step``);
- a mapping file: JSON ``{"checkpoint": tokens}`` or a CSV with columns
  ``checkpoint,tokens``.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Kind = Literal["lightning", "transformers"]
LIGHTNING: Kind = "lightning"
TRANSFORMERS: Kind = "transformers"
_MONITOR_STATE_PREFIX = "OvertrainingMonitor"
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_COUNT = re.compile(r"^\s*(\d[\d_]*(?:\.\d+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)


class SeriesError(ValueError):
    """The series cannot be set up (a bad pattern, mapping or class): nothing is probed."""


class CheckpointError(RuntimeError):
    """One checkpoint cannot be used (missing, unreadable, no token count): it is skipped."""


@dataclass
class Checkpoint:
    """One checkpoint of the series.

    Attributes:
        path: where it is, as found.
        kind: ``"lightning"`` (a ``.ckpt`` file) or ``"transformers"`` (a directory).
        step: the optimizer step, when the checkpoint records it.
        tokens: tokens seen when it was saved (set by a :data:`TokensRule`).
        tokens_source: where :attr:`tokens` came from, for the log.
        monitor_state: the ``OvertrainingMonitor`` state saved in a Lightning checkpoint.
        tokens_seen: ``num_input_tokens_seen`` of a transformers ``trainer_state.json``.
    """

    path: str
    kind: Kind
    step: int | None = None
    tokens: int | None = None
    tokens_source: str = ""
    monitor_state: dict[str, Any] | None = field(default=None, repr=False)
    tokens_seen: int | None = None


TokensRule = Callable[[Checkpoint], tuple[int, str]]


def parse_count(text: str | int | float) -> int:
    """Read a token count: ``123``, ``1_000``, ``4B``, ``2.3T``, ``500k``, ``1e9``.

    Raises:
        ValueError: if ``text`` is not a non-negative whole number of tokens.

    Example::

        >>> parse_count("2.3T"), parse_count("500k"), parse_count(1e9)
        (2300000000000, 500000, 1000000000)
    """
    if isinstance(text, bool):
        raise ValueError(f"not a token count: {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _COUNT.match(str(text))
        if match is None:
            try:
                value = float(str(text))
            except ValueError:
                raise ValueError(f"not a token count: {text!r}") from None
        else:
            value = float(match.group(1).replace("_", "")) * _SUFFIXES[match.group(2).lower()]
    if not value >= 0 or value != value or value == float("inf") or value != round(value):
        raise ValueError(f"not a whole, non-negative token count: {text!r}")
    return round(value)


def checkpoint_kind(path: str) -> Kind | None:
    """``"lightning"`` for a ``.ckpt`` file, ``"transformers"`` for a directory with a config."""
    if os.path.isfile(path) and path.endswith(".ckpt"):
        return LIGHTNING
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return TRANSFORMERS
    return None


def find_checkpoints(paths: Iterable[str]) -> tuple[list[Checkpoint], list[tuple[str, str]]]:
    """Expand the given paths into checkpoints; directories are searched recursively.

    Args:
        paths: ``.ckpt`` files, ``save_pretrained`` directories, or directories holding them.

    Returns:
        ``(checkpoints, failures)``: each failure is ``(path, reason)`` for a path that
        does not exist or holds no checkpoint; the others are still usable.
    """
    found: dict[str, Checkpoint] = {}
    failures: list[tuple[str, str]] = []
    for path in paths:
        if not os.path.exists(path):
            failures.append((path, "no such file or directory"))
            continue
        kind = checkpoint_kind(path)
        if kind is not None:
            found.setdefault(os.path.abspath(path), Checkpoint(path, kind))
            continue
        if not os.path.isdir(path):
            failures.append(
                (path, "not a checkpoint: expected a .ckpt file or a directory with config.json")
            )
            continue
        before = len(found)
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            if checkpoint_kind(dirpath) == TRANSFORMERS:
                found.setdefault(os.path.abspath(dirpath), Checkpoint(dirpath, TRANSFORMERS))
                dirnames.clear()  # a save_pretrained directory is one checkpoint
                continue
            for name in sorted(filenames):
                if name.endswith(".ckpt"):
                    full = os.path.join(dirpath, name)
                    found.setdefault(os.path.abspath(full), Checkpoint(full, LIGHTNING))
        if len(found) == before:
            failures.append((path, "no .ckpt file or save_pretrained directory found in it"))
    return list(found.values()), failures


def read_metadata(checkpoint: Checkpoint, unsafe_load: bool = False) -> None:
    """Fill in the step, the monitor's state and tokens seen, reading no weights into memory.

    Raises:
        CheckpointError: if the checkpoint cannot be read.
    """
    if checkpoint.kind == LIGHTNING:
        data = _torch_load(checkpoint.path, unsafe_load, mmap=True)
        if not isinstance(data, dict) or "state_dict" not in data:
            raise CheckpointError("not a Lightning checkpoint (no `state_dict` in it)")
        step = data.get("global_step")
        checkpoint.step = int(step) if isinstance(step, int) else None
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


# ---------------------------------------------------------------------- token rules
def tokens_from_checkpoint(tokens_per_step: int | None = None) -> TokensRule:
    """Tokens recorded in the checkpoint, else its step times ``tokens_per_step``."""

    def rule(ckpt: Checkpoint) -> tuple[int, str]:
        state = ckpt.monitor_state or {}
        if isinstance(state.get("tokens"), int):
            return state["tokens"], "the monitor's tokens"
        if isinstance(state.get("counted_tokens"), int):  # saved before `tokens` was
            return state["counted_tokens"], "the monitor's counted_tokens"
        if ckpt.tokens_seen is not None:
            return ckpt.tokens_seen, "trainer_state.json num_input_tokens_seen"
        if ckpt.step is not None and tokens_per_step is not None:
            return ckpt.step * tokens_per_step, f"step {ckpt.step} x {tokens_per_step} tokens"
        where = "no step" if ckpt.step is None else f"step {ckpt.step}"
        raise CheckpointError(
            f"it records no token count ({where}); pass --tokens-per-step (with a step),"
            " --tokens-pattern or --tokens-map"
        )

    return rule


def tokens_from_pattern(pattern: str, tokens_per_step: int | None = None) -> TokensRule:
    """Tokens from the checkpoint's path: a regex with a named group ``tokens`` or ``step``.

    Raises:
        SeriesError: on a bad regex, one without either group, or a ``step`` group
            without ``tokens_per_step``.

    Example::

        rule = tokens_from_pattern(r"step(?P<step>\\d+)", tokens_per_step=2_097_152)
    """
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise SeriesError(f"--tokens-pattern {pattern!r} is not a valid regex: {exc}.") from exc
    groups = set(regex.groupindex)
    if not groups & {"tokens", "step"}:
        raise SeriesError(
            f"--tokens-pattern {pattern!r} has no named group `tokens` or `step`. Use e.g."
            r" 'tokens=(?P<tokens>[\d.]+[kMBT]?)' or 'step(?P<step>\d+)' with --tokens-per-step."
        )
    if "tokens" not in groups and tokens_per_step is None:
        raise SeriesError(
            f"--tokens-pattern {pattern!r} reads a `step`; pass --tokens-per-step too."
        )

    def rule(ckpt: Checkpoint) -> tuple[int, str]:
        match = regex.search(ckpt.path.replace(os.sep, "/"))
        if match is None:
            raise CheckpointError(f"its path does not match --tokens-pattern {pattern!r}")
        try:
            if match.groupdict().get("tokens") is not None:
                return parse_count(match.group("tokens")), "--tokens-pattern"
            step = parse_count(match.group("step"))
        except (ValueError, IndexError) as exc:
            raise CheckpointError(f"--tokens-pattern {pattern!r} matched badly: {exc}") from exc
        assert tokens_per_step is not None
        if ckpt.step is None:
            ckpt.step = step
        return step * tokens_per_step, f"--tokens-pattern step {step} x {tokens_per_step}"

    return rule


def tokens_from_mapping(path: str) -> TokensRule:
    """Tokens from a JSON ``{checkpoint: tokens}`` or a CSV with ``checkpoint,tokens`` columns.

    A checkpoint is found in the mapping by its path (relative to the mapping file or
    to the working directory) or by its base name.

    Raises:
        SeriesError: if the file is missing or unreadable, or an entry is not a token count.
    """
    entries = _read_mapping(path)
    base = os.path.dirname(os.path.abspath(path))
    by_path = {os.path.normpath(os.path.join(base, k)): v for k, v in entries.items()}
    by_path.update({os.path.abspath(k): v for k, v in entries.items()})
    by_name: dict[str, int | None] = {}
    for key, value in entries.items():
        name = os.path.basename(os.path.normpath(key))
        by_name[name] = None if name in by_name else value  # None: ambiguous

    def rule(ckpt: Checkpoint) -> tuple[int, str]:
        full = os.path.abspath(ckpt.path)
        if full in by_path:
            return by_path[full], f"--tokens-map {path}"
        name = os.path.basename(os.path.normpath(ckpt.path))
        if name in by_name:
            if by_name[name] is None:
                raise CheckpointError(
                    f"--tokens-map {path} has several entries named {name!r}; use full paths"
                )
            return by_name[name], f"--tokens-map {path}"  # type: ignore[return-value]
        raise CheckpointError(f"not in --tokens-map {path} (looked for {ckpt.path!r}, {name!r})")

    return rule


def _read_mapping(path: str) -> dict[str, int]:
    if not os.path.isfile(path):
        raise SeriesError(f"--tokens-map {path!r}: no such file. Pass a JSON or CSV file.")
    try:
        with open(path, newline="") as f:
            text = f.read()
    except OSError as exc:
        raise SeriesError(f"--tokens-map {path!r} is unreadable: {exc}.") from exc
    raw: list[tuple[Any, Any]]
    if path.endswith(".csv"):
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or not {"checkpoint", "tokens"} <= set(rows[0]):
            raise SeriesError(
                f"--tokens-map {path!r} needs a header with columns `checkpoint,tokens` and"
                " one row per checkpoint, e.g. `step1000.ckpt,2048000`."
            )
        raw = [(r["checkpoint"], r["tokens"]) for r in rows]
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SeriesError(
                f"--tokens-map {path!r} is not valid JSON ({exc}). Write an object"
                ' {"checkpoint path or name": tokens}, or a CSV with columns checkpoint,tokens.'
            ) from exc
        if not isinstance(data, dict) or not data:
            raise SeriesError(
                f"--tokens-map {path!r} must hold a non-empty JSON object"
                f' {{"checkpoint path or name": tokens}}, got {type(data).__name__}.'
            )
        raw = list(data.items())
    entries: dict[str, int] = {}
    for key, value in raw:
        try:
            entries[str(key)] = parse_count(value)
        except ValueError:
            raise SeriesError(
                f"--tokens-map {path!r}: the entry for {key!r} is {value!r}, not a token count."
                " Give whole non-negative numbers such as 2048000 or '4B'."
            ) from None
    return entries
