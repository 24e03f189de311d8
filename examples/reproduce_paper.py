"""Catastrophic overtraining in miniature (Springer et al., arXiv 2503.19206), on 2 CPU cores.

Tiny byte-level GPT-2s (23k parameters: 1 layer, width 32, context 64; AdamW with
weight decay 0.1, constant lr after warm-up) are pretrained on Python sources (the
standard library, then the installed packages' ``.py`` files: 96 MB, so 46M tokens
read about half the training windows once and repeat none), one run per seed, to
2000 tokens per parameter. At sqrt(2)-spaced token counts each run branches off a
cooldown (20% of the steps so far, lr annealed linearly to 0, as if pretraining
stopped there) and the cooled branch is probed with the project's own engine:

* init-scaled Gaussian noise at gammas 0.25, 0.5 and 1 (antithetic pairs, common
  random numbers);
* a short fine-tune on English prose at a sweep of learning rates, with the lr tuned
  per snapshot (the fine-tune probe's ``finetune/tuned/*`` signals);
* the critical sharpness of Kalra et al. (arXiv 2601.16979) along AdamW's update and
  along the gradient.

:mod:`reproduce_analysis` turns the per-seed histories into the paper's checks:
where each signal bottoms out on each seed, what the project's detector says about
it, whether the noise probe's bottom precedes the fine-tune's, and the figure.

Why a cooldown branch per snapshot rather than the monitor's ``cooldown_steps``:
the paper anneals every token budget to zero lr, and a branch proportional to the
tokens so far (20%) keeps every snapshot equally annealed; the monitor's branch
has a fixed length. The branch itself is the monitor's :class:`CooldownBranch`.

Usage::

    python examples/reproduce_paper.py                      # full: 3 seeds in parallel
    python examples/reproduce_paper.py --fast               # smoke run for CI, < 60 s
    python examples/reproduce_paper.py --figure docs/reproduction.png \\
        --summary docs/reproduction.json                    # what the README shows
    python examples/reproduce_paper.py --report-only        # numbers and figure again,
                                                            # from the seeds' histories

Each seed's history goes to ``<out>/seed<k>/history.jsonl`` (``lightning-overtrain
report <out>`` renders them); the figure and the numbers go to ``--figure`` and
``--summary``. ``--report-only`` on seeds cut short compares the snapshots all of
them reached (``"incomplete": true`` in the numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sysconfig
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from reproduce_analysis import checks, curves, figure
from torch.utils.data import DataLoader, Subset

from lightning_overtrain import FineTuneProbe, NoiseProbe, ProbeContext, keys, read_history
from lightning_overtrain.cli.text import split_text
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.init_std import init_std_from_weights
from lightning_overtrain.engine.losses import transformers_loss
from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.engine.tokens import count_tokens
from lightning_overtrain.history import Record, write_history
from lightning_overtrain.probes.cooldown import CooldownBranch
from lightning_overtrain.probes.sharpness import SharpnessProbe
from lightning_overtrain.testing.demo import ByteWindows, TinyCausalLM, english_prose, stdlib_code


@dataclass(frozen=True)
class Settings:
    """One reproduction's settings (DESIGN.md section 4's prototype, scaled to fit)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    n_layer: int = 1
    n_embd: int = 32
    n_head: int = 2
    context: int = 64
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.1  # without it the norm grows and there is no clean U
    warmup_steps: int = 64
    start_tokens: int = 250_000  # first snapshot, past warm-up
    final_tokens: int = 46_000_000  # 2000 tokens per parameter (23k parameters)
    snapshot_ratio: float = math.sqrt(2)  # log-spaced snapshots
    cooldown_fraction: float = 0.2  # branch length, as a fraction of the steps so far
    gammas: tuple[float, ...] = (0.25, 0.5, 1.0)
    pairs: int = 4
    reference_batches: int = 16  # of 8 x context tokens: ~8k tokens
    finetune_steps: int = 50
    finetune_batch: int = 8
    finetune_lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)  # tuned per snapshot
    text_bytes: int = 96_000_000  # the standard library, then installed packages' sources

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context

    def snapshot_steps(self) -> list[int]:
        """Optimizer steps of the snapshots: log-spaced, ending at ``final_tokens``."""
        n = math.floor(math.log(self.final_tokens / self.start_tokens, self.snapshot_ratio))
        tokens = [self.start_tokens * self.snapshot_ratio**k for k in range(n + 1)]
        steps = {max(1, round(t / self.tokens_per_step)) for t in tokens}
        steps.add(round(self.final_tokens / self.tokens_per_step))
        return sorted(steps)


FULL = Settings()
FAST = replace(
    FULL,
    seeds=(0, 1),
    n_embd=32,
    context=64,
    batch_size=8,
    warmup_steps=8,
    start_tokens=4_096,
    final_tokens=32_768,
    snapshot_ratio=2.0,
    pairs=2,
    reference_batches=2,
    finetune_steps=4,
    finetune_lrs=(3e-4, 1e-3),
    text_bytes=1_000_000,
)


class CooledSnapshots(pl.Callback):
    """At each snapshot step: anneal a branch, probe it, put the live run back.

    Args:
        steps: the optimizer steps to probe at.
        settings: the run's settings (tokens per step, cooldown fraction).
        reference: held-out pretraining batches, the same at every snapshot.
        cooldown_batches: pretraining batches the branches train on, the same each time.
        probes: run on the cooled branch.
        out: where this run's ``history.jsonl`` goes.
        seed: seeds the branch's dropout.
    """

    def __init__(
        self,
        steps: Sequence[int],
        settings: Settings,
        reference: list[Any],
        cooldown_batches: list[Any],
        probes: list[Any],
        out: str,
        seed: int,
    ) -> None:
        self.steps, self.settings, self.seed = set(steps), settings, seed
        self.reference, self.cooldown_batches = reference, cooldown_batches
        self.probes, self.out = probes, out
        self.history: list[Record] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The monitor's defaults: init std measured from the weights at step 0.
        self.backup = ModelBackup(pl_module)
        self.optimizer = trainer.optimizers[0]  # the sharpness probe's update direction
        stds = init_std_from_weights(pl_module)
        self.sigmas = [stds[name] for name in self.backup.names]
        self.weights = [count_tokens(b) for b in self.reference]
        for probe in self.probes:
            probe.validate(self._context(pl_module))

    def _context(self, pl_module: pl.LightningModule) -> ProbeContext:
        return ProbeContext(
            module=pl_module,
            backup=self.backup,
            sigmas=self.sigmas,
            batches=self.reference,
            weights=self.weights,
            loss_fn=transformers_loss,
            extras={"optimizer": self.optimizer},
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in self.steps:
            return
        start = time.perf_counter()
        length = max(1, round(self.settings.cooldown_fraction * step))
        branch = CooldownBranch(pl_module, self.cooldown_batches, steps=length, seed=self.seed)
        optimizer = trainer.optimizers[0]

        def failed(what: str, exc: Exception) -> None:
            raise RuntimeError(f"the {what} probe failed at step {step}") from exc

        record: Record = {keys.TOKENS: step * self.settings.tokens_per_step, keys.STEP: step}
        record.update(
            measure_snapshot(
                self._context(pl_module),
                self.probes,
                failed,
                cooldown=lambda ctx: branch.branch(ctx, optimizer),
            )
        )
        record[keys.PROBE_SECONDS] = time.perf_counter() - start
        self.history.append(record)
        write_history(self.history, self.out)
        gamma1 = record.get(keys.noise_key(max(self.settings.gammas), "perturbed_loss"))
        print(
            f"  seed {self.seed}  {record[keys.TOKENS]:>11,} tokens  cooled loss"
            f" {record[keys.REFERENCE_LOSS]:.4f}  perturbed (gamma={max(self.settings.gammas):g})"
            f" {gamma1:.4f}  [{record[keys.PROBE_SECONDS]:.0f}s]",
            flush=True,
        )


# ---------------------------------------------------------------------- data and runs
def windows(text: bytes, context: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return list(DataLoader(ByteWindows(text, context), batch_size=batch_size))


def prepare_data(s: Settings) -> dict[str, Any]:
    """Split the code into training, cooldown and reference windows; prose to fine-tune on.

    The reference and cooldown windows are spread evenly over the corpus and never
    trained on, so both come from the pretraining distribution: the sources are in
    module order, and a contiguous slice would be one package's code. The cooldown
    windows are in a fixed random order, so a short branch (the first batches) is as
    representative as a long one.
    """
    code = ByteWindows(python_sources(s.text_bytes), s.context)
    n_reference = 8 * s.reference_batches
    n_cooldown = math.ceil(s.cooldown_fraction * s.snapshot_steps()[-1]) * s.batch_size
    spread = np.linspace(0, len(code) - 1, n_reference + n_cooldown).round().astype(int)
    every = len(spread) // n_reference
    reference = spread[::every][:n_reference]
    cooldown = np.random.default_rng(0).permutation(np.setdiff1d(spread, reference))
    train = np.setdiff1d(np.arange(len(code)), spread)
    prose_train, prose_eval = split_text(english_prose(), held_out=0.1)
    return {
        "train": Subset(code, train.tolist()),
        "cooldown": batched(code, cooldown, s.batch_size),
        "reference": batched(code, reference, 8),
        "finetune_train": windows(prose_train, s.context, s.finetune_batch)[: s.finetune_steps],
        "finetune_eval": windows(prose_eval, s.context, 8)[:8],
    }


def python_sources(max_bytes: int) -> bytes:
    """The standard library's sources, then the installed packages' ``.py`` files, in a fixed
    order, up to ``max_bytes``: real code on every machine the project runs on, no download.
    """
    text = stdlib_code(max_bytes)
    root = sysconfig.get_paths()["purelib"]
    chunks, total = [text], len(text)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if total >= max_bytes:
                return b"".join(chunks)[:max_bytes]
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), "rb") as f:
                    data = f.read()
                chunks.append(data)
                total += len(data)
    return b"".join(chunks)[:max_bytes]


def batched(data: ByteWindows, indices: np.ndarray, size: int) -> list[dict[str, torch.Tensor]]:
    """The windows at ``indices``, in that order, as batches of ``size``."""
    return list(DataLoader(Subset(data, indices.tolist()), batch_size=size))


def run_seed(seed: int, s: Settings, out: str, threads: int | None) -> tuple[list[Record], float]:
    """One seed's run (in this process or a worker); returns its history and CPU seconds."""
    if threads:
        torch.set_num_threads(threads)
    print(f"seed {seed}: pretraining to {s.final_tokens:,} tokens", flush=True)
    cpu = time.process_time()
    history = pretrain(seed, s, prepare_data(s), out)
    cpu = time.process_time() - cpu
    with open(os.path.join(out, f"seed{seed}", "run.json"), "w") as f:
        json.dump({"cpu_seconds": cpu, "torch_threads": torch.get_num_threads()}, f)
    return history, cpu


def read_seed(seed: int, out: str) -> tuple[list[Record], float | None]:
    """A finished seed's history and CPU seconds, from ``<out>/seed<k>``."""
    directory = os.path.join(out, f"seed{seed}")
    run = os.path.join(directory, "run.json")
    cpu = None
    if os.path.isfile(run):
        with open(run) as f:
            cpu = json.load(f)["cpu_seconds"]
    return read_history(os.path.join(directory, "history.jsonl")), cpu


def pretrain(seed: int, s: Settings, data: dict[str, Any], out: str) -> list[Record]:
    """One constant-lr run with cooled snapshots; returns its history."""
    pl.seed_everything(seed, verbose=False)
    model = TinyCausalLM(
        **_model_kwargs(s), lr=s.lr, weight_decay=s.weight_decay, warmup_steps=s.warmup_steps
    )
    probes = [
        NoiseProbe(gammas=s.gammas, pairs=s.pairs, seed=seed),
        FineTuneProbe(
            data["finetune_train"],
            data["finetune_eval"],
            steps=s.finetune_steps,
            lrs=s.finetune_lrs,
            seed=seed,
        ),
        # Kalra et al.'s critical sharpness along AdamW's next update, searched from the lr.
        SharpnessProbe("update", initial_step=s.lr),
        SharpnessProbe("gradient", name="sharpness_gradient"),
    ]
    steps = s.snapshot_steps()
    snapshots = CooledSnapshots(
        steps,
        s,
        data["reference"],
        data["cooldown"],
        probes,
        os.path.join(out, f"seed{seed}"),
        seed,
    )
    loader = DataLoader(
        data["train"],
        batch_size=s.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps[-1],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[snapshots],
    )
    trainer.fit(model, loader)
    return snapshots.history


# ---------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="a tiny smoke run (CI)")
    parser.add_argument("--out", default="runs/reproduce_paper", help="per-seed histories")
    parser.add_argument("--figure", help="the figure (default: <out>/reproduction.png)")
    parser.add_argument("--summary", help="the numbers (default: <out>/reproduction.json)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--jobs",
        type=int,
        help="seeds run in parallel processes, one thread each unless --threads (default: one"
        " per seed; 1 with --fast)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="no training: rebuild the numbers and the figure from <out>/seed<k>/history.jsonl",
    )
    args = parser.parse_args(argv)
    s = FAST if args.fast else FULL
    if args.seeds:
        s = replace(s, seeds=tuple(args.seeds))
    jobs = args.jobs or (1 if args.fast else len(s.seeds))
    figure_path = args.figure or os.path.join(args.out, "reproduction.png")
    summary_path = args.summary or os.path.join(args.out, "reproduction.json")

    start = time.perf_counter()
    if args.report_only:
        runs = [read_seed(seed, args.out) for seed in s.seeds]
    elif jobs > 1:
        # One process per seed: tiny matmuls use a core better alone than split in threads.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            work = [(seed, s, args.out, args.threads or 1) for seed in s.seeds]
            runs = list(pool.map(run_seed, *zip(*work)))
    else:
        runs = [run_seed(seed, s, args.out, args.threads) for seed in s.seeds]
    histories = [history for history, _ in runs]
    # A run cut short (--report-only on unfinished seeds): compare the snapshots all seeds reached.
    common = min(len(h) for h in histories)
    incomplete = any(len(h) > common for h in histories) or common < len(s.snapshot_steps())
    histories = [h[:common] for h in histories]
    cpu = [round(c, 1) for _, c in runs if c is not None]
    seconds = time.perf_counter() - start

    tokens = [int(r[keys.TOKENS]) for r in histories[0]]
    params = sum(p.numel() for p in TinyCausalLM(**_model_kwargs(s)).parameters())
    c = curves(histories)
    result = checks(tokens, c, s)
    summary = {
        "settings": asdict(s),
        "mode": "fast" if args.fast else "full",
        "parameters": params,
        "seconds": None if args.report_only else round(seconds, 1),
        "jobs": jobs,
        "incomplete": incomplete,
        "cpu_seconds_per_seed": cpu or None,
        "torch_threads": torch.get_num_threads(),
        "tokens": tokens,
        "tokens_per_parameter": [round(t / params, 2) for t in tokens],
        "checks": result,
        "curves": c,
    }
    os.makedirs(os.path.dirname(os.path.abspath(summary_path)), exist_ok=True)
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    figure(tokens, c, result, s, params, figure_path)
    print(json.dumps({"seconds": summary["seconds"], "checks": result}, indent=1))
    print(f"figure: {figure_path}\nnumbers: {summary_path}")
    return summary


def _model_kwargs(s: Settings) -> dict[str, Any]:
    return dict(n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head, context=s.context)


if __name__ == "__main__":
    main()
