"""A monitor whose directory nothing can be written to, under 2-process DDP on the CPU.

Run as a script (``python tests/faults_ddp_run.py --out DIR``), never inside pytest's
own process: ``strategy="ddp"`` re-launches the script for the other rank. Each rank
writes what it saw (history, counts, the warnings it was given) to ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import lightning.pytorch as pl
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(__file__))
from conftest import CONTEXT, make_module, make_trainer, reference_batches
from ddp_run import GLOBAL_BATCH, FailsOnOneRank

from lightning_overtrain import NoiseProbe, OvertrainingMonitor
from lightning_overtrain.testing.demo import ByteWindows, stdlib_code


class Report(pl.Callback):
    def __init__(self, monitor: OvertrainingMonitor, out: str, caught: list) -> None:
        self.monitor, self.out, self.caught = monitor, out, caught

    def on_train_end(self, trainer, pl_module):
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(
                {
                    "history": self.monitor.history,
                    "probe_failures": self.monitor.probe_failures,
                    "output_failures": self.monitor.output_failures,
                    "best_path": self.monitor.best_path,
                    "global_step": trainer.global_step,
                    "warnings": [str(w.message) for w in self.caught],
                },
                f,
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    blocked = os.path.join(args.out, "a_file")  # a directory under a file: no write succeeds
    with open(blocked, "w") as f:
        f.write("x")
    text = stdlib_code(max_bytes=200_000)
    data = ByteWindows(text[:100_000], CONTEXT)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // 2, sampler=sampler)
    monitor = OvertrainingMonitor(
        reference_batches(text, n=4),
        every_n_steps=3,
        probes=[FailsOnOneRank(1), NoiseProbe(gammas=(1.0,), pairs=1)],
        dirpath=os.path.join(blocked, "overtrain"),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(
            args.out,
            [monitor],
            max_steps=6,
            devices=2,
            strategy="ddp",
            use_distributed_sampler=False,
        )
        trainer.callbacks.append(Report(monitor, args.out, caught))
        trainer.fit(make_module(0), loader)


if __name__ == "__main__":
    main()
