"""``lightning-overtrain``: probe a series of checkpoints after the fact, or re-render a run.

``lightning-overtrain probe`` runs the monitor's own engine
(:func:`~lightning_overtrain.snapshot.measure_snapshot` on a
:class:`~lightning_overtrain.probes.base.ProbeContext`) over checkpoints ordered by
tokens, writes the same history files as a live run, and says where the
inflection is. ``lightning-overtrain report RUN_DIR`` re-renders the summary table,
the detector's verdict and the plots from any run's history.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from lightning_overtrain import naming
from lightning_overtrain.borrow import ModelBackup
from lightning_overtrain.callbacks.monitor import take_reference_set
from lightning_overtrain.demo import read_text_files, split_text
from lightning_overtrain.history import Record, columns, read_history, write_history
from lightning_overtrain.inflection import DEFAULT_MIN_POINTS, InflectionState
from lightning_overtrain.losses import transformers_loss
from lightning_overtrain.policy import InflectionPolicy
from lightning_overtrain.probes.base import Probe, ProbeContext
from lightning_overtrain.probes.finetune import FineTuneProbe
from lightning_overtrain.probes.noise import NoiseProbe
from lightning_overtrain.series import (
    DEFAULT_AUTO_CLASS,
    LIGHTNING,
    TRANSFORMERS,
    Checkpoint,
    CheckpointError,
    SeriesError,
    SeriesInitStd,
    find_checkpoints,
    import_object,
    load_model,
    order_series,
    read_metadata,
    tokens_from_checkpoint,
    tokens_from_mapping,
    tokens_from_pattern,
)
from lightning_overtrain.snapshot import measure_snapshot
from lightning_overtrain.tokens import count_tokens

EXIT_OK, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2
# The summary table's columns; per-layer and diagnostic keys stay in history.csv.
SUMMARY_COLUMNS = re.compile(
    r"^(reference_loss|noise/gamma=[^/]+/(perturbed_loss|delta)|[^/]+/lr=[^/]+/forgetting)$"
)
_JUDGED = ("inflection/", "best/")  # keys the policy adds; recomputed by `judge`
_SETTINGS_FILE = "monitor.json"
_SUMMARY_FILE = "summary.md"
_INFLECTION_FILE = "inflection.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


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
    try:
        return probe_command(args) if args.command == "probe" else report_command(args.run_dir)
    except SeriesError as exc:
        print(f"lightning-overtrain {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


# ---------------------------------------------------------------------- probe
def probe_command(args: argparse.Namespace) -> int:
    """``lightning-overtrain probe``: see ``lightning-overtrain probe --help``."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ordered, failures = _collect_series(args)
    module_class = _module_class(args, ordered)
    auto_class = (
        import_object(args.auto_class, "--auto-class")
        if any(c.kind == TRANSFORMERS for c in ordered)
        else None
    )

    def load(ckpt: Checkpoint) -> nn.Module:
        return load_model(ckpt, module_class, auto_class, device, args.unsafe_load)

    tokenize = _tokenizer(args, ordered)
    batches, weights = _reference_set(args, tokenize, device)
    probes = _probes(args, tokenize)
    loss_fn = import_object(args.loss_fn, "--loss-fn") if args.loss_fn else transformers_loss
    init = SeriesInitStd(args.init_std, ordered, load)
    settings = {
        "cadence": "checkpoint series",
        "probes": {p.name: p.config() for p in probes},
        "reference_batches": len(batches),
        "reference_tokens": sum(weights),
        "loss_fn": getattr(loss_fn, "__name__", repr(loss_fn)),
        "token_offset": 0,
        "precision": args.precision,
        "prefix": "overtrain",
        "source": "lightning-overtrain probe",
    }
    history = _resume(args.out, settings)
    # Tokens = 0 has no place on a log axis: such a checkpoint only gives the init std.
    series = [c for c in ordered if c.tokens]
    done = {int(r[naming.TOKENS]) for r in history}
    todo = [c for c in series if c.tokens not in done]
    print(
        f"{len(series)} checkpoint(s) from {series[0].tokens:,} to {series[-1].tokens:,} tokens"
        f" ({len(series) - len(todo)} already probed), reference set of {sum(weights):,} tokens"
        if series
        else "no checkpoint with tokens > 0 to probe"
    )

    context = {
        "init": init,
        "batches": batches,
        "weights": weights,
        "loss_fn": loss_fn,
        "forward_context": _forward_context(args.precision, device),
    }
    probe_failures = int(history[-1].get(naming.PROBE_FAILURES, 0)) if history else 0
    bar = _progress(len(todo), args.no_progress)
    validated = False  # the probes check the set-up on the first checkpoint that loads
    for ckpt in todo:
        try:
            record = _probe_checkpoint(ckpt, load, probes, bar, validate=not validated, **context)
            validated = True
        except CheckpointError as exc:
            probe_failures += 1
            failures.append((ckpt.path, str(exc)))
            continue
        finally:
            bar.update(1)
        record[naming.PROBE_FAILURES] = probe_failures
        history = sorted([*history, record], key=lambda r: r[naming.TOKENS])
        write_history(history, args.out)  # after every checkpoint: an interrupted run resumes
    bar.close()

    policy = InflectionPolicy()
    settings["policy"] = policy.config()
    settings["init_std_source"] = init.source
    settings["checkpoints"] = [
        {"path": c.path, "tokens": c.tokens, "step": c.step, "tokens_from": c.tokens_source}
        for c in series
    ]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, _SETTINGS_FILE), "w") as f:
        json.dump(settings, f, indent=2, default=str)
    if history:
        write_history(render_report(history, args.out, policy), args.out)
        best = policy.best
        if best is not None:
            path = next(c.path for c in series if c.tokens == best["tokens"])
            print(f"the checkpoint at the bottom of {best['signal']} (to fine-tune): {path}")
    if failures:
        print(f"\n{len(failures)} checkpoint(s) failed (the others were probed):", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
        return EXIT_FAILURES
    return EXIT_OK


def _collect_series(args: argparse.Namespace) -> tuple[list[Checkpoint], list[tuple[str, str]]]:
    """The checkpoints in token order, and ``(path, reason)`` for those that cannot be used."""
    if args.tokens_pattern is not None:
        rule = tokens_from_pattern(args.tokens_pattern, args.tokens_per_step)
    elif args.tokens_map is not None:
        rule = tokens_from_mapping(args.tokens_map)
    else:
        rule = tokens_from_checkpoint(args.tokens_per_step)
    found, failures = find_checkpoints(args.checkpoints)
    readable = []
    for ckpt in found:
        try:
            read_metadata(ckpt, args.unsafe_load)
            readable.append(ckpt)
        except CheckpointError as exc:
            failures.append((ckpt.path, str(exc)))
    ordered, unknown, duplicates = order_series(readable, rule)
    for dropped, kept in duplicates:
        print(f"skipping {dropped.path}: same tokens ({dropped.tokens:,}) as {kept.path}")
    return ordered, failures + unknown


def _probe_checkpoint(
    ckpt: Checkpoint,
    load: Callable[[Checkpoint], nn.Module],
    probes: list[Probe],
    bar: Any,
    *,
    validate: bool,
    init: SeriesInitStd,
    batches: list[Any],
    weights: list[int],
    loss_fn: Any,
    forward_context: Callable[[], AbstractContextManager[Any]],
) -> Record:
    """One checkpoint's record, measured as the monitor would; the model is freed on return.

    Raises:
        CheckpointError: if it cannot be loaded or a probe failed on it.
        SeriesError: if a probe rejects the set-up (checked on the first checkpoint).
    """
    name = os.path.basename(os.path.normpath(ckpt.path))
    bar.set_postfix_str(f"{name}: loading")
    model = load(ckpt)
    backup = ModelBackup(model)
    ctx = ProbeContext(
        module=model,
        backup=backup,
        sigmas=init.sigmas(model, backup.names),
        batches=batches,
        weights=weights,
        loss_fn=loss_fn,
        forward_context=forward_context,
    )
    if validate:
        for probe in probes:
            try:
                probe.validate(ctx)
            except ValueError as exc:
                raise SeriesError(f"the {probe.name} probe: {exc}") from exc
        print(f"init std from {init.source}")
    errors: list[str] = []
    start = time.perf_counter()
    measured = measure_snapshot(
        ctx,
        [_Announced(p, bar, name) for p in probes],
        lambda what, exc: errors.append(f"the {what} probe failed: {exc}"),
    )
    if errors:
        raise CheckpointError("; ".join(errors))
    step = ckpt.step if ckpt.step is not None else math.nan
    record: Record = {naming.TOKENS: ckpt.tokens, naming.STEP: step, **measured}
    record[naming.PROBE_SECONDS] = time.perf_counter() - start
    return record


class _Announced(Probe):
    """A probe that shows its name on the progress bar while it runs."""

    def __init__(self, probe: Probe, bar: Any, checkpoint: str) -> None:
        self.probe, self.bar, self.checkpoint = probe, bar, checkpoint
        self.name = probe.name

    def run(self, ctx: ProbeContext) -> dict[str, float]:
        self.bar.set_postfix_str(f"{self.checkpoint}: {self.name} probe")
        return self.probe.run(ctx)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.probe, attr)


def _progress(total: int, disabled: bool) -> Any:
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI).
    return tqdm(total=total, unit="ckpt", desc="probing", disable=True if disabled else None)


def _probes(args: argparse.Namespace, tokenize: Callable[[bytes], torch.Tensor]) -> list[Probe]:
    if args.probes_fn is None:
        try:
            probes: list[Probe] = [
                NoiseProbe(gammas=tuple(args.gammas), pairs=args.pairs, seed=args.seed)
            ]
            if args.downstream_text:
                train, held_out = split_text(_read_text(args, "downstream_text"), held_out=0.1)
                probes.append(
                    FineTuneProbe(
                        _windows(tokenize(train), args, "--downstream-text"),
                        _windows(tokenize(held_out), args, "--downstream-text (held-out 10%)"),
                        steps=args.finetune_steps,
                        lrs=tuple(args.finetune_lrs),
                        seed=args.seed,
                    )
                )
        except ValueError as exc:
            raise SeriesError(str(exc)) from exc
        return probes
    if args.downstream_text:
        raise SeriesError(
            "--downstream-text configures the built-in fine-tune probe, which --probes-fn"
            " replaces: build a FineTuneProbe in your --probes-fn instead."
        )
    probes = import_object(args.probes_fn, "--probes-fn")()
    probes = list(probes) if isinstance(probes, (list, tuple)) else [probes]
    names = [getattr(p, "name", None) for p in probes]
    if not probes or not all(isinstance(p, Probe) for p in probes) or len(set(names)) < len(names):
        raise SeriesError(
            f"--probes-fn {args.probes_fn!r} must return a list of Probe objects with distinct"
            f" names, got {probes!r}."
        )
    return probes


def _module_class(args: argparse.Namespace, ordered: list[Checkpoint]) -> type | None:
    if args.module_class is None:
        if any(c.kind == LIGHTNING for c in ordered):
            raise SeriesError(
                "Lightning .ckpt files need the LightningModule class to load them: pass"
                " --module-class, e.g. --module-class my_project.model:MyLM."
            )
        return None
    cls = import_object(args.module_class, "--module-class")
    if not hasattr(cls, "load_from_checkpoint"):
        raise SeriesError(
            f"--module-class {args.module_class!r} is not a LightningModule class (it has no"
            " load_from_checkpoint)."
        )
    return cls


def _resume(out: str, settings: dict[str, Any]) -> list[Record]:
    path = os.path.join(out, "history.jsonl")
    if not os.path.isfile(path):
        return []
    settings_path = os.path.join(out, _SETTINGS_FILE)
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            before = json.load(f)
        for key in ("probes", "reference_tokens", "loss_fn", "precision"):
            if key in before and before[key] != settings[key]:
                raise SeriesError(
                    f"--out {out!r} holds results probed with other settings ({key}:"
                    f" {before[key]!r}, now {settings[key]!r}); mixing them would break the"
                    " curves. Pass a new --out, or the same settings to resume."
                )
    return read_history(path)


def _forward_context(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    # The trainer's own precision plugins, so a number matches the live monitor's.
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    if precision == "32-true":
        return Precision().forward_context
    return MixedPrecision(precision, device=device.type).forward_context  # type: ignore[arg-type]


# ---------------------------------------------------------------------- data
def _reference_set(
    args: argparse.Namespace, tokenize: Callable[[bytes], torch.Tensor], device: torch.device
) -> tuple[list[Any], list[int]]:
    if args.reference_fn is not None:
        data = import_object(args.reference_fn, "--reference-fn")
        what = f"--reference-fn {args.reference_fn!r}"
    else:
        data = _windows(tokenize(_read_text(args, "reference_text")), args, "--reference-text")
        what = "--reference-text"
    try:
        batches, weights = take_reference_set(data, args.reference_batches, count_tokens)
    except (ValueError, TypeError) as exc:
        raise SeriesError(f"{what}: {exc}") from exc
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return [move_data_to_device(b, device) for b in batches], weights


def _read_text(args: argparse.Namespace, option: str) -> bytes:
    paths = getattr(args, option)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SeriesError(f"--{option.replace('_', '-')}: no such file {missing[0]!r}.")
    return read_text_files(paths)


def _windows(ids: torch.Tensor, args: argparse.Namespace, what: str) -> list[dict[str, Any]]:
    """Non-overlapping sequences of ``--context`` tokens, in batches of ``--batch-size``."""
    n = len(ids) // args.context
    if n == 0:
        raise SeriesError(
            f"{what} holds {len(ids)} tokens, fewer than one sequence of --context"
            f" {args.context}. Pass more text or a smaller --context."
        )
    sequences = ids[: n * args.context].view(n, args.context)
    return [{"input_ids": batch} for batch in sequences.split(args.batch_size)]


def _tokenizer(
    args: argparse.Namespace, ordered: list[Checkpoint]
) -> Callable[[bytes], torch.Tensor]:
    if args.tokenizer == "bytes" or (args.reference_text is None and not args.downstream_text):
        return lambda text: torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    path = args.tokenizer
    if path is None:
        saved = [
            c.path
            for c in ordered
            if c.kind == TRANSFORMERS
            and any(os.path.isfile(os.path.join(c.path, f)) for f in _TOKENIZER_FILES)
        ]
        if not saved:
            raise SeriesError(
                "Text needs a tokenizer and no checkpoint directory holds one: pass"
                " --tokenizer bytes (byte-level models) or --tokenizer PATH."
            )
        path = saved[0]
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise SeriesError(f"--tokenizer {path!r} cannot be loaded: {exc}") from exc

    def tokenize(text: bytes) -> torch.Tensor:
        ids = tokenizer(text.decode("utf-8", errors="replace"))["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    return tokenize


# ---------------------------------------------------------------------- report
def report_command(run_dir: str) -> int:
    """``lightning-overtrain report RUN_DIR``: table, inflection and plots of each history."""
    paths = _find_histories(run_dir)
    for path in paths:
        directory = os.path.dirname(path)
        if len(paths) > 1:
            print(f"\n== {directory}")
        render_report(read_history(path), directory, _run_policy(directory))
    return EXIT_OK


def _run_policy(directory: str) -> InflectionPolicy:
    """The policy the run was judged with (from its ``monitor.json``), else the default."""
    path = os.path.join(directory, _SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f).get("policy")
        if isinstance(config, dict):
            try:
                return InflectionPolicy(**config)
            except (TypeError, ValueError) as exc:
                print(f"the run's policy settings do not load ({exc}); using the defaults")
    return InflectionPolicy()


def _find_histories(run_dir: str) -> list[str]:
    if not os.path.isdir(run_dir):
        raise SeriesError(f"RUN_DIR {run_dir!r}: no such directory.")
    here = os.path.join(run_dir, "history.jsonl")
    if os.path.isfile(here):
        return [here]
    found = sorted(
        os.path.join(dirpath, "history.jsonl")
        for dirpath, _, files in os.walk(run_dir)
        if "history.jsonl" in files
    )
    if not found:
        raise SeriesError(
            f"RUN_DIR {run_dir!r} holds no history.jsonl. Pass the monitor's directory"
            " (<log_dir>/overtrain by default) or a `probe --out` directory."
        )
    return found


def render_report(
    history: Sequence[Record], directory: str, policy: InflectionPolicy
) -> list[Record]:
    """Judge the history, print and write the summary and the verdicts; render the plots.

    Args:
        history: the run's records, in token order (left as they are on disk).
        directory: where ``summary.md``, ``inflection.json`` and the plots go.
        policy: a fresh policy, set up as the run's (its detectors fill up here).

    Returns:
        The judged history (see :func:`judge`).
    """
    history = judge(history, policy)
    states = {signal: d.state for signal, d in policy.detectors.items()}
    lines = [summary_table(history), "", "Inflection (the detector's verdict per signal):"]
    lines += [f"- {describe_inflection(k, s, policy.patience)}" for k, s in states.items()]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(directory, _SUMMARY_FILE), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(directory, _INFLECTION_FILE), "w") as f:
        json.dump({k: _json_ready(s.to_dict()) for k, s in states.items()}, f, indent=2)
    for path in _render_plots(history, directory):
        print(f"plot: {path}")
    return history


def _json_ready(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


def judge(history: Sequence[Record], policy: InflectionPolicy) -> list[Record]:
    """Replay the history through ``policy`` in token order, as the live monitor judges it.

    Every record gets the policy's ``inflection/<signal>/...`` verdicts and the
    ``best/...`` snapshot so far, computed afresh (a resumed series may have gained
    checkpoints in the middle), so a probed series carries the same keys as a live run.
    """
    judged = []
    for old in history:
        record = {k: v for k, v in old.items() if not k.startswith(_JUDGED)}
        record.update(policy.update(record)[0])
        candidate = policy.best_candidate(record)
        if candidate is not None:
            signal, value = candidate
            policy.best = {"signal": signal, "value": value, "tokens": record[naming.TOKENS]}
        if policy.best is not None:
            record[naming.BEST_TOKENS] = policy.best["tokens"]
            record[naming.BEST_VALUE] = policy.best["value"]
        judged.append(record)
    return judged


def describe_inflection(key: str, state: InflectionState, patience: int) -> str:
    """One line: crossed or not, the bottom, and the forecast."""
    if state.n_points == 0:
        return f"{key}: no finite values."
    bottom = (
        f"bottom at {_tokens(state.bottom_tokens)} tokens"
        f" ({state.bottom_value:.4g} ± {state.bottom_stderr:.2g})"
    )
    if state.crossed:
        verdict = f"CROSSED at {_tokens(state.crossed_at_tokens)} tokens; {bottom}"
    elif state.consecutive_above:
        verdict = (
            f"not crossed yet: the latest {state.consecutive_above} snapshot(s) sit above the"
            f" {bottom} (it takes {patience} in a row)"
        )
    elif state.rise is not None and state.rise > 0:
        verdict = (
            f"not crossed yet: {bottom}, latest +{state.rise:.3g} above it"
            f" (within the noise threshold {state.rise_threshold:.3g})"
        )
    else:
        verdict = f"not crossed: no rise above the {bottom}"
    if state.forecast_tokens is not None:
        verdict += (
            f"; forecast T* = {_tokens(state.forecast_tokens)} tokens"
            f" [{_tokens(state.forecast_low)}, {_tokens(state.forecast_high, 'unbounded')}]"
        )
    if state.n_points < DEFAULT_MIN_POINTS:
        verdict += f"; only {state.n_points} snapshot(s), the detector needs more to decide"
    return f"{key}: {verdict}."


def summary_table(history: Sequence[Record]) -> str:
    """A markdown table: tokens, step and the headline metrics (± their standard errors)."""
    metrics = [k for k in columns(history) if SUMMARY_COLUMNS.match(k)]
    header = ["tokens", "step", *metrics]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in history:
        cells = [_tokens(record.get(naming.TOKENS)), _number(record.get(naming.STEP), "d")]
        for key in metrics:
            cell = _number(record.get(key), ".4f")
            stderr = record.get(key + "_stderr")
            if _finite(stderr) and cell:
                cell += f" ± {stderr:.4f}"
            cells.append(cell)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _render_plots(history: Sequence[Record], directory: str) -> list[str]:
    from lightning_overtrain.plots import write_figures

    try:
        return list(write_figures(history, directory).values())
    except ImportError:
        return []  # matplotlib (the `plots` extra) is optional


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any, fmt: str) -> str:
    if not _finite(value):
        return ""
    return format(int(value), fmt) if fmt == "d" else format(value, fmt)


def _tokens(value: Any, infinite: str = "?") -> str:
    if value == math.inf:
        return infinite
    if not _finite(value):
        return "?"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


if __name__ == "__main__":
    sys.exit(main())
