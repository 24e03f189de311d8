"""``lightning-overtrain``: probe a series of checkpoints after the fact, or re-render a run.

``lightning-overtrain probe`` runs the monitor's own engine
(:func:`~lightning_overtrain.engine.snapshot.measure_snapshot` on a
:class:`~lightning_overtrain.engine.contract.ProbeContext`) over checkpoints ordered by
tokens, writes the same history files as a live run, and says where the
inflection is. ``lightning-overtrain report RUN_DIR`` re-renders the summary table,
the detector's verdict and the plots from any run's history.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

from lightning_overtrain.cli.exit_codes import EXIT_USAGE

# No torch, Lightning or engine import at the top: `--help` answers in well under a second
# (tests/test_package.py checks that it imports no torch).

DEFAULT_AUTO_CLASS = "transformers:AutoModelForCausalLM"


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-overtrain`` argument parser (``probe``, ``watch`` and ``report``)."""
    parser = argparse.ArgumentParser(
        prog="lightning-overtrain",
        description="Measure catastrophic overtraining (Springer et al., arXiv 2503.19206)"
        " on checkpoints you already have, with the same probes as the live monitor.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = _HelpFormatter
    probe = sub.add_parser(
        "probe",
        help="probe a series of checkpoints, ordered by tokens",
        description="Run the noise probe (or your probes) on every checkpoint, ordered by"
        " tokens, write history.jsonl/csv, a summary table and plots to --out, and print"
        " where the inflection is. Re-running skips checkpoints already in --out.",
        epilog="examples:\n"
        "  lightning-overtrain probe lightning_logs/version_0/checkpoints --out runs/probe \\\n"
        "      --module-class my_project.model:MyLM --reference-text held_out.txt \\\n"
        "      --tokenizer bytes\n"
        "  lightning-overtrain probe pythia-160m/ --out runs/pythia --init-std 0.02 \\\n"
        "      --tokens-pattern 'step(?P<step>\\d+)' --tokens-per-step 2097152 \\\n"
        "      --reference-text pile_val.txt --context 2048 --batch-size 4",
        formatter_class=fmt,
    )
    probe.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="Lightning .ckpt files or distributed checkpoint directories, save_pretrained"
        " directories, torchtitan step-N/ or OLMo-core stepN/ directories, or directories"
        " holding them",
    )
    probe.add_argument("--out", required=True, metavar="RUN_DIR", help="where results go")
    add_series_options(probe)
    probe.add_argument(
        "--mix-runs",
        action="store_true",
        help="probe checkpoints of several runs as one series (by default only the run with"
        " the most checkpoints is probed and the others are listed as skipped)",
    )
    add_watch_parser(sub, fmt)

    report = sub.add_parser(
        "report",
        help="re-render the summary table, inflection and plots of a run",
        description="Read a run's history.jsonl (written by OvertrainingMonitor or by"
        " `probe`), print a summary table and the detector's verdict per signal, and"
        " re-render the plots next to it.",
        formatter_class=fmt,
    )
    report.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a directory holding history.jsonl, or a log directory with it one level down",
    )
    return parser


def add_series_options(probe: argparse.ArgumentParser) -> None:
    """The options `probe` and `watch` share: loading, tokens, reference data, probes."""
    group = probe.add_argument_group("loading")
    group.add_argument(
        "--module-class",
        metavar="CLASS",
        help="the LightningModule class of .ckpt files: package.module:Class (resolved from"
        " the current directory first, as `python -m` would) or path/to/file.py:Class",
    )
    group.add_argument(
        "--dcp-key",
        metavar="PREFIX",
        help="the key prefix of the model's tensors in a distributed checkpoint, e.g."
        " `state_dict` (Lightning ModelParallelStrategy), `model` (Lightning FSDPStrategy,"
        " OLMo-core), '' (torchtitan) (default: from the layout, else the one prefix that"
        " holds every key of the model)",
    )
    group.add_argument(
        "--auto-class",
        default=DEFAULT_AUTO_CLASS,
        metavar="CLASS",
        help="the class whose from_pretrained loads save_pretrained directories",
    )
    group.add_argument(
        "--unsafe-load",
        action="store_true",
        help="allow arbitrary Python objects in .ckpt, meta.pt and DCP .metadata files"
        " (only for files you trust)",
    )
    group.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)",
    )
    group.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="torch CPU threads (default: 1 on a CPU, or OMP_NUM_THREADS when set; torch's"
        " own default on a GPU): small probes on shared cores run fastest with one",
    )
    group.add_argument(
        "--precision",
        default="32-true",
        choices=("32-true", "16-mixed", "bf16-mixed"),
        help="the precision of every forward pass, as in a Lightning Trainer",
    )

    group = probe.add_argument_group(
        "tokens",
        "Default: read from each checkpoint (the monitor's counted tokens, or"
        " trainer_state.json), else its step times --tokens-per-step.",
    )
    how = group.add_mutually_exclusive_group()
    how.add_argument(
        "--tokens-pattern",
        metavar="REGEX",
        help="read tokens from each path: a regex with a named group `tokens` (4B, 2.3T and"
        " 1_000 are understood) or `step` (times --tokens-per-step)",
    )
    how.add_argument(
        "--tokens-map",
        metavar="FILE",
        help="a JSON object {checkpoint: tokens} or a CSV with columns checkpoint,tokens",
    )
    group.add_argument(
        "--tokens-per-step",
        type=_positive_int,
        metavar="N",
        help="tokens per optimizer step of the whole run",
    )

    group = probe.add_argument_group(
        "reference data",
        "Held-out pretraining text, evaluated identically at every checkpoint."
        " --reference-text (and --downstream-text) is tokenized by --tokenizer and cut into"
        " non-overlapping sequences of --context tokens; each batch is a dict"
        " {'input_ids': LongTensor[--batch-size, --context]}, which the default loss passes"
        " as model(input_ids=..., labels=input_ids) and a --loss-fn receives as it is.",
    )
    ref = group.add_mutually_exclusive_group(required=True)
    ref.add_argument(
        "--reference-text",
        nargs="+",
        metavar="FILE",
        help="text files, made into {'input_ids': LongTensor[B, T]} batches (see above)",
    )
    ref.add_argument(
        "--reference-fn",
        metavar="CALLABLE",
        help="package.module:fn or file.py:fn returning batches in your model's format (a"
        " list or a DataLoader), e.g. (x, y) tuples with a --loss-fn for them",
    )
    group.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="`bytes` for byte-level models, or a transformers tokenizer (default: the one"
        " saved in the first save_pretrained directory)",
    )
    group.add_argument(
        "--context",
        type=_positive_int,
        default=128,
        metavar="N",
        help="tokens per sequence cut from --reference-text",
    )
    group.add_argument(
        "--batch-size",
        type=_positive_int,
        default=8,
        metavar="N",
        help="sequences per reference batch",
    )
    group.add_argument(
        "--reference-batches",
        type=_positive_int,
        default=8,
        metavar="N",
        help="reference batches to keep (about 8k tokens is enough)",
    )

    group = probe.add_argument_group("probes")
    group.add_argument(
        "--gammas",
        type=_positive_float,
        nargs="+",
        default=[0.25, 0.5, 1.0],
        metavar="G",
        help="noise magnitudes, as multiples of the init std",
    )
    group.add_argument(
        "--pairs",
        type=_positive_int,
        default=4,
        metavar="N",
        help="antithetic noise pairs per gamma",
    )
    group.add_argument("--seed", type=int, default=0, help="the probes' seed")
    group.add_argument(
        "--downstream-text",
        nargs="+",
        metavar="FILE",
        help="add the fine-tune probe: text unlike the pretraining data (the last 10%% is"
        " held out to measure adaptation), tokenized like --reference-text",
    )
    group.add_argument(
        "--finetune-lrs",
        type=_positive_float,
        nargs="+",
        default=[1e-4, 1e-3],
        metavar="LR",
        help="the fine-tune probe's learning rates (AdamW)",
    )
    group.add_argument(
        "--finetune-steps",
        type=_positive_int,
        default=100,
        metavar="N",
        help="the fine-tune probe's optimizer steps, of --batch-size sequences",
    )
    group.add_argument(
        "--probes-fn",
        metavar="CALLABLE",
        help="package.module:fn returning a list of Probe objects (replaces the noise and"
        " fine-tune options)",
    )
    group.add_argument(
        "--loss-fn",
        metavar="CALLABLE",
        help="package.module:fn or file.py:fn, loss_fn(model, batch) -> scalar mean"
        " next-token loss of a reference batch; needed for a model that is not a transformers"
        " model (default: model(**batch).loss, checked on the first checkpoint)",
    )
    group.add_argument(
        "--init-std",
        type=_positive_float,
        metavar="STD",
        help="the std the weights were initialized with (default: the monitor's state in a"
        " .ckpt, then a step-0 checkpoint's weights, then config.initializer_range)",
    )
    probe.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_watch_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """``watch DIR``: the options of ``probe``, plus following a live run and acting on it."""
    watch = sub.add_parser(
        "watch",
        help="probe a live run's checkpoints as they are written, from another process",
        description="Follow DIR while a run writes checkpoints into it; probe each one once it"
        " is completely written, in token order, on --device; keep history.jsonl/csv, the"
        " summary, the detector's verdict and the plots in --out up to date (and a W&B run"
        " with --wandb-project). When the policy decides to stop, write"
        " DIR/overtrain_stop.json: a run with the WatcherStop callback stops at its next"
        " check; without it, the decision is a warning. Stops when the run's"
        " DIR/overtrain_run.json says it has ended and every checkpoint is probed, or after"
        " --idle-timeout. Restarting it resumes: nothing is probed twice.",
        epilog="examples:\n"
        "  # the training job: ModelCheckpoint(dirpath='ckpt', every_n_train_steps=1000,\n"
        "  #     save_top_k=-1) and WatcherStop('ckpt') in its callbacks\n"
        "  lightning-overtrain watch ckpt --out runs/watch --device cuda:1 \\\n"
        "      --module-class my_project.model:MyLM --reference-text held_out.txt \\\n"
        "      --tokenizer bytes --tokens-per-step 524288 --action stop \\\n"
        "      --wandb-project pretrain",
        formatter_class=fmt,
    )
    watch.add_argument("dir", metavar="DIR", help="the directory the run writes checkpoints to")
    watch.add_argument("--out", required=True, metavar="RUN_DIR", help="where results go")
    add_series_options(watch)
    group = watch.add_argument_group("following")
    group.add_argument(
        "--poll",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="look at DIR this often; a checkpoint is probed once it is unchanged over one poll",
    )
    group.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="stop after this long without a new checkpoint (default: wait until the run's"
        " overtrain_run.json says it has ended)",
    )
    group = watch.add_argument_group("policy")
    group.add_argument(
        "--action",
        choices=("warn", "stop"),
        default="warn",
        help="what an inflection or a --threshold does: warn, or stop the run (WatcherStop)",
    )
    group.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="KEY=LIMIT",
        help="act when a record's value exceeds LIMIT (repeat the option for more keys), e.g."
        " --threshold noise/gamma=1/relative_delta=0.05",
    )
    group = watch.add_argument_group("W&B")
    group.add_argument("--wandb-project", metavar="NAME", help="log every record to W&B")
    group.add_argument("--wandb-entity", metavar="NAME", help="the W&B entity (team)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one, and keeps the examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 some checkpoints failed, 2 usage).

    Example::

        main(["report", "lightning_logs/version_0/overtrain"])
    """
    args = build_parser().parse_args(argv)
    # Imported here: `--help` needs neither torch nor the engine.
    from lightning_overtrain.cli.probe import probe_command
    from lightning_overtrain.cli.report import report_command
    from lightning_overtrain.cli.series import SeriesError

    try:
        if args.command == "watch":
            from lightning_overtrain.cli.watch import watch_command

            return watch_command(args)
        return probe_command(args) if args.command == "probe" else report_command(args.run_dir)
    except SeriesError as exc:
        print(f"lightning-overtrain {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
