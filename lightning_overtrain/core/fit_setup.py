"""What the core builds once per run: the reference shard, the cooldown, ``sigma_t``, reporters.

Plain functions of the model and the front end's collectives, so the core keeps
only the wiring and no training framework appears here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_overtrain.core.log import info
from lightning_overtrain.engine.collectives import Collectives
from lightning_overtrain.engine.contract import ProbeContext
from lightning_overtrain.engine.data import (
    fingerprint_batches,
    split_for_rank,
    take_batches,
    take_reference_set,
)
from lightning_overtrain.engine.init_std import (
    SOURCE_CONFIG,
    SOURCE_USER,
    SOURCE_WEIGHTS,
    InitStd,
    config_initializer_range,
    init_std_from_value,
    init_std_from_weights,
)
from lightning_overtrain.engine.sharding import any_sharded
from lightning_overtrain.engine.tokens import TokensFn
from lightning_overtrain.probes.cooldown import CooldownBranch
from lightning_overtrain.reporting.base import Reporter


class ReferenceShard:
    """This rank's share of the reference set, and what identifies the whole set.

    Attributes:
        batches: this rank's batches, on the module's device.
        weights: tokens per batch in ``batches``.
        tokens: tokens in the whole set (all ranks).
        fingerprint: a hash of the whole set's content (what a resume compares).
    """

    def __init__(
        self,
        reference_data: Iterable[Any] | Callable[[], Iterable[Any]],
        max_batches: int | None,
        tokens_fn: TokensFn,
        collectives: Collectives,
        module: nn.Module,
        device: torch.device,
    ) -> None:
        batches, weights = take_reference_set(reference_data, max_batches, tokens_fn)
        self.tokens = sum(weights)
        self.fingerprint = fingerprint_batches(batches)
        # Sharded (FSDP2): every forward pass is a collective, so every rank runs as many.
        even = any_sharded(module.parameters())
        local, self.weights = split_for_rank(
            batches, weights, collectives.rank, collectives.world_size, even
        )
        self.batches = [move_data_to_device(b, device) for b in local]


def default_reporters(wandb: bool = False) -> list[Reporter]:
    """The reporters a monitor gets when the user names none.

    Args:
        wandb: add the W&B reporter (the front end knows whether the run logs to W&B).
    """
    from lightning_overtrain.reporting.console import ConsoleReporter
    from lightning_overtrain.reporting.files import FileReporter
    from lightning_overtrain.reporting.loggers import LoggerReporter
    from lightning_overtrain.reporting.png import PlotReporter, matplotlib_available
    from lightning_overtrain.reporting.wandb import WandbReporter

    # W&B first: it names the metrics' x-axis before the loggers log them.
    return [
        *([WandbReporter()] if wandb else []),
        LoggerReporter(),
        FileReporter(),
        *([PlotReporter()] if matplotlib_available() else []),
        # Last: its closing line lists the files the others wrote.
        ConsoleReporter(),
    ]


def make_cooldown(
    module: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    collectives: Collectives,
    ctx: ProbeContext,
    cooldown_data: Any,
    cooldown_steps: int,
    tokens_fn: TokensFn,
    backup_device: str | None,
) -> CooldownBranch:
    """The cooldown branch over ``cooldown_steps`` batches of ``cooldown_data``, checked.

    Raises:
        ValueError: without exactly one training optimizer, or on unusable data.
    """
    if len(optimizers) != 1:
        raise ValueError(
            f"`cooldown_steps` needs exactly one training optimizer to copy, found"
            f" {len(optimizers)}. Set cooldown_steps=0 for this model."
        )
    batches = take_batches(
        cooldown_data,
        cooldown_steps,
        "cooldown_data",
        "Pass pretraining batches for the cooldown branch (a non-empty DataLoader or list).",
        seed=0,  # a shuffling DataLoader: the same batches on every rank
    )
    branch = CooldownBranch(
        module,
        batches,
        cooldown_steps,
        tokens_fn=tokens_fn,
        rank=collectives.rank,
        world_size=collectives.world_size,
        backup_device=backup_device,
    )
    branch.validate(ctx, optimizers[0])
    return branch


def resolve_init_std(
    module: nn.Module,
    init_std: InitStd | None,
    from_start: bool,
    collectives: Collectives,
    resumed_from: str | None = None,
) -> tuple[dict[str, float], str]:
    """``sigma_t`` per parameter and where it came from (the user, step 0, the config).

    Args:
        from_start: whether the weights are the initial ones (step 0, no checkpoint).
        resumed_from: the checkpoint the run resumed from, for the message.

    Raises:
        ValueError: when the monitor joins after step 0 and has no source for it.
    """
    if init_std is not None:
        return init_std_from_value(module, init_std), SOURCE_USER
    if from_start:
        return init_std_from_weights(module), SOURCE_WEIGHTS
    std = config_initializer_range(module)
    if std is None:
        raise ValueError(
            f"OvertrainingMonitor joined the run after step 0 (checkpoint"
            f" {resumed_from!r}) and cannot see the initial weights, and the model"
            " has no transformers config with `initializer_range`. Pass `init_std`, the"
            " std the weights were initialized with (e.g. init_std=0.02)."
        )
    info(collectives, f"OvertrainingMonitor: init std {std} from the model's config.")
    return init_std_from_value(module, std), SOURCE_CONFIG
