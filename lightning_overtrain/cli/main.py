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

# No torch, Lightning or engine import at the top: `--help` answers in well under a second
# (tests/test_package.py checks that it imports no torch).

DEFAULT_AUTO_CLASS = "transformers:AutoModelForCausalLM"
EXIT_OK, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-overtrain`` argument parser (``probe`` and ``report``)."""
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
        help="Lightning .ckpt files, save_pretrained directories, or directories holding them",
    )
    probe.add_argument("--out", required=True, metavar="RUN_DIR", help="where results go")

    group = probe.add_argument_group("loading")
    group.add_argument(
        "--module-class",
        metavar="CLASS",
        help="the LightningModule class of .ckpt files, as package.module:Class or file.py:Class",
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
        help="allow arbitrary Python objects in .ckpt files (only for files you trust)",
    )
    group.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)",
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
        "reference data", "Held-out pretraining text, evaluated identically at every checkpoint."
    )
    ref = group.add_mutually_exclusive_group(required=True)
    ref.add_argument("--reference-text", nargs="+", metavar="FILE", help="text files")
    ref.add_argument(
        "--reference-fn",
        metavar="CALLABLE",
        help="package.module:fn or file.py:fn returning batches (a list or a DataLoader)",
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
        help="loss_fn(model, batch) -> scalar mean loss (default: model(**batch).loss)",
    )
    group.add_argument(
        "--init-std",
        type=_positive_float,
        metavar="STD",
        help="the std the weights were initialized with (default: the monitor's state in a"
        " .ckpt, then a step-0 checkpoint's weights, then config.initializer_range)",
    )
    probe.add_argument("--no-progress", action="store_true", help="no progress bar")

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
        return probe_command(args) if args.command == "probe" else report_command(args.run_dir)
    except SeriesError as exc:
        print(f"lightning-overtrain {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
