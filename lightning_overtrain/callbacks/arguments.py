"""The monitor's constructor arguments, checked before training with errors that say the fix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_overtrain.checks import check_int
from lightning_overtrain.engine.contract import Probe
from lightning_overtrain.engine.data import check_batches_argument
from lightning_overtrain.engine.init_std import check_init_std
from lightning_overtrain.inflection.policy import InflectionPolicy
from lightning_overtrain.probes.noise import NoiseProbe
from lightning_overtrain.reporting.base import Reporter

ON_PROBE_ERROR = ("warn", "raise")
BACKUP_DEVICES = (None, "cpu")


@dataclass(frozen=True)
class CheckedArguments:
    """The arguments that a check normalises (integral floats become ints)."""

    probes: list[Probe]
    reference_batches: int | None
    reference_tokens: int | None
    token_offset: int
    cooldown_steps: int


def check_arguments(
    reference_data: Any,
    probes: Sequence[Probe] | None,
    reference_batches: Any,
    reference_tokens: Any,
    loss_fn: Any,
    tokens_fn: Any,
    token_offset: Any,
    init_std: Any,
    on_probe_error: Any,
    prefix: Any,
    reporters: Sequence[Any] | None,
    cooldown_steps: Any,
    cooldown_data: Any,
    policy: Any,
    backup_device: Any,
) -> CheckedArguments:
    """Check every argument of :class:`~lightning_overtrain.OvertrainingMonitor`.

    Raises:
        ValueError: naming the argument, the value received and what to pass instead.
        TypeError: for a count that is not a whole number.
    """
    check_batches_argument(
        reference_data, "reference_data", "held-out pretraining batches, e.g. val_dataloader"
    )
    probes = [NoiseProbe()] if probes is None else list(probes)
    bad = [p for p in probes if not isinstance(p, Probe)]
    names = [getattr(p, "name", None) for p in probes]
    if not probes or bad or len(set(names)) != len(names):
        raise ValueError(
            f"`probes` must be a non-empty list of Probe objects with distinct names,"
            f" got {probes!r}. Pass e.g. probes=[NoiseProbe(gammas=(0.25, 0.5, 1.0))]."
        )
    if reference_batches is not None and reference_tokens is not None:
        raise ValueError(
            f"Pass `reference_batches` or `reference_tokens`, not both, got"
            f" reference_batches={reference_batches!r} and"
            f" reference_tokens={reference_tokens!r}. Drop one, e.g. keep only"
            " reference_tokens=8192 to size the reference set in tokens."
        )
    if reference_batches is not None:
        reference_batches = check_int(
            "reference_batches",
            reference_batches,
            1,
            "Pass how many held-out batches to keep (about 8k tokens is enough), or None.",
        )
    if reference_tokens is not None:
        reference_tokens = check_int(
            "reference_tokens",
            reference_tokens,
            1,
            "Pass the reference set's size in tokens, e.g. reference_tokens=8192, or None.",
        )
    for name, fn in (("loss_fn", loss_fn), ("tokens_fn", tokens_fn)):
        if fn is not None and not callable(fn):
            raise ValueError(f"`{name}` must be callable or None, got {fn!r}.")
    token_offset = check_int(
        "token_offset", token_offset, 0, "Pass the tokens seen before this run, or 0."
    )
    check_init_std(init_std)
    if on_probe_error not in ON_PROBE_ERROR:
        raise ValueError(
            f"`on_probe_error` must be one of {ON_PROBE_ERROR}, got {on_probe_error!r}."
        )
    if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
        raise ValueError(f"`prefix` must be a non-empty string without spaces, got {prefix!r}.")
    if reporters is not None and not all(isinstance(r, Reporter) for r in reporters):
        raise ValueError(f"`reporters` must be Reporter objects, got {list(reporters)!r}.")
    cooldown_steps = check_int(
        "cooldown_steps",
        cooldown_steps,
        0,
        "Pass 0 for no cooldown, or the branch's length, e.g. 20% of the steps between snapshots.",
    )
    if bool(cooldown_steps) != (cooldown_data is not None):
        raise ValueError(
            f"`cooldown_steps={cooldown_steps}` and `cooldown_data` go together, got"
            f" cooldown_data={type(cooldown_data).__name__}. Pass both (pretraining batches"
            " for the branch and its length) or neither."
        )
    if backup_device not in BACKUP_DEVICES:
        raise ValueError(
            f"`backup_device` must be None (beside the weights) or 'cpu' (host memory),"
            f" got {backup_device!r}."
        )
    if policy is not None and not isinstance(policy, InflectionPolicy):
        raise ValueError(
            f"`policy` must be an InflectionPolicy or None, got {policy!r}."
            " Pass e.g. policy=InflectionPolicy(action='stop')."
        )
    return CheckedArguments(
        probes, reference_batches, reference_tokens, token_offset, cooldown_steps
    )
