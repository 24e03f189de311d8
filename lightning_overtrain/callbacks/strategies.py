"""The strategies and precisions the monitor supports (Trainer and Fabric), checked first.

Supported: one device, DDP (``ddp``, ``ddp_spawn``, ...), and FSDP2:
``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` with
``fully_shard`` applied in ``configure_model``. Refused with a clear error,
never a hang or silently wrong numbers: FSDP1 (``FSDPStrategy``: flattened
parameters give every tensor ``sigma_t = 0`` and its collectives are not the
probes'), DeepSpeed (ZeRO partitions parameters outside PyTorch's view),
tensor parallelism (ranks share batches, so tokens would be counted twice) and
any other strategy nobody has tested.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

SUPPORTED_PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
_FSDP2 = (
    "ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1) with"
    " `torch.distributed.fsdp.fully_shard` applied in your LightningModule's `configure_model`"
)
#: The same for a Fabric loop, whose ModelParallelStrategy shards in its ``parallelize_fn``.
FABRIC_FSDP2 = (
    "ModelParallelStrategy(parallelize_fn, data_parallel_size=<devices>, tensor_parallel_size=1)"
    " whose `parallelize_fn` applies `torch.distributed.fsdp.fully_shard`"
)
_REFUSED = {
    "FSDPStrategy": "FSDP1 flattens parameters, so per-tensor init stds and noise are wrong",
    "DeepSpeedStrategy": "ZeRO partitions parameters outside PyTorch's view of them",
}
_SUPPORTED = ("SingleDeviceStrategy", "DDPStrategy", "ModelParallelStrategy")


def _names(obj: Any) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def tensor_parallel_size(strategy: Any) -> int:
    """The tensor-parallel size of a ModelParallelStrategy (1 when unknown or none)."""
    mesh = getattr(strategy, "_device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tensor_parallel" in names:
        return int(mesh["tensor_parallel"].size())
    size = getattr(strategy, "_tensor_parallel_size", 1)
    return size if isinstance(size, int) else 1


def check_strategy(
    strategy: Any, monitor: str = "OvertrainingMonitor", fsdp2: str = _FSDP2
) -> None:
    """Raise before training if the monitor cannot measure a run under ``strategy``.

    The rule is the same for Lightning's and Fabric's strategies (they share class
    names); ``monitor`` and ``fsdp2`` only word the message for the front end.

    Args:
        strategy: the Trainer's or Fabric's strategy object.
        monitor: the front end's class name, for the message.
        fsdp2: how to get FSDP2 in that front end, for the message.

    Raises:
        ValueError: naming the strategy, why, and what to use instead.

    Example::

        check_strategy(trainer.strategy)  # from the monitor's setup()
    """
    names = _names(strategy)
    label = type(strategy).__name__
    for refused, why in _REFUSED.items():
        if refused in names:
            raise ValueError(
                f"{monitor} does not support {label} ({why}). Use {fsdp2}, or"
                " `strategy='ddp'` if the model fits on one device."
            )
    if "ModelParallelStrategy" in names and tensor_parallel_size(strategy) > 1:
        raise ValueError(
            f"{monitor} supports {label} with data parallelism only, got"
            f" tensor_parallel_size={tensor_parallel_size(strategy)} (ranks of a tensor-parallel"
            f" group see the same batches, so tokens would be counted twice). Use {fsdp2}."
        )
    if not names & set(_SUPPORTED):
        raise ValueError(
            f"{monitor} has not been tested under {label}. Use a single device,"
            f" `strategy='ddp'`, or {fsdp2}."
        )


def check_precision(plugin: Any, monitor: str = "OvertrainingMonitor") -> None:
    """Raise before training on a precision the probes do not follow.

    ``plugin`` is the Trainer's or Fabric's precision plugin; ``monitor`` names the
    front end in the message.

    Raises:
        ValueError: naming the precision and the supported ones.
    """
    precision = str(getattr(plugin, "precision", "32-true"))
    if precision not in SUPPORTED_PRECISIONS:
        raise ValueError(
            f"{monitor} does not support precision={precision!r}. Use one of"
            f" {', '.join(SUPPORTED_PRECISIONS)}."
        )


def precision_extras(plugin: Any) -> dict[str, Callable[[], Any]]:
    """``ProbeContext.extras`` for the precision: a gradient-scaler factory under 16-mixed.

    Each fine-tune and cooldown gets a scaler of its own, starting from the
    training scaler's current scale and settings; the training scaler is only read.
    """
    scaler = getattr(plugin, "scaler", None)
    if scaler is None:
        return {}

    def make() -> torch.amp.GradScaler:
        return torch.amp.GradScaler(
            getattr(scaler, "_device", "cuda"),
            init_scale=scaler.get_scale(),
            growth_factor=scaler.get_growth_factor(),
            backoff_factor=scaler.get_backoff_factor(),
            growth_interval=scaler.get_growth_interval(),
        )

    return {"grad_scaler": make}
