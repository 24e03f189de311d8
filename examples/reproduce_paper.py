"""Catastrophic overtraining in miniature (Springer et al., arXiv 2503.19206), on 2 CPU cores.

Tiny byte-level GPT-2s (8.4k parameters: 1 layer, width 16, context 64; AdamW with
weight decay 0.1, constant lr after warm-up) are pretrained on a pinned corpus of
Python sources (:mod:`lightning_overtrain.testing.corpus`: the standard library,
then torch's sources; its sha256 goes into the results), one process per seed, to
4000 tokens per parameter with no window read twice. At sqrt(2)-spaced token
counts each run branches off a cooldown (10% of the steps so far, lr annealed
linearly to 0, as if pretraining stopped there) and the cooled branch is probed
with the project's own engine:

* init-scaled Gaussian noise at gammas 0.25, 0.5 and 1 (antithetic pairs, the same
  directions at every snapshot), each direction recorded on its own so the analysis
  can resample them;
* a fine-tune on a text pretraining barely teaches (English prose in the upper half
  of the byte range) at a sweep of learning rates, the lr tuned per snapshot;
* the critical sharpness of Kalra et al. (arXiv 2601.16979) along AdamW's update
  and along the gradient.

:mod:`reproduce_analysis` turns the per-seed histories into the paper's checks, with
standard errors on every curve and intervals on every bottom and lead.

Usage::

    python examples/reproduce_paper.py --publish     # docs/reproduction.json and .png, the
                                                     # histories in benchmarks/results/reproduction
    python examples/reproduce_paper.py --fast        # smoke run for CI, well under a minute
    python examples/reproduce_paper.py --publish --report-only   # numbers and figure again,
                                                     # from <out>/seed<k>/history.jsonl

Each seed writes ``<out>/seed<k>/history.jsonl`` after every snapshot and
``run.json`` (corpus fingerprint, CPU seconds) as it goes, so a run cut short keeps
what it measured; ``--report-only`` uses every snapshot each seed reached. A run
whose corpus differs from the one recorded in the results it would overwrite says
how and stops, unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from reproduce_analysis import analyse
from reproduce_figure import figure
from reproduce_snapshots import CooledSnapshots, DirectionNoiseProbe
from reproduce_tables import replace_block, tables
from torch.utils.data import DataLoader, Subset

from lightning_overtrain import FineTuneProbe, read_history
from lightning_overtrain.cli.text import split_text
from lightning_overtrain.probes.sharpness import SharpnessProbe
from lightning_overtrain.testing.corpus import (
    CorpusFingerprint,
    corpus_differences,
    foreign_prose,
    pinned_code,
)
from lightning_overtrain.testing.demo import ByteWindows, TinyCausalLM, quiet_known_warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Settings:
    """One reproduction's settings."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_layer: int = 1
    n_embd: int = 16
    n_head: int = 2
    context: int = 64
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.1  # without it the norm grows and there is no clean U
    warmup_steps: int = 64
    start_tokens: int = 131_072  # no snapshot before this (past warm-up)
    final_tokens: int = 33_816_576  # 16,512 steps: 4010 tokens per parameter (8,432 parameters)
    snapshot_ratio: float = math.sqrt(2)  # log-spaced snapshots
    cooldown_fraction: float = 0.1  # branch length, as a fraction of the steps so far
    gammas: tuple[float, ...] = (0.25, 0.5, 1.0)
    pairs: int = 4  # noise directions (antithetic pairs)
    reference_batches: int = 16  # of 8 x context tokens: ~8k tokens
    finetune_steps: int = 200  # 200 x 16 x 64 = 205k tokens of downstream text, read once
    finetune_batch: int = 16
    finetune_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)  # tuned per snapshot
    text_bytes: int = 42_000_000  # training windows + held-out cooldown and reference windows

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context

    def snapshot_steps(self) -> list[int]:
        """Optimizer steps of the snapshots: log-spaced back from ``final_tokens``."""
        n = math.floor(math.log(self.final_tokens / self.start_tokens, self.snapshot_ratio))
        tokens = [self.final_tokens / self.snapshot_ratio ** (n - k) for k in range(n + 1)]
        return sorted({max(1, round(t / self.tokens_per_step)) for t in tokens})

    def model_kwargs(self) -> dict[str, int]:
        return dict(
            n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head, context=self.context
        )


FULL = Settings()
FAST = replace(
    FULL,
    seeds=(0, 1),
    batch_size=8,
    warmup_steps=8,
    start_tokens=4_096,
    final_tokens=32_768,
    snapshot_ratio=2.0,
    pairs=2,
    reference_batches=2,
    finetune_steps=4,
    finetune_batch=8,
    finetune_lrs=(1e-3, 1e-2),
    text_bytes=1_000_000,
)


# ---------------------------------------------------------------------- data and runs
def prepare_data(s: Settings) -> dict[str, Any]:
    """Split the code into training, cooldown and reference windows; the downstream text.

    The reference and cooldown windows are spread evenly over the corpus and never
    trained on, so both come from the pretraining distribution: the sources are in
    module order, and a contiguous slice would be one package's code. The cooldown
    windows are in a fixed random order, so a short branch (the first batches) is as
    representative as a long one.
    """
    text, fingerprint = pinned_code(s.text_bytes)
    code = ByteWindows(text, s.context)
    n_reference = 8 * s.reference_batches
    n_cooldown = math.ceil(s.cooldown_fraction * s.snapshot_steps()[-1]) * s.batch_size
    spread = np.linspace(0, len(code) - 1, n_reference + n_cooldown).round().astype(int)
    every = len(spread) // n_reference
    reference = spread[::every][:n_reference]
    cooldown = np.random.default_rng(0).permutation(np.setdiff1d(spread, reference))
    train = np.setdiff1d(np.arange(len(code)), spread)
    down_train, down_eval = split_text(foreign_prose(), held_out=0.1)
    return {
        "fingerprint": fingerprint,
        "train": Subset(code, train.tolist()),
        "cooldown": _batched(code, cooldown, s.batch_size),
        "reference": _batched(code, reference, 8),
        "finetune_train": _windows(down_train, s.context, s.finetune_batch)[: s.finetune_steps],
        "finetune_eval": _windows(down_eval, s.context, 8)[:8],
    }


def _windows(text: bytes, context: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return list(DataLoader(ByteWindows(text, context), batch_size=batch_size))


def _batched(data: ByteWindows, indices: np.ndarray, size: int) -> list[dict[str, torch.Tensor]]:
    """The windows at ``indices``, in that order, as batches of ``size``."""
    return list(DataLoader(Subset(data, indices.tolist()), batch_size=size))


def run_seed(seed: int, s: Settings, out: str) -> None:
    """One seed's run, in its own process with one thread; writes ``<out>/seed<k>``."""
    torch.set_num_threads(1)  # tiny matmuls use a core better alone than split in threads
    quiet_known_warnings()
    directory = os.path.join(out, f"seed{seed}")
    os.makedirs(directory, exist_ok=True)
    start, cpu = time.perf_counter(), time.process_time()
    data = prepare_data(s)
    pl.seed_everything(seed, verbose=False)
    model = TinyCausalLM(
        **s.model_kwargs(), lr=s.lr, weight_decay=s.weight_decay, warmup_steps=s.warmup_steps
    )
    run = {
        "seed": seed,
        "corpus": data["fingerprint"].to_dict(),
        "torch_threads": torch.get_num_threads(),
        "downstream_loss_at_init": _mean_loss(model, data["finetune_eval"]),
        "reference_loss_at_init": _mean_loss(model, data["reference"]),
    }
    _write_json(os.path.join(directory, "run.json"), run)

    def progress(history: list[dict[str, float]]) -> None:
        run.update(
            snapshots=len(history),
            cpu_seconds=round(time.process_time() - cpu, 1),
            wall_seconds=round(time.perf_counter() - start, 1),
        )
        _write_json(os.path.join(directory, "run.json"), run)

    probes = [
        DirectionNoiseProbe(gammas=s.gammas, pairs=s.pairs, seed=seed),
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
        s.tokens_per_step,
        s.cooldown_fraction,
        data["reference"],
        data["cooldown"],
        probes,
        directory,
        seed,
        on_snapshot=progress,
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
    print(f"seed {seed}: pretraining to {s.final_tokens:,} tokens", flush=True)
    trainer.fit(model, loader)
    run["finished"] = True
    progress(snapshots.history)


@torch.no_grad()
def _mean_loss(model: TinyCausalLM, batches: list[dict[str, torch.Tensor]]) -> float:
    losses = [model(**b, labels=b["input_ids"]).loss.item() for b in batches]
    return float(np.mean(losses))


def _write_json(path: str, value: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def read_seed(seed: int, out: str) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """A seed's history (the snapshots it reached) and its ``run.json``."""
    directory = os.path.join(out, f"seed{seed}")
    with open(os.path.join(directory, "run.json")) as f:
        run = json.load(f)
    history_path = os.path.join(directory, "history.jsonl")
    return (read_history(history_path) if os.path.isfile(history_path) else []), run


# ---------------------------------------------------------------------- main
def refuse_other_corpus(summary_path: str, corpus: dict[str, Any], force: bool) -> None:
    """Stop before overwriting results measured on another corpus (unless ``force``)."""
    if not os.path.isfile(summary_path):
        return
    with open(summary_path) as f:
        published = json.load(f).get("corpus")
    if published == corpus:
        return
    why = corpus_differences(published, CorpusFingerprint(**corpus))
    message = f"The corpus differs from the one in {summary_path}:\n  " + "\n  ".join(why)
    if not force:
        sys.exit(f"{message}\nNot overwriting it: pass --force to replace those results.")
    print(f"{message}\n--force: replacing those results.", flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="a tiny smoke run (CI)")
    parser.add_argument(
        "--out",
        help="per-seed histories (default: runs/reproduce_paper; with --publish,"
        " benchmarks/results/reproduction)",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="write the published results: docs/reproduction.json and .png, the tables of"
        " docs/reproduction.md, the histories",
    )
    parser.add_argument("--figure", help="the figure (default: <out>/reproduction.png)")
    parser.add_argument("--summary", help="the numbers (default: <out>/reproduction.json)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument("--jobs", type=int, help="seeds run at once (default: all of them)")
    parser.add_argument("--force", action="store_true", help="overwrite other-corpus results")
    parser.add_argument(
        "--machine", help="the machine and its state during the run, e.g. '2 cores, idle'"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="no training: rebuild the numbers and the figure from <out>/seed<k>/",
    )
    args = parser.parse_args(argv)
    s = FAST if args.fast else FULL
    if args.seeds:
        s = replace(s, seeds=tuple(args.seeds))
    docs = os.path.join(ROOT, "docs")
    if args.out is None:
        published = os.path.join(ROOT, "benchmarks", "results", "reproduction")
        args.out = published if args.publish else "runs/reproduce_paper"
    where = docs if args.publish else args.out
    figure_path = args.figure or os.path.join(where, "reproduction.png")
    summary_path = args.summary or os.path.join(where, "reproduction.json")
    start = time.perf_counter()
    if not args.report_only:
        refuse_other_corpus(summary_path, pinned_code(s.text_bytes)[1].to_dict(), args.force)
        n = len(s.seeds)
        with ProcessPoolExecutor(args.jobs or n, mp_context=get_context("spawn")) as pool:
            list(pool.map(run_seed, s.seeds, [s] * n, [args.out] * n))
    runs = [read_seed(seed, args.out) for seed in s.seeds]
    corpora = {json.dumps(run["corpus"], sort_keys=True) for _, run in runs}
    if len(corpora) > 1:
        sys.exit(f"The seeds in {args.out} read different corpora: {sorted(corpora)}")
    corpus = runs[0][1]["corpus"]
    if args.report_only:
        refuse_other_corpus(summary_path, corpus, args.force)
    summary = summarize(s, runs, corpus, args, time.perf_counter() - start)
    os.makedirs(os.path.dirname(os.path.abspath(summary_path)), exist_ok=True)
    _write_json(summary_path, summary)
    figure(summary, figure_path)
    if args.publish:
        page = os.path.join(docs, "reproduction.md")
        with open(page) as f:
            text = replace_block(f.read(), tables(summary))
        with open(page, "w") as f:
            f.write(text)
        print(f"tables: {page}")
    print(json.dumps(summary["headline"], indent=1))
    print(f"figure: {figure_path}\nnumbers: {summary_path}")
    return summary


def summarize(s: Settings, runs: list, corpus: dict, args: Any, seconds: float) -> dict[str, Any]:
    """The published results: settings, corpus, what each seed reached, the analysis."""
    params = sum(p.numel() for p in TinyCausalLM(**s.model_kwargs()).parameters())
    histories = [history for history, _ in runs]
    planned = len(s.snapshot_steps())
    return {
        "settings": asdict(s),
        "mode": "fast" if args.fast else "full",
        "corpus": corpus,
        "parameters": params,
        "planned_snapshots": planned,
        "seeds_reached": {
            str(seed): {
                "snapshots": len(h),
                "tokens": int(h[-1]["tokens"]) if h else 0,
                "tokens_per_parameter": round(h[-1]["tokens"] / params, 1) if h else 0,
                "finished": bool(run.get("finished")),
                "cpu_seconds": run.get("cpu_seconds"),
                "wall_seconds": run.get("wall_seconds"),
                "downstream_loss_at_init": run["downstream_loss_at_init"],
            }
            for seed, (h, run) in zip(s.seeds, runs)
        },
        "incomplete": any(len(h) < planned for h in histories),
        "machine": args.machine,
        "seconds": None if args.report_only else round(seconds, 1),
        **analyse(histories, [run for _, run in runs], s, params),
    }


if __name__ == "__main__":
    main()
