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

import json
import os
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_overtrain.checks import check_int

RUN_FILE = "overtrain_run.json"
STOP_FILE = "overtrain_stop.json"


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` so that a reader sees the old file or the new one.

    The temp file sits in the same directory: ``os.replace`` is atomic only within one
    file system.
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if there is none (or it is not an object)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _signature(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class WatcherStop(Callback):
    """Stop training when ``lightning-overtrain watch`` decides so, on every rank at one step.

    Every ``check_every_n_steps`` optimizer steps, rank 0 looks for the watcher's
    decision file (one ``os.stat``, at most every ``min_interval_s`` seconds; a cached
    answer in between), then all ranks agree with one
    ``trainer.strategy.reduce_boolean_decision``. Every rank calls it at the same
    steps, so it cannot deadlock. Cost: on one device, a ``stat`` per check and no
    collective; under DDP/FSDP also one all-reduce of one number per check.

    A decision file already there when training starts (from an earlier fit that the
    watcher stopped) is ignored until the watcher writes a new one.

    Args:
        dirpath: the directory the checkpoints go to, the one the watcher follows.
        check_every_n_steps: look every N optimizer steps (1: stop at the next step).
        min_interval_s: rank 0 stats the file at most this often.

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
        if isinstance(min_interval_s, bool) or not (
            isinstance(min_interval_s, (int, float)) and min_interval_s >= 0
        ):
            raise ValueError(
                f"`min_interval_s` must be a number of seconds >= 0, got {min_interval_s!r}."
            )
        self.dirpath = os.fspath(dirpath)
        self.check_every_n_steps = check_every_n_steps
        self.min_interval_s = float(min_interval_s)
        self.stop_reason: str | None = None
        self._stale: tuple[int, int] | None = None
        self._seen: dict[str, Any] | None = None
        self._last_look = -float("inf")
        self._last_step = -1

    @property
    def stop_path(self) -> str:
        return os.path.join(self.dirpath, STOP_FILE)

    def _write_status(self, trainer: pl.Trainer, status: str, **extra: Any) -> None:
        if not trainer.is_global_zero:
            return
        os.makedirs(self.dirpath, exist_ok=True)
        data = {
            "status": status,
            "global_step": trainer.global_step,
            "check_every_n_steps": self.check_every_n_steps,
            "time": time.time(),
            **extra,
        }
        write_json_atomic(os.path.join(self.dirpath, RUN_FILE), data)

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
            reason = str((self._seen or {}).get("reason") or "the watcher decided to stop")
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
                self._seen = read_json(self.stop_path) or {}
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
