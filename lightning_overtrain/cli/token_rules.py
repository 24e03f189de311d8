"""Where each checkpoint's tokens come from: the token rules of a series.

Tokens, the x-axis of every curve, come from one of three places:

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
import re
from typing import Any

from lightning_overtrain.cli.series import Checkpoint, CheckpointError, SeriesError, TokensRule

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_COUNT = re.compile(r"^\s*(\d[\d_]*(?:\.\d+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)


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
