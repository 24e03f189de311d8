"""``WatcherStop``: the training side of ``lightning-overtrain watch``.

The watcher probes a run's checkpoints in another process (another machine, or
spare accelerators) and talks to the run through two small JSON files beside the
checkpoints, each written atomically (a temp file, then ``os.replace``) so the
other side never reads half of one:

- ``overtrain_run.json``, written by this callback (rank 0): ``"running"`` when
  training starts, ``"finished"`` or ``"failed"`` when it ends. The watcher stops
  once the run is over and every checkpoint is probed, and it knows from it that a
  ``WatcherStop`` is listening (without one, a stop decision is only a warning).
- ``overtrain_stop.json``, written by the watcher when its policy decides to stop:
  the reason, the signal, the tokens. This callback stops training at its next
  check, on every rank at the same optimizer step.
"""

from __future__ import annotations

import os
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_overtrain.checks import check_int, check_number
from lightning_overtrain.safe_io import UnsafeFile, read_json_object, write_json_atomic

RUN_FILE = "overtrain_run.json"
STOP_FILE = "overtrain_stop.json"
MAX_INTERVAL_S = 86_400


#: The largest stop decision read: the watcher's is well under 4 KiB.
STOP_MAX_BYTES = 64 * 2**10
#: The longest stop reason kept (it is logged and stored in checkpoints).
REASON_MAX_CHARS = 2000

__all__ = ["RUN_FILE", "STOP_FILE", "WatcherStop", "read_json", "read_stop", "write_json_atomic"]


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in the regular file ``path``, or None if there is none (or it is not
    an object, not a regular file, or larger than 16 MiB)."""
    try:
        return read_json_object(path)
    except (OSError, ValueError):
        return None


def read_stop(path: str) -> str:
    """The reason in a stop decision the watcher wrote at ``path``.

    A decision is a regular file (not a symlink, FIFO or device) of at most
    :data:`STOP_MAX_BYTES`, holding a JSON object whose ``"reason"`` is a non-empty
    string and whose ``"level"``, if any, is ``"stop"``: the schema ``watch`` writes.

    Raises:
        ValueError: saying why the file is not a stop decision (it is then ignored).
    """
    try:
        data = read_json_object_nofollow(path)
    except FileNotFoundError as exc:
        raise ValueError("it disappeared before it was read") from exc
    except OSError as exc:
        raise ValueError(f"it cannot be read ({type(exc).__name__}: {exc})") from exc
    reason = data.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError('it has no "reason" string, so it is not a decision the watcher wrote')
    if data.get("level", "stop") != "stop":
        raise ValueError(f'its "level" is {data.get("level")!r}, not "stop"')
    reason = reason.strip()
    return reason if len(reason) <= REASON_MAX_CHARS else reason[:REASON_MAX_CHARS] + "..."


def read_json_object_nofollow(path: str) -> dict[str, Any]:
    # The stop file's place is its meaning: a symlink there (to /dev/zero, a FIFO, a
    # file elsewhere) is not the watcher's decision.
    if os.path.islink(path):
        raise UnsafeFile("it is a symlink, not a regular file")
    return read_json_object(path, STOP_MAX_BYTES)


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        stat = os.lstat(path)  # the entry itself: never blocks, never follows a link
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class WatcherStop(Callback):
    """Stop training when ``lightning-overtrain watch`` decides so, on every rank at one step.

    Every ``check_every_n_steps`` optimizer steps, rank 0 looks for the watcher's
    decision file (one ``os.stat``, at most every ``min_interval_s`` seconds; a cached
    answer in between), then all ranks agree with one
    ``trainer.strategy.reduce_boolean_decision``. Every rank calls it at the same
    steps, so it cannot deadlock. Cost: on one device, a ``stat`` per check and no
    collective; under DDP/FSDP also one all-reduce of one number per check.

    A decision file already there when training starts (from an earlier fit that the
    watcher stopped) is ignored until the watcher writes a new one. A file there is
    data, not a command: only a regular file of at most 64 KiB holding the watcher's
    schema (see :func:`read_stop`) stops training; anything else (garbage, an empty
    file, a FIFO, a symlink, a huge file) is ignored with one warning naming the file
    and why, and is never opened for a blocking read.

    Args:
        dirpath: the directory the checkpoints go to, the one the watcher follows.
        check_every_n_steps: look every N optimizer steps (1: stop at the next step).
        min_interval_s: rank 0 stats the file at most this often (finite, at most a day).

    Raises:
        ValueError: on a bad argument.

    Example::

        ckpts = ModelCheckpoint(dirpath="ckpt", every_n_train_steps=1000, save_top_k=-1)
        trainer = L.Trainer(callbacks=[ckpts, WatcherStop("ckpt")])
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        check_every_n_steps: int = 1,
        min_interval_s: float = 1.0,
    ) -> None:
        check_int(
            "check_every_n_steps",
            check_every_n_steps,
            1,
            "Pass how many optimizer steps apart to look for the watcher's decision, e.g. 1.",
        )
        check_number(
            "min_interval_s",
            min_interval_s,
            "An infinite or longer interval would never look for the watcher's decision;"
            " pass e.g. min_interval_s=1.0.",
            minimum=0,
            maximum=MAX_INTERVAL_S,
        )
        self.dirpath = os.fspath(dirpath)
        self.check_every_n_steps = check_every_n_steps
        self.min_interval_s = float(min_interval_s)
        self.stop_reason: str | None = None
        self._stale: tuple[int, int, int] | None = None
        self._seen: str | None = None
        self._last_look = -float("inf")
        self._last_step = -1

    @property
    def stop_path(self) -> str:
        return os.path.join(self.dirpath, STOP_FILE)

    def _write_status(self, trainer: pl.Trainer, status: str, **extra: Any) -> None:
        if not trainer.is_global_zero:
            return
        data = {
            "status": status,
            "global_step": trainer.global_step,
            "check_every_n_steps": self.check_every_n_steps,
            "time": time.time(),
            **extra,
        }
        path = os.path.join(self.dirpath, RUN_FILE)
        try:
            os.makedirs(self.dirpath, exist_ok=True)
            write_json_atomic(path, data)
        except OSError as exc:  # a full or read-only disk is the watcher's loss, not training's
            rank_zero_warn(
                f"WatcherStop: the run's status {status!r} was not written to {path}"
                f" ({type(exc).__name__}: {exc}). Training goes on; the watcher cannot see it."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stale = _signature(self.stop_path) if trainer.is_global_zero else None
        if self._stale is not None:
            rank_zero_warn(
                f"WatcherStop: {self.stop_path} is from an earlier fit; it is ignored until the"
                " watcher writes a new decision."
            )
        self._last_step = trainer.global_step
        self._write_status(trainer, "running")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        step = trainer.global_step
        # Inside a gradient-accumulation window, or not a check step: no collective.
        if step == self._last_step or step % self.check_every_n_steps:
            return
        self._last_step = step
        seen = self._look() if trainer.is_global_zero else False
        if trainer.strategy.reduce_boolean_decision(seen, all=False):
            reason = self._seen or "the watcher decided to stop"
            # Every rank is here at this step: one broadcast gives them all rank 0's reason.
            self.stop_reason = trainer.strategy.broadcast(reason, src=0)
            trainer.should_stop = True
            rank_zero_info(
                f"WatcherStop: stopping at step {step}: the watcher decided to stop"
                f" ({self.stop_reason})."
            )

    def _look(self) -> bool:
        now = time.monotonic()
        if self._seen is None and now - self._last_look >= self.min_interval_s:
            self._last_look = now
            signature = _signature(self.stop_path)
            if signature is not None and signature != self._stale:
                try:
                    self._seen = read_stop(self.stop_path)
                except ValueError as exc:
                    # Ignored until it changes again: one warning per file written there.
                    self._stale = signature
                    rank_zero_warn(
                        f"WatcherStop: ignoring {self.stop_path}: {exc}. Training goes on; only"
                        " a stop decision written by `lightning-overtrain watch` stops it."
                    )
        return self._seen is not None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_status(trainer, "finished", stop_reason=self.stop_reason)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._write_status(trainer, "failed", error=f"{type(exception).__name__}: {exception}")

    def state_dict(self) -> dict[str, Any]:
        return {"stop_reason": self.stop_reason}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stop_reason = state_dict.get("stop_reason")
