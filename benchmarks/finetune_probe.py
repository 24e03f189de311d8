"""Cost of the fine-tune probe and the cooldown branch, as ratios measured in one process.

1. one fine-tune probe step / one training step (Lightning ``Trainer``, same model,
   same batch size), goal <= 1.2, in CPU time of this process (one thread), so
   other work on a shared machine does not skew the ratio. A probe step is timed
   as the difference between probes of ``2 * STEPS`` and ``STEPS`` steps, so the
   evaluations cancel out; the cooldown branch's step (the same loop on a copy of
   the training optimizer) is reported beside it.
2. the probe's peak extra memory, tracked tensor by tensor (a dispatch mode that
   sees every CPU allocation, which tracemalloc cannot), beyond a training step's
   peak at the same batch size. Budget: one parameter backup (the monitor's,
   allocated once) + the probe optimizer's state (AdamW: 2 x parameters), plus the
   fine-tune's own gradients (1 x parameters: training's gradients are set aside,
   kept as they are, not copied). Beside it, the probe's overhead over a plain
   PyTorch loop taking the same fine-tune steps (the least any fine-tune costs).

Usage: python benchmarks/finetune_probe.py [--repeats 3] [--batch 32]
Writes benchmarks/results/finetune_probe.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
import weakref

import lightning.pytorch as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader
from torch.utils.weak import WeakIdKeyDictionary

from lightning_overtrain import FineTuneProbe, ProbeContext
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.losses import transformers_loss
from lightning_overtrain.probes.cooldown import CooldownBranch
from lightning_overtrain.testing.demo import ByteWindows, TinyCausalLM, english_prose, stdlib_code

HERE = os.path.dirname(os.path.abspath(__file__))
CONTEXT = 128
STEPS = 10


def make_model() -> TinyCausalLM:
    torch.manual_seed(0)
    return TinyCausalLM(n_layer=2, n_embd=64, n_head=2, context=CONTEXT)


def batches(text: bytes, n: int, batch: int) -> list[dict[str, torch.Tensor]]:
    data = ByteWindows(text[: CONTEXT * batch * n], CONTEXT)
    return list(DataLoader(data, batch_size=batch))


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stamps.append(time.process_time())


def train_step_seconds(code: bytes, batch: int, steps: int = 3 * STEPS) -> float:
    """Median CPU seconds between consecutive Trainer steps (after 5 warm-up steps)."""
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + 5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    loader = DataLoader(
        ByteWindows(code[: CONTEXT * batch * (steps + 5)], CONTEXT), batch_size=batch
    )
    trainer.fit(make_model(), loader)
    gaps = [b - a for a, b in zip(timer.stamps[5:], timer.stamps[6:])]
    return statistics.median(gaps)


def context(model: TinyCausalLM, reference: list) -> ProbeContext:
    backup = ModelBackup(model)
    weights = [b["input_ids"].numel() for b in reference]
    return ProbeContext(
        model, backup, [0.0] * len(backup.params), reference, weights, transformers_loss
    )


def probe_seconds(model, reference, train, held_out, steps: int) -> float:
    probe = FineTuneProbe(train, held_out, steps=steps, lrs=(1e-3,))
    ctx = context(model, reference)
    probe.validate(ctx)
    ctx.reference_loss = 0.0
    with torch.no_grad():
        start = time.process_time()
        probe.run(ctx)
    return time.process_time() - start


def cooldown_seconds(model, reference, train, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    branch = CooldownBranch(model, train, steps)
    ctx = context(model, reference)
    start = time.process_time()
    with branch.branch(ctx, optimizer):
        pass
    return time.process_time() - start


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage created inside the block and still alive: now and at peak.

    Every op's outputs pass through here (also backward's and the optimizer's), so
    this sees the CPU memory that tracemalloc cannot; a storage counts until its
    Python object is collected.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        if storage in self.seen:
            return
        size = storage.nbytes()
        self.seen[storage] = size
        self.now += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.now -= size


def peak_extra_bytes(run) -> int:
    """Peak bytes allocated by ``run()`` (beyond what existed before), tensor by tensor."""
    gc.collect()
    with LiveBytes() as tracker:
        run()
    return tracker.peak


def probe_runner(model, reference, train, held_out):
    probe = FineTuneProbe(train, held_out, steps=5, lrs=(1e-3,))
    ctx = context(model, reference)
    probe.validate(ctx)
    ctx.reference_loss = 0.0

    def run() -> None:
        with torch.no_grad():
            probe.run(ctx)

    return run


def train_step_runner(model, batch):
    """One training step with its optimizer state already there, as in a live run."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        transformers_loss(model, batch).backward()
        optimizer.step()

    step()
    return step


def plain_finetune_runner(model, train, steps: int = 5):
    """The same fine-tune as a bare PyTorch loop: fresh AdamW, same batches, no probe."""

    def run() -> None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for batch in train[:steps]:
            optimizer.zero_grad(set_to_none=True)
            transformers_loss(model, batch).backward()
            optimizer.step()
        model.zero_grad(set_to_none=True)

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)  # CPU time then measures the work, not the machine's load
    torch.manual_seed(0)
    code, prose = stdlib_code(max_bytes=4_000_000), english_prose()
    reference = batches(code[-CONTEXT * args.batch * 4 :], 4, args.batch)
    train = batches(prose, 2 * STEPS, args.batch)
    held_out = batches(prose[-CONTEXT * args.batch * 2 :], 2, args.batch)

    model = make_model()
    probe_step, cool_step, train_step = [], [], []
    for _ in range(args.repeats):  # interleaved, so machine load hits all three alike
        train_step.append(train_step_seconds(code, args.batch))
        short = probe_seconds(model, reference, train, held_out, STEPS)
        long = probe_seconds(model, reference, train, held_out, 2 * STEPS)
        probe_step.append((long - short) / STEPS)
        short = cooldown_seconds(model, reference, train, STEPS)
        long = cooldown_seconds(model, reference, train, 2 * STEPS)
        cool_step.append((long - short) / STEPS)
    t_train, t_probe, t_cool = map(statistics.median, (train_step, probe_step, cool_step))

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    backup = ModelBackup(model).nbytes
    optimizer_state = 2 * params  # AdamW: exp_avg and exp_avg_sq (+ scalar steps)
    probe_peak = peak_extra_bytes(probe_runner(model, reference, train, held_out))
    plain_peak = peak_extra_bytes(plain_finetune_runner(make_model(), train))
    step_peak = peak_extra_bytes(train_step_runner(make_model(), train[0]))
    beyond_training = backup + probe_peak - step_peak
    budget = backup + optimizer_state + params  # + the fine-tune's own gradients

    results = {
        "model": "TinyCausalLM(n_layer=2, n_embd=64, context=128)",
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "train_step_seconds": t_train,
        "finetune_step_seconds": t_probe,
        "cooldown_step_seconds": t_cool,
        "finetune_step_over_train_step": t_probe / t_train,
        "cooldown_step_over_train_step": t_cool / t_train,
        "timing": "CPU seconds of this process (time.process_time)",
        "parameter_bytes": params,
        "backup_bytes": backup,
        "probe_peak_allocated_bytes": probe_peak,
        "plain_finetune_peak_allocated_bytes": plain_peak,
        "train_step_peak_allocated_bytes": step_peak,
        "peak_extra_beyond_a_training_step_bytes": beyond_training,
        "budget_bytes": budget,
        "probe_over_plain_finetune_bytes": probe_peak - plain_peak,
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "finetune_probe.json"), "w") as f:
        json.dump(results, f, indent=2)
    rows = [
        ("fine-tune probe step / training step", f"{t_probe / t_train:.2f}", "<= 1.2"),
        ("cooldown branch step / training step", f"{t_cool / t_train:.2f}", "<= 1.2"),
        (
            "probe peak memory beyond a training step's",
            f"{beyond_training / params:.2f} x params",
            f"~{budget / params:.0f} x params: backup 1 + AdamW state 2 + its gradients 1",
        ),
        (
            "a plain PyTorch AdamW fine-tune, beyond a training step's",
            f"{(plain_peak - step_peak) / params:.2f} x params",
            "AdamW state 2 + gradients 1",
        ),
        (
            "probe peak memory beyond a plain PyTorch fine-tune's",
            f"{(probe_peak - plain_peak) / params:.2f} x params",
            "small (the backup is counted above)",
        ),
    ]
    table = "| figure | measured | goal |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows
    )
    note = (
        f"\n\nTinyCausalLM (2 layers, d=64, context 128), batch {args.batch}, CPU,"
        f" {torch.get_num_threads()} thread(s), median of {args.repeats} interleaved repeats:"
        f" training step {t_train * 1e3:.1f} ms, fine-tune step {t_probe * 1e3:.1f} ms,"
        f" cooldown step {t_cool * 1e3:.1f} ms.\n"
    )
    with open(os.path.join(HERE, "results", "finetune_probe.md"), "w") as f:
        f.write(table + note)
    print(table + note)


if __name__ == "__main__":
    main()
