"""``lightning-overtrain probe``: the monitor's engine over a checkpoint series."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from lightning_overtrain import keys
from lightning_overtrain.cli.loading import (
    SeriesInitStd,
    import_object,
    load_model,
    order_series,
)
from lightning_overtrain.cli.main import EXIT_FAILURES, EXIT_OK
from lightning_overtrain.cli.report import render_report
from lightning_overtrain.cli.series import (
    LIGHTNING,
    TRANSFORMERS,
    Checkpoint,
    CheckpointError,
    SeriesError,
    find_checkpoints,
    read_metadata,
    tokens_from_checkpoint,
    tokens_from_mapping,
    tokens_from_pattern,
)
from lightning_overtrain.cli.text import read_text, reference_set, split_text, tokenizer, windows
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.contract import Probe, ProbeContext, declared_signals
from lightning_overtrain.engine.losses import transformers_loss
from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.history import SETTINGS_FILE, Record, read_history, write_history
from lightning_overtrain.inflection.policy import InflectionPolicy
from lightning_overtrain.probes.finetune import FineTuneProbe
from lightning_overtrain.probes.noise import NoiseProbe


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

    tokenize = tokenizer(args, ordered)
    batches, weights = reference_set(args, tokenize, device)
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
    done = {int(r[keys.TOKENS]) for r in history}
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
    probe_failures = int(history[-1].get(keys.PROBE_FAILURES, 0)) if history else 0
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
        record[keys.PROBE_FAILURES] = probe_failures
        history = sorted([*history, record], key=lambda r: r[keys.TOKENS])
        write_history(history, args.out)  # after every checkpoint: an interrupted run resumes
    bar.close()

    policy = InflectionPolicy()
    signals = declared_signals(probes)
    policy.declare(signals)
    settings["policy"] = policy.config()
    settings["signals"] = [s.to_dict() for s in signals]
    settings["init_std_source"] = init.source
    settings["checkpoints"] = [
        {"path": c.path, "tokens": c.tokens, "step": c.step, "tokens_from": c.tokens_source}
        for c in series
    ]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, SETTINGS_FILE), "w") as f:
        json.dump(settings, f, indent=2, default=str)
    if history:
        write_history(render_report(history, args.out, policy, signals), args.out)
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
    record: Record = {keys.TOKENS: ckpt.tokens, keys.STEP: step, **measured}
    record[keys.PROBE_SECONDS] = time.perf_counter() - start
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
                train, held_out = split_text(read_text(args, "downstream_text"), held_out=0.1)
                probes.append(
                    FineTuneProbe(
                        windows(tokenize(train), args, "--downstream-text"),
                        windows(tokenize(held_out), args, "--downstream-text (held-out 10%)"),
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
    settings_path = os.path.join(out, SETTINGS_FILE)
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
