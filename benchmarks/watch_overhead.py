"""What ``lightning-overtrain watch`` costs the training job, as ratios within one run.

Three ways to train the same model for the same steps, with ``ModelCheckpoint``
every ``--every`` steps, interleaved in each repeat:

- ``plain``: ModelCheckpoint only;
- ``callback``: plus ``WatcherStop`` (a ``stat`` of the decision file every step);
- ``watched``: plus a ``lightning-overtrain watch`` process beside it, probing every
  checkpoint as it lands (on this machine's CPUs, so it competes with training).

Reported: the median training-step time of each (checkpoint steps included; wall
and this process's CPU time), the ratios callback/plain and watched/plain per
repeat, and their range. One warm-up run first; the order rotates each repeat.

Usage: nice -n 19 python benchmarks/watch_overhead.py [--repeats 6]
Writes benchmarks/results/watch_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_overtrain.callbacks.remote import WatcherStop
from lightning_overtrain.testing.demo import ByteWindows, TinyCausalLM, stdlib_code

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONTEXT, BATCH = 128, 8


class StepTimes(pl.Callback):
    """Wall and CPU seconds of each step (this process's CPU time: what a stat costs)."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []
        self._start = (0.0, 0.0)

    def on_train_batch_start(self, *args) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, *args) -> None:
        wall, cpu = self._start
        self.times.append((time.perf_counter() - wall, time.process_time() - cpu))


def train(
    directory: str, steps: int, every: int, callback: bool, text: bytes
) -> list[tuple[float, float]]:
    pl.seed_everything(0, verbose=False)
    model = TinyCausalLM(n_layer=2, n_embd=64, n_head=2, context=CONTEXT, warmup_steps=4)
    times = StepTimes()
    ckpt = ModelCheckpoint(directory, every_n_train_steps=every, save_top_k=-1, filename="{step}")
    callbacks = [times, *([WatcherStop(directory)] if callback else []), ckpt]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=directory,
    )
    trainer.fit(model, DataLoader(ByteWindows(text, CONTEXT), batch_size=BATCH))
    return times.times[1:]  # the first step warms up


def start_watcher(directory: str, out: str, ref: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lightning_overtrain.cli", "watch", directory, "--out", out]
    cmd += ["--module-class", "lightning_overtrain.testing.demo:TinyCausalLM"]
    cmd += ["--reference-text", ref, "--tokenizer", "bytes", "--context", str(CONTEXT)]
    cmd += ["--batch-size", str(BATCH), "--device", "cpu", "--poll", "0.5"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:  # training starts once the watcher is set up and polling
        if line.startswith(b"watching"):
            return proc
    raise RuntimeError("the watcher did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    text = stdlib_code(max_bytes=1_000_000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "ref.bin")
        with open(ref, "wb") as f:
            f.write(text[-CONTEXT * BATCH * 4 :])
        train(os.path.join(tmp, "warmup"), args.steps, args.every, False, text)
        modes = ["plain", "callback", "watched"]
        for repeat in range(args.repeats):
            medians = {}
            for mode in modes[repeat % 3 :] + modes[: repeat % 3]:  # each order in turn
                directory = os.path.join(tmp, f"{mode}{repeat}")
                os.makedirs(directory)
                watcher = None
                if mode == "watched":
                    watcher = start_watcher(directory, directory + "_out", ref)
                try:
                    times = train(directory, args.steps, args.every, mode != "plain", text)
                finally:
                    if watcher is not None:
                        watcher.kill()
                        watcher.wait()
                medians[mode] = statistics.median(t for t, _ in times)
                medians[mode + "_cpu"] = statistics.median(c for _, c in times)
            row = {f"{m}_step_s": v for m, v in medians.items()}
            for mode in ("callback", "watched"):
                row[f"{mode}/plain"] = medians[mode] / medians["plain"]
                row[f"{mode}/plain_cpu"] = medians[mode + "_cpu"] / medians["plain_cpu"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    ratios = ("callback/plain", "watched/plain", "callback/plain_cpu", "watched/plain_cpu")
    summary = {
        key: {
            "min": min(r[key] for r in rows),
            "median": statistics.median(r[key] for r in rows),
            "max": max(r[key] for r in rows),
        }
        for key in ratios
    }
    result = {"settings": vars(args), "cpus": os.cpu_count(), "repeats": rows, "range": summary}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "watch_overhead.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        "# What the watcher costs the training job",
        "",
        f"TinyCausalLM 2 layers d=64, context {CONTEXT}, batch {BATCH}, one CPU thread,"
        f" {args.steps} steps, ModelCheckpoint every {args.every}; {os.cpu_count()} CPUs"
        " shared with other jobs; median step time per run, runs interleaved.",
        "",
        "| ratio (wall unless _cpu) | min | median | max |",
        "|---|---|---|---|",
    ]
    for key, v in summary.items():
        lines.append(f"| {key} | {v['min']:.3f} | {v['median']:.3f} | {v['max']:.3f} |")
    lines += [
        "",
        "| repeat | plain (s) | + WatcherStop (s) | + watcher process (s) |",
        "|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        lines.append(
            f"| {i} | {r['plain_step_s']:.4f} | {r['callback_step_s']:.4f} |"
            f" {r['watched_step_s']:.4f} |"
        )
    with open(os.path.join(HERE, "results", "watch_overhead.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
