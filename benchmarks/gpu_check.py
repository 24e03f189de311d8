"""The GPU check: what a CPU cannot show, in one script a lent GPU runs in under 5 minutes.

1. A bf16-mixed run with the monitor on, the monitor's hot path under
   ``torch.cuda.set_sync_debug_mode("error")`` on every ordinary step (a host
   sync there raises and fails the check); snapshots and exact token counts run
   with the mode off, since they are allowed to sync.
2. Peak accelerator memory of the same run without the monitor, with it, and
   with the backup in host memory (``backup_device="cpu"``), as multiples of the
   parameter bytes over the run without the monitor.
3. The host backup is pinned.
4. Noise-probe time / its forward-pass lower bound on the GPU, backup on the GPU
   and in pinned host memory.

On a machine without CUDA it prints why it skipped and exits 0.
Usage: python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def make_model():
    from lightning_overtrain.testing.demo import TinyCausalLM

    torch.manual_seed(0)
    return TinyCausalLM(n_layer=4, n_embd=256, n_head=4, context=256, warmup_steps=4)


def batches(n: int, rows: int = 16, length: int = 256, seed: int = 0) -> list[dict]:
    """Random byte batches whose odd rows pad their tail (the mask is counted on the device)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (rows, length), generator=gen)
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[1::2, length // 2 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def guard(monitor) -> dict[str, int]:
    """Run the monitor's hot path with sync debugging on "error"; allow it where syncs are due."""
    seen = {"guarded_steps": 0, "exact_counts": 0, "snapshots": 0}
    clock = monitor.core.clock  # its exact count is the one sync an ordinary step may reach
    hook, sync, snapshot = monitor.on_train_batch_end, clock.sync, monitor.snapshot

    def allowed(fn, name):
        def run(*args, **kwargs):
            seen[name] += 1
            torch.cuda.set_sync_debug_mode(0)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("error")

        return run

    def guarded(*args, **kwargs):
        seen["guarded_steps"] += 1
        torch.cuda.set_sync_debug_mode("error")
        try:
            return hook(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    clock.sync = allowed(sync, "exact_counts")
    monitor.snapshot = allowed(snapshot, "snapshots")
    monitor.on_train_batch_end = guarded
    return seen


def fit(tmp: str, monitor_kwargs: dict | None, steps: int = 60) -> dict:
    import lightning.pytorch as pl

    from lightning_overtrain.callbacks.monitor import OvertrainingMonitor
    from lightning_overtrain.probes.noise import NoiseProbe

    callbacks, seen = [], None
    if monitor_kwargs is not None:
        monitor = OvertrainingMonitor(
            batches(4, seed=1),
            # A snapshot every 20 steps' tokens: 3 in the run, 57 ordinary steps.
            every_n_tokens=20 * int(batches(1)[0]["attention_mask"].sum()),
            probes=[NoiseProbe(gammas=(0.5, 1.0), pairs=2)],
            dirpath=os.path.join(tmp, "mon"),
            on_probe_error="raise",
            **monitor_kwargs,
        )
        seen = guard(monitor)
        callbacks.append(monitor)
    model = make_model()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
        callbacks=callbacks,
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(model, torch.utils.data.DataLoader(batches(steps), batch_size=None))
    torch.cuda.synchronize()
    out = {
        "seconds": round(time.perf_counter() - start, 2),
        "peak_bytes": torch.cuda.max_memory_allocated(),
        "param_bytes": params,
    }
    if monitor_kwargs is not None:
        out.update(seen, snapshots_recorded=len(monitor.history))
    return out


def noise_ratio(backup_device: str | None, repeats: int = 3) -> list[float]:
    from lightning_overtrain.engine.backup import ModelBackup
    from lightning_overtrain.engine.contract import ProbeContext
    from lightning_overtrain.engine.losses import loss_sums, transformers_loss
    from lightning_overtrain.engine.snapshot import measure_snapshot
    from lightning_overtrain.probes.noise import NoiseProbe

    model = make_model().cuda().eval()
    ref = [{k: v.cuda() for k, v in b.items()} for b in batches(8, seed=2)]
    weights = [int(b["attention_mask"].sum()) for b in ref]
    gammas, pairs = (0.25, 0.5, 1.0), 4
    passes = 1 + 2 * pairs * len(gammas)
    backup = ModelBackup(model, device=backup_device)
    sigmas = [0.02 if p.dim() >= 2 else 0.0 for p in backup.params]
    ctx = ProbeContext(model, backup, sigmas, ref, weights, transformers_loss)
    probe = NoiseProbe(gammas=gammas, pairs=pairs)

    def fail(what, exc):
        raise exc

    ratios = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(passes):
                loss_sums(model, ref, weights, transformers_loss)
        torch.cuda.synchronize()
        bound = time.perf_counter() - start
        start = time.perf_counter()
        measure_snapshot(ctx, [probe], fail)
        torch.cuda.synchronize()
        if i:  # the first round warms up kernels and the allocator
            ratios.append(round((time.perf_counter() - start) / bound, 4))
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(HERE, "results", "gpu_check.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: skipped, no CUDA device on this machine (nothing to check on a CPU).")
        return 0
    import tempfile

    from lightning_overtrain.engine.backup import ModelBackup

    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        results["without_monitor"] = fit(tmp, None)
        results["with_monitor"] = fit(tmp, {})
        results["with_monitor_host_backup"] = fit(tmp, {"backup_device": "cpu"})
    base = results["without_monitor"]["peak_bytes"]
    params = results["without_monitor"]["param_bytes"]
    for key in ("with_monitor", "with_monitor_host_backup"):
        results[key]["extra_peak_x_params"] = round((results[key]["peak_bytes"] - base) / params, 3)
    host = ModelBackup(make_model().cuda(), device="cpu")
    results["host_backup_pinned"] = all(t.is_pinned() for t in host.saved_params())
    results["noise_ratio_device_backup"] = noise_ratio(None)
    results["noise_ratio_host_backup"] = noise_ratio("cpu")
    ok = (
        results["with_monitor"]["snapshots_recorded"] >= 2
        and results["with_monitor"]["guarded_steps"] > results["with_monitor"]["snapshots"]
        and results["host_backup_pinned"]
        and max(results["noise_ratio_device_backup"]) <= 1.15
    )
    results["ok"] = bool(ok)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
