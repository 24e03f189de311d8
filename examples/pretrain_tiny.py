"""Pretrain a tiny causal LM with the overtraining monitor on, on a laptop CPU.

The model is a byte-level GPT-2 built from a transformers config (no download);
the text is the Python standard library's own sources (or your files, ``--text``).
The monitor takes log-spaced snapshots in tokens and probes each with init-scaled
Gaussian noise and a short fine-tune; it prints one line per snapshot while the
progress bar runs, and the curves go to ``history.jsonl``/``history.csv``, PNG
plots, a CSV logger and an offline W&B run (``wandb sync`` uploads it later).

The gamma=1 perturbed loss bottoms out near 1.8M tokens and turns up after it: the
monitor warns in one line two snapshots later (5.6M tokens), naming the bottom and
the snapshot it keeps (``best.ckpt``). The run ends with a verdict per watched signal
and the kept snapshot in words; the last lines name every file written.

Usage::

    python examples/pretrain_tiny.py                  # about 5 minutes on 2 CPU cores
    python examples/pretrain_tiny.py --max-steps 50   # a smoke run
    python examples/pretrain_tiny.py --text my_corpus/*.txt
"""

from __future__ import annotations

import argparse
import json
import os
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader

from lightning_overtrain import FineTuneProbe, InflectionPolicy, NoiseProbe, OvertrainingMonitor
from lightning_overtrain.cli.text import read_text_files, split_text
from lightning_overtrain.reporting.loggers import WANDB_SILENT
from lightning_overtrain.testing.demo import (
    ByteWindows,
    TinyCausalLM,
    english_prose,
    quiet_known_warnings,
    stdlib_code,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--text", nargs="*", help="your own text files (default: the Python stdlib sources)"
    )
    parser.add_argument(
        "--out", default="runs/pretrain_tiny", help="where logs, curves and the W&B run go"
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=2500,
        help="optimizer steps (32 x 128 tokens each; 2500 passes the 10M-token snapshot)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--points-per-decade", type=int, default=4)
    parser.add_argument("--start-tokens", type=int, default=100_000)
    parser.add_argument("--finetune-steps", type=int, default=50, help="steps per fine-tune probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: enough for this 125k-parameter model, and no"
        " threads spinning against each other on a busy machine)",
    )
    parser.add_argument("--no-wandb", action="store_true", help="skip the offline W&B run")
    return parser.parse_args()


def files_written(out: str, wandb_run: str | None) -> list[str]:
    """Every file the run wrote under ``out`` (a W&B run directory counts as one entry)."""
    found = []
    for root, dirs, names in os.walk(out):
        if wandb_run is not None and os.path.abspath(root) == os.path.abspath(wandb_run):
            dirs[:] = []  # W&B's own bookkeeping: named once, below
            continue
        found.extend(os.path.join(root, name) for name in names)
    return sorted(found)


def main() -> None:
    args = parse_args()
    quiet_known_warnings()
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")  # real users: `wandb login` and unset this
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")
    pl.seed_everything(args.seed, verbose=False)

    text = read_text_files(args.text) if args.text else stdlib_code()
    train_text, held_out = split_text(text, held_out=0.02)
    train = DataLoader(
        ByteWindows(train_text, args.context),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
    )
    reference = DataLoader(ByteWindows(held_out, args.context), batch_size=8)

    # The downstream task is unlike the pretraining text: English prose for a code model.
    prose_train, prose_eval = split_text(english_prose(), held_out=0.05)
    finetune = FineTuneProbe(
        train_data=DataLoader(ByteWindows(prose_train, args.context), batch_size=8, shuffle=True),
        eval_data=DataLoader(ByteWindows(prose_eval, args.context), batch_size=8),
        eval_batches=8,
        steps=args.finetune_steps,
        lrs=(3e-4, 1e-3),
    )

    model = TinyCausalLM(n_layer=2, n_embd=64, n_head=2, context=args.context)
    monitor = OvertrainingMonitor(
        reference_data=reference,
        reference_tokens=8192,  # ~8k held-out tokens: a stable reference loss
        points_per_decade=args.points_per_decade,
        start_tokens=args.start_tokens,
        probes=[NoiseProbe(gammas=(0.25, 0.5, 1.0), pairs=4), finetune],
        # Keep the bottom of the gamma=1 perturbed loss: the curve that turns up in this run
        # (near 1.8M tokens), so best.ckpt is the snapshot the warning names.
        policy=InflectionPolicy(best_signal="noise/gamma=1/perturbed_loss"),
        dirpath=os.path.join(args.out, "overtrain"),
    )
    loggers: list = [CSVLogger(args.out, name="csv")]
    if not args.no_wandb:
        wandb_logger = WandbLogger(
            project="lightning-overtrain",
            save_dir=args.out,
            name="pretrain_tiny",
            # No W&B banner, offline notice or summary block: the run's files are named below.
            settings=WANDB_SILENT,
        )
        # Lightning 2.6 always passes `anonymous=None` to wandb.init, and wandb >= 0.19
        # warns on every run that the setting has no effect: leave it out (None is the default).
        if wandb_logger._wandb_init.get("anonymous", True) is None:
            del wandb_logger._wandb_init["anonymous"]
        loggers.append(wandb_logger)
    # The progress bar shows training; the monitor logs one line per snapshot (its
    # ConsoleReporter, through the `lightning.pytorch` logger).
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.max_steps,
        logger=loggers,
        callbacks=[monitor],
        log_every_n_steps=25,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, train)
    seconds = time.perf_counter() - start
    probe_seconds = sum(r["probe_seconds"] for r in monitor.history)
    summary = {
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": monitor.tokens,
        "snapshots": len(monitor.history),
        "fit_seconds": round(seconds, 1),
        "tokens_per_second": round(monitor.tokens / max(seconds - probe_seconds, 1e-9)),
        "monitor_seconds": round(probe_seconds, 2),
        "monitor_overhead": round(probe_seconds / max(seconds - probe_seconds, 1e-9), 4),
        "history": os.path.join(monitor.dirpath, "history.jsonl"),
        "history_csv": os.path.join(monitor.dirpath, "history.csv"),
    }
    wandb_run = None
    if not args.no_wandb:
        wandb_run = loggers[1].experiment.dir.removesuffix("/files")
        summary["wandb_run"] = wandb_run
        loggers[1].experiment.finish()
    summary["best_checkpoint"] = monitor.best_path
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n    step      tokens  reference_loss  delta(gamma=0.25, 0.5, 1)  forgetting(lr=1e-3)")
    for r in monitor.history:
        deltas = ", ".join(
            f"{r.get(f'noise/gamma={g:g}/delta', float('nan')):.4f}" for g in (0.25, 0.5, 1.0)
        )
        loss = r.get("reference_loss", float("nan"))
        forgetting = r.get("finetune/lr=0.001/forgetting", float("nan"))
        line = f"{r['step']:>8}  {r['tokens']:>10,}  {loss:>14.4f}  {deltas:>25}"
        print(f"{line}  {forgetting:>19.4f}")
    print(
        f"\n{summary['tokens']:,} tokens in {seconds:.0f} s, {summary['snapshots']} snapshots;"
        f" the monitor took {probe_seconds:.0f} s ({summary['monitor_overhead']:.0%} of training)."
    )
    if monitor.best_path is not None:
        print(
            f"Best snapshot (the bottom of {monitor.policy.best['signal']}) at"
            f" {monitor.best_tokens:,} tokens: {monitor.best_path}"
        )
    if wandb_run is not None:
        print(f"W&B run (offline; upload with `wandb sync {wandb_run}`): {wandb_run}")
    print("Files written:")
    for path in files_written(args.out, wandb_run):
        print(f"  {path}")


if __name__ == "__main__":
    main()
