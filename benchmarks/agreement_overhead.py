"""Cost of the engine's cross-rank agreement: a 2-process snapshot with and without it.

Two gloo processes on CPU run the same snapshot (reference loss, the noise probe,
a fine-tune probe) over a tiny GPT, alternating, in one run: once with every probe
run under the engine's contract (:func:`run_probe`: each collective guarded by a
2-element state all-reduce, one more at each probe's end) and once with the probes
called bare (then ``backup.restore()``, as ``reduce_or_fail`` used to do). The ratio
of the medians is the agreement's overhead; the collectives are counted too.

Usage: python benchmarks/agreement_overhead.py [--repeats 5]
Writes benchmarks/results/agreement_overhead.json and .md.
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

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lightning_overtrain.engine import snapshot
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.collectives import all_reduce_sum
from lightning_overtrain.engine.contract import ProbeContext
from lightning_overtrain.engine.losses import transformers_loss
from lightning_overtrain.probes.finetune import FineTuneProbe
from lightning_overtrain.probes.noise import NoiseProbe
from lightning_overtrain.testing.demo import ByteWindows, TinyCausalLM, english_prose, stdlib_code

HERE = os.path.dirname(os.path.abspath(__file__))
CONTEXT, BATCH = 128, 8


def bare(probe, ctx):
    """The probe without the engine's agreement (the restore reduce_or_fail used to do)."""
    try:
        return probe.run(ctx)
    finally:
        ctx.backup.restore()


def rank_main(rank: int, world: int, rendezvous: str, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TinyCausalLM(n_layer=2, n_embd=64, n_head=2, context=CONTEXT)
    code, prose = stdlib_code(max_bytes=400_000), english_prose()
    reference = list(DataLoader(ByteWindows(code[-CONTEXT * BATCH * 8 :], CONTEXT), BATCH))
    prose_batches = list(DataLoader(ByteWindows(prose[: CONTEXT * BATCH * 6], CONTEXT), BATCH))
    calls = {"n": 0}

    def counted_sum(tensor):
        calls["n"] += 1
        return all_reduce_sum(tensor)

    backup = ModelBackup(model)
    ctx = ProbeContext(
        model,
        backup,
        [0.02 if p.dim() >= 2 else 0.0 for p in backup.params],
        reference[rank::world],
        [b["input_ids"].numel() for b in reference[rank::world]],
        transformers_loss,
        reduce_sum=counted_sum,
        world_size=world,
    )
    finetune = FineTuneProbe(prose_batches[:4], prose_batches[4:], steps=5, lrs=(1e-3, 3e-3))
    finetune.validate(ctx)
    noise = NoiseProbe(gammas=(0.25, 0.5, 1.0), pairs=4)
    guarded = snapshot.run_probe

    def fail(what, exc):
        raise exc

    results = {}
    for name, probes in (("noise", [noise]), ("noise+finetune", [noise, finetune])):
        times: dict[str, list[float]] = {"bare": [], "agreed": []}
        collectives: dict[str, int] = {}
        for i in range(2 * repeats + 2):
            mode = ("bare", "agreed")[i % 2]
            snapshot.run_probe = guarded if mode == "agreed" else bare
            dist.barrier()
            calls["n"] = 0
            start = time.perf_counter()
            snapshot.measure_snapshot(ctx, probes, fail)
            elapsed = time.perf_counter() - start
            if i >= 2:  # the first pair warms up
                times[mode].append(elapsed)
                collectives[mode] = calls["n"]
        results[name] = {"times": times, "collectives": collectives}
    snapshot.run_probe = guarded
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--rendezvous")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.rank, 2, args.rendezvous, args.repeats, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        command = [sys.executable, __file__, "--repeats", str(args.repeats), "--out", out]
        command += ["--rendezvous", os.path.join(tmp, "rdv")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([*command, "--rank", str(r)], env=env) for r in range(2)]
        for proc in procs:
            if proc.wait(timeout=1800) != 0:
                raise SystemExit(f"a rank failed with exit code {proc.returncode}")
        with open(out) as f:
            data = json.load(f)
    result: dict = {"repeats": args.repeats}
    rows = []
    for name, run in data.items():
        bare_s, agreed_s = (statistics.median(run["times"][m]) for m in ("bare", "agreed"))
        ratios = sorted(a / b for a, b in zip(run["times"]["agreed"], run["times"]["bare"]))
        result[name] = {
            "snapshot_seconds_bare_median": bare_s,
            "snapshot_seconds_agreed_median": agreed_s,
            "ratio_agreed_over_bare_median": agreed_s / bare_s,
            "ratio_per_pair_range": [ratios[0], ratios[-1]],
            **run,
        }
        counts = run["collectives"]
        rows.append(
            f"| {name} | {bare_s:.3f} | {agreed_s:.3f} | {agreed_s / bare_s:.3f} |"
            f" {ratios[0]:.3f} - {ratios[-1]:.3f} | {counts['bare']} -> {counts['agreed']} |"
        )
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "agreement_overhead.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = (
        "| probes | bare (median s) | agreed (median s) | ratio (median) | ratio per pair"
        " (range) | collectives per snapshot |\n|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    with open(os.path.join(HERE, "results", "agreement_overhead.md"), "w") as f:
        f.write(
            f"2 gloo processes on CPU, tiny GPT (2 layers, 64 wide), {args.repeats} alternating"
            " pairs after one warm-up pair.\n\n" + table + "\n"
        )
    print(table)


if __name__ == "__main__":
    main()
