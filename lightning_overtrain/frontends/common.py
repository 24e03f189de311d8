"""What every front end shares: unwrapping the model, and the core's names on the front end."""

from __future__ import annotations

from typing import Any

from torch import nn

#: The core's run state and settings a front end shows under the same names (read and write).
SHARED = (
    "history",
    "probes",
    "cadence",
    "policy",
    "signals",
    "reporters",
    "probe_failures",
    "output_failures",
    "stop_reason",
    "init_stds",
    "init_std_source",
    "reference_data",
    "reference_batches",
    "reference_tokens",
    "reference_fingerprint",
    "loss_fn",
    "tokens_fn",
    "token_offset",
    "init_std",
    "on_probe_error",
    "prefix",
    "cooldown_steps",
    "cooldown_data",
    "backup_device",
)
#: ... and those it only reads.
READ_ONLY = ("tokens", "counted_tokens", "dirpath", "best_path", "best_tokens")


def _shared(name: str, writable: bool) -> property:
    def get(self: Any) -> Any:
        return getattr(self.core, name)

    def put(self: Any, value: Any) -> None:
        setattr(self.core, name, value)

    return property(get, put if writable else None, doc=f"The core's ``{name}``.")


def show_core(cls: type) -> type:
    """Class decorator: ``cls.<name>`` reads (and writes) ``self.core.<name>``."""
    for name in SHARED:
        setattr(cls, name, _shared(name, writable=True))
    for name in READ_ONLY:
        setattr(cls, name, _shared(name, writable=False))
    return cls


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric's and DDP's wrappers (the probes never run the wrapper)."""
    while True:
        inner = getattr(model, "module", None)
        wrapped = hasattr(model, "_forward_module") or type(model).__name__ in (
            "DistributedDataParallel",
            "DataParallel",
        )
        if not wrapped or not isinstance(inner, nn.Module):
            return model
        model = inner
