"""Which run each checkpoint of a series comes from: a series is one run.

A checkpoint the monitor saved carries its run's history; every later checkpoint
of the same run (resumed ones too) starts with the same first record, so that
record (its tokens and reference loss) names the run. A checkpoint without it
(another loop, or saved before the first snapshot) belongs to the monitored run
whose checkpoints share its directory (the one with more of them, if two do),
else to "the checkpoints in that directory".
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from lightning_overtrain import keys
from lightning_overtrain.cli.series import Checkpoint

Run = tuple[str, str]  # (kind, identity): ("monitor", first record) or ("directory", path)


def run_directory(ckpt: Checkpoint) -> str:
    """The directory a checkpoint was written into (its run's, for a loop without the monitor)."""
    return os.path.dirname(os.path.abspath(os.path.normpath(ckpt.path)))


def monitor_identity(ckpt: Checkpoint) -> str | None:
    """The first record of the monitor's history in ``ckpt``, as text; None without one."""
    head = ckpt.history_head
    if not head or keys.TOKENS not in head:
        return None
    loss = head.get(keys.REFERENCE_LOSS)
    loss_text = f"{loss:.6g}" if isinstance(loss, float) and math.isfinite(loss) else "nan"
    return f"first snapshot at {int(head[keys.TOKENS]):,} tokens, reference_loss {loss_text}"


def assign_runs(checkpoints: Sequence[Checkpoint]) -> dict[str, Run]:
    """Each checkpoint's run, by absolute path."""
    runs: dict[str, Run] = {}
    by_directory: dict[str, set[Run]] = {}
    for ckpt in checkpoints:
        identity = monitor_identity(ckpt)
        if identity is not None:
            run = ("monitor", identity)
            runs[os.path.abspath(ckpt.path)] = run
            by_directory.setdefault(run_directory(ckpt), set()).add(run)
    for ckpt in checkpoints:
        path = os.path.abspath(ckpt.path)
        if path in runs:
            continue
        directory = run_directory(ckpt)
        known = sorted(by_directory.get(directory, set()))
        if not known:
            runs[path] = ("directory", directory)
            continue
        # Two monitored runs in one directory: it goes with the one of more checkpoints.
        members = list(runs.values())
        runs[path] = max(known, key=members.count)
    return runs


def describe(run: Run, members: Sequence[Checkpoint]) -> str:
    """``the run in DIR (first snapshot at ...; 4 checkpoints)``."""
    directories = sorted({run_directory(c) for c in members})
    where = directories[0] if len(directories) == 1 else f"{len(directories)} directories"
    what = f"the run in {where}" if run[0] == "directory" else f"the run in {where} ({run[1]})"
    return f"{what}, {len(members)} checkpoint(s)"


def one_run(
    checkpoints: list[Checkpoint], mix: bool = False
) -> tuple[list[Checkpoint], list[tuple[str, str]]]:
    """Keep the checkpoints of one run: the one with the most checkpoints (ties: the first).

    Args:
        checkpoints: the series found, their metadata read.
        mix: keep every run (``--mix-runs``).

    Returns:
        ``(kept, skipped)``: ``skipped`` is ``(path, reason)`` for each checkpoint of
        another run, naming both runs and the option that keeps them.

    Example::

        kept, skipped = one_run(found)
    """
    runs = assign_runs(checkpoints)
    groups: dict[Run, list[Checkpoint]] = {}
    for ckpt in checkpoints:
        groups.setdefault(runs[os.path.abspath(ckpt.path)], []).append(ckpt)
    if mix or len(groups) < 2:
        return checkpoints, []
    order = list(groups)
    main = max(order, key=lambda r: (len(groups[r]), -order.index(r)))
    kept_text = describe(main, groups[main])
    skipped = []
    for run, members in groups.items():
        if run == main:
            continue
        other = describe(run, members)
        for ckpt in members:
            skipped.append(
                (
                    ckpt.path,
                    f"another run ({other}) than the series probed ({kept_text}); a series is"
                    " one run: probe it on its own, or pass --mix-runs if they are one run",
                )
            )
    return groups[main], skipped
