"""The set-up of a checkpoint series from the ``probe`` options: series, probes, data, loss.

:func:`collect_series` and :func:`build_setup` are the building blocks of any
command that probes checkpoints (``probe``, ``watch``): the result measures every
checkpoint alike (see :mod:`lightning_overtrain.cli.probe`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_overtrain.cli.loading import (
    SeriesInitStd,
    import_object,
    load_model,
    order_series,
)
from lightning_overtrain.cli.runs import one_run
from lightning_overtrain.cli.series import (
    DCP,
    LIGHTNING,
    TRANSFORMERS,
    Checkpoint,
    CheckpointError,
    SeriesError,
    TokensRule,
    find_checkpoints,
    read_metadata,
)
from lightning_overtrain.cli.text import read_text, reference_set, split_text, tokenizer, windows
from lightning_overtrain.cli.token_rules import (
    tokens_from_checkpoint,
    tokens_from_mapping,
    tokens_from_pattern,
)
from lightning_overtrain.engine.contract import Probe
from lightning_overtrain.engine.data import fingerprint_batches
from lightning_overtrain.engine.losses import LossFn, transformers_loss
from lightning_overtrain.probes.finetune import FineTuneProbe
from lightning_overtrain.probes.noise import NoiseProbe


@dataclass
class ProbeSetup:
    """What every checkpoint of a series is measured with, built once from the options.

    Attributes:
        load: loads a checkpoint's model onto the device, in eval mode.
        probes: the probes, in order.
        init: the init std of every checkpoint (``sigma_t``).
        batches: the reference set, on the device.
        weights: tokens per reference batch.
        loss_fn: ``loss_fn(model, batch) -> scalar mean loss``.
        loss_option: the ``--loss-fn`` the user passed, or None for the default loss.
        forward_context: the precision context of every forward pass.
        settings: the run's settings, as written to ``monitor.json`` (see
            :mod:`lightning_overtrain.cli.resume`).
    """

    load: Callable[[Checkpoint], nn.Module]
    probes: list[Probe]
    init: SeriesInitStd
    batches: list[Any]
    weights: list[int]
    loss_fn: LossFn
    loss_option: str | None
    forward_context: Callable[[], AbstractContextManager[Any]]
    settings: dict[str, Any]


def build_setup(args: argparse.Namespace, ordered: list[Checkpoint]) -> ProbeSetup:
    """The loader, probes, reference set, loss and settings for ``ordered``, from ``args``.

    Raises:
        SeriesError: on options that cannot work (a class, a file, a callable).
    """
    device = device_of(args)
    module_class = module_class_from(args, ordered)
    auto_class = (
        import_object(args.auto_class, "--auto-class")
        if any(c.kind == TRANSFORMERS for c in ordered)
        else None
    )

    def load(ckpt: Checkpoint) -> nn.Module:
        return load_model(ckpt, module_class, auto_class, device, args.unsafe_load, args.dcp_key)

    tokenize = tokenizer(args, ordered)
    batches, weights = reference_set(args, tokenize, device)
    downstream = downstream_batches(args, tokenize)
    probes = build_probes(args, downstream)
    loss_fn = import_object(args.loss_fn, "--loss-fn") if args.loss_fn else transformers_loss
    settings = {
        "cadence": "checkpoint series",
        "probes": {p.name: p.config() for p in probes},
        "reference_batches": len(batches),
        "reference_tokens": sum(weights),
        "reference_fingerprint": fingerprint_batches(batches),
        "downstream_fingerprint": fingerprint_batches(downstream) if downstream else None,
        "loss_fn": getattr(loss_fn, "__name__", repr(loss_fn)),
        "token_offset": 0,
        "precision": args.precision,
        "init_std": args.init_std,
        "prefix": "overtrain",
        "source": "lightning-overtrain probe",
    }
    return ProbeSetup(
        load=load,
        probes=probes,
        init=SeriesInitStd(args.init_std, ordered, load),
        batches=batches,
        weights=weights,
        loss_fn=loss_fn,
        loss_option=args.loss_fn,
        forward_context=_forward_context(args.precision, device),
        settings=settings,
    )


def tokens_rule(args: argparse.Namespace) -> TokensRule:
    """Where each checkpoint's tokens come from: ``--tokens-pattern``, ``--tokens-map`` or itself.

    Raises:
        SeriesError: on a bad ``--tokens-pattern`` or ``--tokens-map``.
    """
    if args.tokens_pattern is not None:
        return tokens_from_pattern(args.tokens_pattern, args.tokens_per_step)
    if args.tokens_map is not None:
        return tokens_from_mapping(args.tokens_map)
    return tokens_from_checkpoint(args.tokens_per_step)


def collect_series(args: argparse.Namespace) -> tuple[list[Checkpoint], list[tuple[str, str]]]:
    """The checkpoints of ``args.checkpoints`` in token order, their metadata read.

    Returns:
        ``(ordered, failures)``: ``(path, reason)`` for each path that cannot be used.

    Raises:
        SeriesError: on a bad ``--tokens-pattern`` or ``--tokens-map``.
    """
    rule = tokens_rule(args)
    missing = [p for p in args.checkpoints if not os.path.lexists(p)]
    if missing:
        raise SeriesError(f"CHECKPOINT {missing[0]!r}: no such file or directory.")
    found, failures = find_checkpoints(args.checkpoints)
    readable = []
    for ckpt in found:
        try:
            read_metadata(ckpt, args.unsafe_load)
            readable.append(ckpt)
        except CheckpointError as exc:
            failures.append((ckpt.path, str(exc)))
    readable, other_runs = one_run(readable, args.mix_runs)
    for path, reason in other_runs:
        print(f"skipping {path}: {reason}")
    failures += other_runs
    ordered, unknown, duplicates = order_series(readable, rule)
    for dropped, kept in duplicates:
        print(f"skipping {dropped.path}: same tokens ({dropped.tokens:,}) as {kept.path}")
    return ordered, failures + unknown


def build_probes(
    args: argparse.Namespace, downstream: tuple[list[Any], list[Any]] | None
) -> list[Probe]:
    """The noise probe (and the fine-tune probe on ``downstream``), or ``--probes-fn``'s.

    Args:
        args: the parsed options.
        downstream: ``(train, held_out)`` batches from :func:`downstream_batches`, or None.

    Raises:
        SeriesError: on probe options that cannot work.
    """
    if args.probes_fn is None:
        try:
            probes: list[Probe] = [
                NoiseProbe(gammas=tuple(args.gammas), pairs=args.pairs, seed=args.seed)
            ]
            if downstream is not None:
                probes.append(
                    FineTuneProbe(
                        *downstream,
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


def downstream_batches(
    args: argparse.Namespace, tokenize: Callable[[bytes], torch.Tensor]
) -> tuple[list[Any], list[Any]] | None:
    """``--downstream-text`` as ``(train, held_out)`` batches (the last 10% held out), or None.

    Raises:
        SeriesError: if a file is missing or holds less than one sequence.
    """
    if not args.downstream_text:
        return None
    train, held_out = split_text(read_text(args, "downstream_text"), held_out=0.1)
    return (
        windows(tokenize(train), args, "--downstream-text"),
        windows(tokenize(held_out), args, "--downstream-text (held-out 10%)"),
    )


def module_class_from(args: argparse.Namespace, ordered: list[Checkpoint]) -> Any:
    """The ``--module-class`` class (None when no checkpoint needs one).

    A ``.ckpt`` file needs a LightningModule class; a distributed checkpoint, any class
    or function that builds the model.

    Raises:
        SeriesError: if checkpoints need it and it is missing, or it does not import.
    """
    if args.module_class is None:
        if any(c.kind == LIGHTNING for c in ordered):
            raise SeriesError(
                "Lightning .ckpt files need the LightningModule class to load them: pass"
                " --module-class, e.g. --module-class my_project.model:MyLM."
            )
        if any(c.kind == DCP for c in ordered):
            raise SeriesError(
                "distributed checkpoints hold tensors, not the model: pass the class that"
                " builds it, e.g. --module-class my_project.model:MyLM."
            )
        return None
    cls = import_object(args.module_class, "--module-class")
    if not callable(cls):
        raise SeriesError(f"--module-class {args.module_class!r} is not a class or a function.")
    if any(c.kind == LIGHTNING for c in ordered) and not hasattr(cls, "load_from_checkpoint"):
        raise SeriesError(
            f"--module-class {args.module_class!r} is not a LightningModule class (it has no"
            " load_from_checkpoint)."
        )
    return cls


def device_of(args: argparse.Namespace) -> torch.device:
    """``--device``, else cuda when there is one, else cpu."""
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def set_threads(args: argparse.Namespace, device: torch.device) -> str | None:
    """Set torch's CPU threads from ``--threads``; on a CPU, one per process by default.

    Why one: the probes run small forward passes, where torch's default (a thread per
    core) spends its time waiting for cores that other jobs hold; measured on a shared
    2-core machine, 8 checkpoints took 227 s with the default and 25 s with one thread,
    with identical numbers. ``OMP_NUM_THREADS``, when set, is respected. On a GPU,
    torch's default stays.

    Returns:
        A line saying what was chosen, or None when nothing was changed.
    """
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        return f"threads: {args.threads} (--threads)"
    if device.type != "cpu":
        return None
    if os.environ.get("OMP_NUM_THREADS"):
        return f"threads: {torch.get_num_threads()} (OMP_NUM_THREADS)"
    torch.set_num_threads(1)
    return "threads: 1 (the default on a CPU; --threads N to use more)"


def _forward_context(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    # The trainer's own precision plugins, so a number matches the live monitor's.
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    if precision == "32-true":
        return Precision().forward_context
    return MixedPrecision(precision, device=device.type).forward_context  # type: ignore[arg-type]
