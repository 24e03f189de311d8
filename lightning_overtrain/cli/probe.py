"""``lightning-overtrain probe``: the monitor's engine over a checkpoint series.

The building blocks, for any command that probes checkpoints: :func:`open_checkpoint`
(load one, build its :class:`~lightning_overtrain.engine.contract.ProbeContext`),
:func:`check_setup` (the loss and the probes on the first one), :func:`measure_checkpoint`
(its record) and :func:`probe_checkpoint` (the three in one); the set-up they take
comes from :func:`~lightning_overtrain.cli.setup.build_setup`, the resume rules from
:mod:`lightning_overtrain.cli.resume`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch

from lightning_overtrain import keys
from lightning_overtrain.cli.exit_codes import EXIT_FAILURES, EXIT_OK
from lightning_overtrain.cli.report import render_report
from lightning_overtrain.cli.resume import resume_history, write_settings
from lightning_overtrain.cli.series import Checkpoint, CheckpointError, SeriesError
from lightning_overtrain.cli.setup import (
    ProbeSetup,
    build_setup,
    collect_series,
    device_of,
    set_threads,
)
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.contract import Probe, ProbeContext, declared_signals
from lightning_overtrain.engine.losses import check_loss
from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.history import Record, write_history
from lightning_overtrain.inflection.policy import InflectionPolicy


def probe_command(args: argparse.Namespace) -> int:
    """``lightning-overtrain probe``: see ``lightning-overtrain probe --help``."""
    ordered, failures = collect_series(args)
    threads = set_threads(args, device_of(args))
    if threads:
        print(threads)
    setup = build_setup(args, ordered)
    history = resume_history(args.out, setup.settings)
    # Tokens = 0 has no place on a log axis: such a checkpoint only gives the init std.
    series = [c for c in ordered if c.tokens]
    done = {int(r[keys.TOKENS]) for r in history}
    todo = [c for c in series if c.tokens not in done]
    print(
        f"{len(series)} checkpoint(s) from {series[0].tokens:,} to {series[-1].tokens:,} tokens"
        f" ({len(series) - len(todo)} already probed), reference set of"
        f" {sum(setup.weights):,} tokens"
        if series
        else "no checkpoint with tokens > 0 to probe"
    )

    probe_failures = int(history[-1].get(keys.PROBE_FAILURES, 0)) if history else 0
    bar = _progress(len(todo), args.no_progress)
    checked, probed = False, 0  # the set-up is checked on the first checkpoint that loads
    for ckpt in todo:
        bar.set_postfix_str(f"{_short_name(ckpt)}: loading")
        try:
            ctx = open_checkpoint(setup, ckpt)
            if not checked:
                check_setup(setup, ctx, ckpt)
                print(f"init std from {setup.init.source}")
                # Before the first measurement: an interrupted run still guards its --out.
                write_settings(args.out, setup.settings)
                checked = True
            record = measure_checkpoint(setup, ctx, ckpt, bar)
        except CheckpointError as exc:
            probe_failures += 1
            failures.append((ckpt.path, gone_reason(ckpt) or str(exc)))
            if bar.disable:
                print(f"cannot probe {ckpt.path}: {failures[-1][1]}", flush=True)
            continue
        finally:
            bar.update(1)
        probed += 1
        if bar.disable:  # no progress bar (output is not a terminal): a line per checkpoint
            print(checkpoint_line(ckpt, record), flush=True)
        record[keys.PROBE_FAILURES] = probe_failures
        history = sorted([*history, record], key=lambda r: r[keys.TOKENS])
        write_history(history, args.out)  # after every checkpoint: an interrupted run resumes
    bar.close()

    policy = InflectionPolicy()
    signals = declared_signals(setup.probes)
    policy.declare(signals)
    settings = setup.settings
    settings["policy"] = policy.config()
    settings["signals"] = [s.to_dict() for s in signals]
    settings["init_std_source"] = setup.init.source
    settings["checkpoints"] = [
        {"path": c.path, "tokens": c.tokens, "step": c.step, "tokens_from": c.tokens_source}
        for c in series
    ]
    if history or checked:  # an --out where nothing was ever measured stays unclaimed
        write_settings(args.out, settings)
    if history:
        write_history(render_report(history, args.out, policy, signals), args.out)
        best = policy.best
        if best is not None:
            path = next(c.path for c in series if c.tokens == best["tokens"])
            print(f"the checkpoint at the bottom of {best['signal']} (to fine-tune): {path}")
    if failures:
        others = f"{probed} other(s) probed" if probed else "none was probed"
        print(f"\n{len(failures)} checkpoint(s) failed ({others}):", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
        return EXIT_FAILURES
    return EXIT_OK


def checkpoint_line(ckpt: Checkpoint, record: Record) -> str:
    """``probed PATH: 1,024 tokens (step 2), reference_loss 3.1416, 2.5 s``."""
    loss = record.get(keys.REFERENCE_LOSS, float("nan"))
    return (
        f"probed {ckpt.path}: {ckpt.tokens:,} tokens (step {ckpt.step}), reference_loss"
        f" {loss:.4f}, {record.get(keys.PROBE_SECONDS, float('nan')):.1f} s"
    )


def gone_reason(ckpt: Checkpoint) -> str | None:
    """The failure to report for a checkpoint that vanished while it was read, else None."""
    if os.path.exists(ckpt.path):
        return None
    return (
        "deleted while it was being read (a retention policy such as keep_latest_k or"
        " save_top_k?): it is missing from the curves"
    )


def open_checkpoint(setup: ProbeSetup, ckpt: Checkpoint) -> ProbeContext:
    """Load ``ckpt`` and build the context the probes measure it in (as the monitor does).

    Raises:
        CheckpointError: if it cannot be loaded or its init stds do not fit it.
        SeriesError: if no init std can be found at all.
    """
    model = setup.load(ckpt)
    backup = ModelBackup(model)
    return ProbeContext(
        module=model,
        backup=backup,
        sigmas=setup.init.sigmas(model, backup.names),
        batches=setup.batches,
        weights=setup.weights,
        loss_fn=setup.loss_fn,
        forward_context=setup.forward_context,
    )


def check_setup(setup: ProbeSetup, ctx: ProbeContext, ckpt: Checkpoint) -> None:
    """Check the loss on the first reference batch, then each probe's set-up, on one checkpoint.

    Run on the first checkpoint that loads, before any is measured: a loss or a batch
    format that does not fit the model fails here, once, not per checkpoint.

    Raises:
        SeriesError: naming the loss the user passed (or the default) and ``--loss-fn``,
            or the probe that rejects the set-up.
    """
    try:
        with setup.forward_context():
            check_loss(ctx.module, ctx.backup, ctx.batches[0], ctx.loss_fn, "reference set")
    except ValueError as exc:
        raise SeriesError(_loss_message(setup, ctx, ckpt, exc)) from exc
    for probe in setup.probes:
        try:
            probe.validate(ctx)
        except ValueError as exc:
            raise SeriesError(f"the {probe.name} probe: {exc}") from exc


def _loss_message(setup: ProbeSetup, ctx: ProbeContext, ckpt: Checkpoint, exc: Exception) -> str:
    cause = exc.__cause__ or exc  # check_loss wraps what the loss raised
    failure = f"{type(cause).__name__}: {cause}"
    batch = describe_batch(ctx.batches[0])
    model = type(ctx.module).__name__
    if setup.loss_option is not None:
        return (
            f"--loss-fn {setup.loss_option!r} does not work on the first reference batch"
            f" ({batch}) with the model of {ckpt.path} ({model}): {failure}. It is called as"
            " loss_fn(model, batch) and must return the scalar mean next-token loss of a"
            " batch in this format; fix it, or the reference batches (--reference-fn)."
        )
    return (
        f"the default loss, model(**batch).loss (the transformers convention), does not work"
        f" on the first reference batch ({batch}) with the model of {ckpt.path} ({model}):"
        f" {failure}. For a model of your own, pass --loss-fn path/to/file.py:loss_fn, a"
        " function loss_fn(model, batch) -> scalar mean next-token loss of such a batch."
    )


def describe_batch(batch: Any) -> str:
    """A batch's format in a few words, e.g. ``a dict {'input_ids': int64[8, 128]}``."""

    def leaf(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
        return type(value).__name__

    if isinstance(batch, Mapping):
        return "a dict {" + ", ".join(f"{k!r}: {leaf(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} (" + ", ".join(leaf(v) for v in batch) + ")"
    return f"a {leaf(batch)}"


def measure_checkpoint(setup: ProbeSetup, ctx: ProbeContext, ckpt: Checkpoint, bar: Any) -> Record:
    """One checkpoint's record, measured as the monitor would.

    Args:
        setup: the series' set-up.
        ctx: from :func:`open_checkpoint` (checked with :func:`check_setup` once per series).
        ckpt: the checkpoint, for its tokens and step.
        bar: a progress bar (``tqdm``) that shows which probe runs.

    Raises:
        CheckpointError: if a probe failed on it.
    """
    name = _short_name(ckpt)
    errors: list[str] = []
    start = time.perf_counter()
    measured = measure_snapshot(
        ctx,
        [_Announced(p, bar, name) for p in setup.probes],
        lambda what, exc: errors.append(f"the {what} probe failed: {exc}"),
    )
    if errors:
        raise CheckpointError("; ".join(errors))
    step = ckpt.step if ckpt.step is not None else math.nan
    record: Record = {keys.TOKENS: ckpt.tokens, keys.STEP: step, **measured}
    record[keys.PROBE_SECONDS] = time.perf_counter() - start
    return record


def probe_checkpoint(setup: ProbeSetup, ckpt: Checkpoint, bar: Any, check: bool = False) -> Record:
    """Load, optionally check (:func:`check_setup`) and measure one checkpoint.

    Raises:
        CheckpointError: if it cannot be loaded or a probe failed on it.
        SeriesError: if ``check`` and the set-up does not fit the model.

    Example::

        setup = build_setup(args, ordered)
        record = probe_checkpoint(setup, ordered[-1], bar, check=True)
    """
    bar.set_postfix_str(f"{_short_name(ckpt)}: loading")
    ctx = open_checkpoint(setup, ckpt)
    if check:
        check_setup(setup, ctx, ckpt)
    return measure_checkpoint(setup, ctx, ckpt, bar)


def _short_name(ckpt: Checkpoint) -> str:
    return os.path.basename(os.path.normpath(ckpt.path))


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
