"""Following a directory a run writes checkpoints into: which ones are complete, which vanished.

A checkpoint counts as written once its files look the same (names, sizes,
modification times) at two polls in a row. Lightning saves a ``.ckpt`` through a
temp file and a rename (atomic on one file system), but fsspec puts that temp file
in the system temp directory, and when it is on another file system the "rename"
is a copy into place; ``save_pretrained`` writes ``config.json`` before the
weights. Both look complete before they are, so the watcher also treats a
checkpoint that fails to load as not done: it is tried again when its files change.
A distributed checkpoint is not even looked at before its engine's own marker of
completeness is there (``.metadata``; ``meta.pt`` for Lightning; see
:mod:`lightning_overtrain.cli.layouts`).

Only regular files and directories inside the watched tree count: a FIFO or a
device named ``*.ckpt`` is never opened, and a symlink out of the tree is skipped
and reported (:func:`~lightning_overtrain.cli.series.find_checkpoints`, confined).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lightning_overtrain.cli.series import (
    LIGHTNING,
    Checkpoint,
    find_checkpoints,
    is_incomplete,
)

Signature = tuple[tuple[str, int, int], ...]


def signature(ckpt: Checkpoint) -> Signature | None:
    """``(name, size, mtime_ns)`` of every file of the checkpoint; None if it is gone."""
    try:
        if ckpt.kind == LIGHTNING:
            stat = os.stat(ckpt.path)
            return (("", stat.st_size, stat.st_mtime_ns),)
        out = []
        for dirpath, dirnames, filenames in os.walk(ckpt.path):
            dirnames.sort()
            for name in sorted(filenames):
                stat = os.stat(os.path.join(dirpath, name))
                rel = os.path.relpath(os.path.join(dirpath, name), ckpt.path)
                out.append((rel, stat.st_size, stat.st_mtime_ns))
        return tuple(out) if out else None
    except OSError:
        return None


@dataclass
class Poll:
    """What one look at the directory found.

    Attributes:
        ready: checkpoints whose files did not change since the previous poll.
        vanished: paths seen before that are gone now.
        changed: whether any checkpoint appeared or changed since the previous poll.
        incomplete: ``(path, why)`` for checkpoints still being written.
        skipped: ``(path, why)`` for entries never read (symlinks out of the tree, FIFOs).
    """

    ready: list[tuple[Checkpoint, Signature]] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    changed: bool = False
    incomplete: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


class Follower:
    """Polls ``directory`` (recursively, as ``probe`` searches it) for complete checkpoints.

    Args:
        directory: the run's checkpoint directory.

    Example::

        follower = Follower("lightning_logs/version_0/checkpoints")
        poll = follower.poll()  # the first poll finds nothing ready: it has no "before"
        poll = follower.poll()
        for ckpt, sig in poll.ready: ...
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._last: dict[str, Signature] = {}

    def poll(self) -> Poll:
        found, skipped = [], []
        if os.path.isdir(self.directory):
            found, skipped = find_checkpoints([self.directory], confined=True)
        result = Poll(skipped=[(p, r) for p, r in skipped if p != self.directory])
        now: dict[str, Signature] = {}
        for ckpt in found:
            reason = is_incomplete(ckpt)
            if reason is not None:
                result.incomplete.append((ckpt.path, reason))
            sig = signature(ckpt)
            if sig is None:
                continue
            path = os.path.abspath(ckpt.path)
            now[path] = sig
            if self._last.get(path) != sig:
                result.changed = True
            elif reason is None:  # an incomplete one waits for its marker, even if still
                result.ready.append((ckpt, sig))
        result.vanished = sorted(p for p in self._last if p not in now)
        self._last = now
        return result
