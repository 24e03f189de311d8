"""One rank of a 2-process snapshot with probes that fail on some ranks only (gloo, CPU).

Run as a script, never inside pytest's own process:
``python tests/agreement_run.py --rank R --world-size 2 --rendezvous FILE --out DIR``.
Each rank runs every scenario (a failing probe, then the noise probe) and writes
``rank<R>.json``: per scenario, its record and its failures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from conftest import quadratic_context
from test_noise import Quadratic

from lightning_overtrain.engine.collectives import all_reduce_sum
from lightning_overtrain.engine.contract import Probe, ProbeFailure
from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.probes.noise import NoiseProbe


class RaisesOnRankOne(Probe):
    """A user probe that raises on rank 1 only, before or after its own ``ctx.reduce_sum``."""

    name = "raises_on_rank_one"

    def __init__(self, when: str) -> None:
        self.when = when

    def run(self, ctx):
        rank = dist.get_rank()
        with torch.no_grad():
            for param in ctx.backup.params:
                param.mul_(1.5)  # never restored by the probe
        if self.when == "before" and rank == 1:
            raise RuntimeError("rank 1 fails before its collective")
        loss = ctx.module.loss().detach().to(torch.float64).reshape(1)
        total = ctx.reduce_sum(loss)
        if self.when == "after" and rank == 1:
            raise RuntimeError("rank 1 fails after its collective")
        return {"raises_on_rank_one/loss": float(total) / ctx.world_size}


class OneMoreCollectiveOnRankOne(Probe):
    """Rank 1 makes one more collective than rank 0 (a data-dependent branch, say)."""

    name = "one_more_collective"

    def run(self, ctx):
        for _ in range(1 + dist.get_rank()):
            ctx.reduce_sum(torch.ones(3, dtype=torch.float64))
        return {"one_more_collective/ok": 1.0}


class PartialOnRankZero(Probe):
    """Rank 1 raises; rank 0 catches the engine's failure and reports a partial result."""

    name = "partial_on_rank_zero"

    def run(self, ctx):
        if dist.get_rank() == 1:
            raise RuntimeError("rank 1 fails before its collective")
        try:
            ctx.reduce_sum(torch.ones(1, dtype=torch.float64))
        except ProbeFailure as exc:
            raise ProbeFailure(str(exc), partial={"partial_on_rank_zero/half": 1.0}) from exc
        return {}


class FailsAlikeWithPartial(Probe):
    """Fails on every rank alike after its sum: its partial result is the same everywhere."""

    name = "fails_alike"

    def run(self, ctx):
        total = ctx.reduce_sum(torch.ones(1, dtype=torch.float64))
        raise ProbeFailure("both ranks fail alike", partial={"fails_alike/sum": float(total)})


SCENARIOS = {
    "before": lambda: [RaisesOnRankOne("before")],
    "after": lambda: [RaisesOnRankOne("after")],
    "uneven": lambda: [OneMoreCollectiveOnRankOne()],
    "partial": lambda: [PartialOnRankZero()],
    "alike": lambda: [FailsAlikeWithPartial()],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--rendezvous", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group(
        "gloo",
        init_method=f"file://{args.rendezvous}",
        rank=args.rank,
        world_size=args.world_size,
    )
    results = {name: snapshot(probes(), args.world_size) for name, probes in SCENARIOS.items()}
    with open(os.path.join(args.out, f"rank{args.rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def snapshot(probes: list[Probe], world_size: int) -> dict:
    model = Quadratic()
    ctx = quadratic_context(model)
    ctx.reduce_sum, ctx.world_size = all_reduce_sum, world_size
    failures: list[str] = []
    probes = [*probes, NoiseProbe(gammas=(0.5, 1.0), pairs=2)]
    record = measure_snapshot(ctx, probes, lambda what, exc: failures.append(f"{what}: {exc}"))
    live = all(torch.equal(p, q) for p, q in zip(model.parameters(), Quadratic().parameters()))
    return {"record": record, "failures": failures, "live_after": live}


if __name__ == "__main__":
    main()
