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
import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(__file__))
from conftest import CONTEXT, make_module, make_trainer, reference_batches
from syncs import count_hot_path

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
        # No reduce_or_fail: the engine's agreement alone keeps the other rank from waiting.
        if int(os.environ.get("LOCAL_RANK", 0)) == self.rank:
            raise RuntimeError("only this rank fails")
        ctx.reduce_sum(ctx.local_loss_sums())
        return {"fails_on_one_rank/ok": 1.0}


class RankFlag(Probe):
    """Reports 1.0 on one rank only, so only that rank's policy wants to stop."""

    name = "rankflag"

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def run(self, ctx):
        return {"rankflag/value": float(int(os.environ.get("LOCAL_RANK", 0)) == self.rank)}


class Masked(ByteWindows):
    """Byte windows whose odd rows pad their second half (a collator's padding)."""

    def __getitem__(self, index):
        item = super().__getitem__(index)
        mask = torch.ones(CONTEXT, dtype=torch.long)
        if index % 2:
            mask[CONTEXT // 2 :] = 0
        return {**item, "attention_mask": mask}


class WriteHistory(pl.Callback):
    def __init__(self, monitor: OvertrainingMonitor, out: str, calls=None) -> None:
        self.monitor, self.out, self.calls = monitor, out, calls

    def on_train_end(self, trainer, pl_module):
        path = os.path.join(self.out, f"history_rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump(
                {
                    "history": self.monitor.history,
                    "failures": self.monitor.probe_failures,
                    "output_failures": self.monitor.output_failures,
                    "stop_reason": self.monitor.stop_reason,
                    "best_path": self.monitor.best_path,
                    "global_step": trainer.global_step,
                    "hot_path": self.calls,
                    "policy": self.monitor.policy.state_dict(),
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
    parser.add_argument("--every-n-tokens", type=int, default=None)
    parser.add_argument("--masked", action="store_true")
    parser.add_argument("--count-syncs", action="store_true")
    parser.add_argument("--sharpness", action="store_true", help="add both sharpness probes")
    parser.add_argument("--full-disk", action="store_true", help="rank 0 cannot write best.ckpt")
    args = parser.parse_args()

    text = stdlib_code(max_bytes=200_000)
    data = (Masked if args.masked else ByteWindows)(text[:100_000], CONTEXT)
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
        every_n_steps=None if args.every_n_tokens else 3,
        every_n_tokens=args.every_n_tokens,
        probes=probes,
        dirpath=args.out,
        policy=policy,
    )
    calls = count_hot_path(monitor) if args.count_syncs else None
    trainer = make_trainer(
        args.out,
        [monitor, WriteHistory(monitor, args.out, calls)],
        max_steps=args.max_steps,
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        use_distributed_sampler=False,
    )
    if args.full_disk:
        real = trainer.strategy.save_checkpoint

        def full_disk(checkpoint, filepath, storage_options=None):
            # The best snapshot goes to a temporary name first (".best.ckpt.<random>.tmp").
            if trainer.is_global_zero and "best" in os.path.basename(filepath):
                raise OSError("No space left on device")
            return real(checkpoint, filepath, storage_options)

        trainer.strategy.save_checkpoint = full_disk
    trainer.fit(make_module(0), loader)


if __name__ == "__main__":
    main()
