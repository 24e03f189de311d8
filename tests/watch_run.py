"""A short training run for ``lightning-overtrain watch`` to follow from another process.

Run as a script (``python tests/watch_run.py --dir CKPT --monitor-dir MON``): the tiny
model with ``ModelCheckpoint`` every ``--every`` steps (save_top_k=-1), the live
monitor at the same steps (to compare numbers with), and ``WatcherStop``. With
``--pace``, the step after a checkpoint waits until the watcher has handled it, so a
test knows where a stop decision lands; with ``--stop-at-step`` rank 0 writes the
decision itself (for ``--devices 2``: DDP on CPU). Writes ``result.json`` (the last
step, the stop reason, the step times; ``result_rank<r>.json`` on the other ranks)
into ``--monitor-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, os.path.dirname(__file__))
from conftest import CONTEXT, make_module, make_trainer, reference_batches, train_loader

from lightning_overtrain.callbacks.monitor import OvertrainingMonitor
from lightning_overtrain.callbacks.remote import (
    STOP_FILE,
    WatcherStop,
    read_json,
    write_json_atomic,
)
from lightning_overtrain.cli.watch import STATE_FILE
from lightning_overtrain.probes.noise import NoiseProbe
from lightning_overtrain.testing.demo import stdlib_code

BATCH = 8
GAMMAS = (0.5, 1.0)
PAIRS = 2


class Pace(pl.Callback):
    """Before the step after a checkpoint, wait until the watcher's state names its tokens."""

    def __init__(self, every: int, watch_out: str, timeout: float) -> None:
        self.every, self.state_path, self.timeout = (
            every,
            os.path.join(watch_out, STATE_FILE),
            timeout,
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every:
            return
        tokens = str(step * BATCH * CONTEXT)
        deadline = time.monotonic() + self.timeout
        while tokens not in (read_json(self.state_path) or {}).get("paths", {}):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the watcher did not probe step {step} in {self.timeout} s")
            time.sleep(0.05)


class DecidesAt(pl.Callback):
    """Rank 0 writes a stop decision after step ``step``, as the watcher would."""

    def __init__(self, directory: str, step: int) -> None:
        self.directory, self.step = directory, step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            write_json_atomic(os.path.join(self.directory, STOP_FILE), {"reason": "forced"})


class StepTimes(pl.Callback):
    def __init__(self, sleep: float) -> None:
        self.sleep, self.times, self._start = sleep, [], 0.0

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)
        time.sleep(self.sleep)  # a slower run, so a free-running watcher keeps up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--monitor-dir", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--pace", metavar="WATCH_OUT")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--no-monitor", action="store_true")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--stop-at-step", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    code = stdlib_code(max_bytes=200_000)
    callbacks: list[pl.Callback] = []
    if not args.no_monitor:
        monitor = OvertrainingMonitor(
            reference_batches(code, n=2, batch_size=BATCH),
            every_n_steps=args.every,
            probes=[NoiseProbe(gammas=GAMMAS, pairs=PAIRS)],
            dirpath=args.monitor_dir,
        )
        callbacks.append(monitor)
    stop = WatcherStop(args.dir, check_every_n_steps=1, min_interval_s=0)
    times = StepTimes(args.sleep)
    callbacks += [stop, times]
    if args.stop_at_step is not None:
        callbacks.append(DecidesAt(args.dir, args.stop_at_step))
    if args.pace:
        callbacks.append(Pace(args.every, args.pace, timeout=120))
    ckpt = ModelCheckpoint(
        dirpath=args.dir, every_n_train_steps=args.every, save_top_k=-1, filename="{step}"
    )
    trainer = make_trainer(
        args.monitor_dir,
        [*callbacks, ckpt],
        max_steps=args.steps,
        enable_checkpointing=True,
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
    )
    trainer.fit(make_module(), train_loader(code, batch_size=BATCH))
    os.makedirs(args.monitor_dir, exist_ok=True)
    result = {"global_step": trainer.global_step, "stop_reason": stop.stop_reason}
    result["step_times"] = times.times
    name = "result.json" if trainer.is_global_zero else f"result_rank{trainer.global_rank}.json"
    with open(os.path.join(args.monitor_dir, name), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
