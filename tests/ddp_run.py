"""Train the tiny model with the monitor on N CPU processes and write each rank's history.

Run as a script (``python tests/ddp_run.py --devices 2 --out DIR``), never inside
pytest's own process: ``strategy="ddp"`` re-launches the script for the other ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import lightning.pytorch as pl
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(__file__))
from conftest import CONTEXT, make_module, make_trainer, reference_batches

from lightning_overtrain import InflectionPolicy, NoiseProbe, OvertrainingMonitor, Probe
from lightning_overtrain.probes.sharpness import SharpnessProbe
from lightning_overtrain.testing.demo import ByteWindows, stdlib_code

GLOBAL_BATCH = 16


class FailsOnOneRank(Probe):
    """Raises on one rank only: the others must not wait for it forever."""

    name = "fails_on_one_rank"

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def run(self, ctx):
        def local():
            if int(os.environ.get("LOCAL_RANK", 0)) == self.rank:
                raise RuntimeError("only this rank fails")
            return ctx.local_loss_sums()

        ctx.reduce_or_fail(local, (2,))
        return {"fails_on_one_rank/ok": 1.0}


class RankFlag(Probe):
    """Reports 1.0 on one rank only, so only that rank's policy wants to stop."""

    name = "rankflag"

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def run(self, ctx):
        return {"rankflag/value": float(int(os.environ.get("LOCAL_RANK", 0)) == self.rank)}


class WriteHistory(pl.Callback):
    def __init__(self, monitor: OvertrainingMonitor, out: str) -> None:
        self.monitor, self.out = monitor, out

    def on_train_end(self, trainer, pl_module):
        path = os.path.join(self.out, f"history_rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump(
                {
                    "history": self.monitor.history,
                    "failures": self.monitor.probe_failures,
                    "stop_reason": self.monitor.stop_reason,
                    "global_step": trainer.global_step,
                },
                f,
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--fail-on-rank", type=int, default=None)
    parser.add_argument("--stop-on-rank", type=int, default=None)
    parser.add_argument("--sharpness", action="store_true", help="add both sharpness probes")
    args = parser.parse_args()

    text = stdlib_code(max_bytes=200_000)
    data = ByteWindows(text[:100_000], CONTEXT)
    sampler = DistributedSampler(
        data, num_replicas=args.devices, rank=int(os.environ.get("LOCAL_RANK", 0)), shuffle=False
    )
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // args.devices, sampler=sampler)
    probes: list[Probe] = [NoiseProbe(gammas=(0.5, 1.0), pairs=2)]
    if args.fail_on_rank is not None:
        probes.insert(0, FailsOnOneRank(args.fail_on_rank))
    if args.sharpness:
        probes += [SharpnessProbe("update"), SharpnessProbe("gradient", name="sharpness_grad")]
    policy = None
    if args.stop_on_rank is not None:
        probes.append(RankFlag(args.stop_on_rank))
        policy = InflectionPolicy(action="stop", thresholds={"rankflag/value": 0.5})
    # 5 reference batches: an uneven split across 2 ranks, on purpose.
    monitor = OvertrainingMonitor(
        reference_batches(text, n=5),
        every_n_steps=3,
        probes=probes,
        dirpath=args.out,
        policy=policy,
    )
    trainer = make_trainer(
        args.out,
        [monitor, WriteHistory(monitor, args.out)],
        max_steps=args.max_steps,
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        use_distributed_sampler=False,
    )
    trainer.fit(make_module(0), loader)


if __name__ == "__main__":
    main()
