"""The monitor's constructor arguments, checked before training with errors that say the fix.

Every check comes from the shared vocabulary in :mod:`lightning_overtrain.checks`
(one wording for one mistake across the package); the checks specific to the
monitor (probes, a reference set sized twice, a cooldown without data) are here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_overtrain.checks import (
    check_callable,
    check_choice,
    check_instance,
    check_int,
    check_name,
)
from lightning_overtrain.engine.contract import Probe
from lightning_overtrain.engine.data import check_batches_argument
from lightning_overtrain.engine.init_std import check_init_std
from lightning_overtrain.inflection.policy import InflectionPolicy
from lightning_overtrain.probes.noise import NoiseProbe
from lightning_overtrain.reporting.base import Reporter

ON_PROBE_ERROR = ("warn", "raise")
BACKUP_DEVICES = (None, "cpu")
_PROBES_FIX = "Pass e.g. probes=[NoiseProbe(gammas=(0.25, 0.5, 1.0))]."


@dataclass(frozen=True)
class CheckedArguments:
    """The arguments that a check normalises (integral floats become ints)."""

    probes: list[Probe]
    reference_batches: int | None
    reference_tokens: int | None
    token_offset: int
    cooldown_steps: int


def check_probes(probes: Any) -> list[Probe]:
    """The probes as a list: non-empty, every one a :class:`Probe`, names distinct.

    Raises:
        ValueError: naming what is wrong (one probe not in a list, a non-probe, the
            duplicate name) and the fix.
    """
    if probes is None:
        return [NoiseProbe()]
    if isinstance(probes, Probe):
        raise ValueError(
            f"`probes` must be a list of probes, got one probe, {type(probes).__name__}."
            f" Pass it in a list: probes=[{type(probes).__name__}(...)]."
        )
    if isinstance(probes, (str, bytes)) or not isinstance(probes, Sequence):
        raise ValueError(
            f"`probes` must be a list of Probe objects, got {type(probes).__name__}. {_PROBES_FIX}"
        )
    probes = list(probes)
    bad = [p for p in probes if not isinstance(p, Probe)]
    if not probes or bad:
        shown = ", ".join(type(p).__name__ for p in bad) if bad else "an empty list"
        raise ValueError(
            f"`probes` must be a non-empty list of Probe objects, got {shown}. {_PROBES_FIX}"
        )
    names = [p.name for p in probes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"`probes` must have distinct names, got {len(probes)} probes with names {names}"
            f" ({', '.join(repr(n) for n in twice)} more than once). Give each its own name"
            " (a probe's `name=` argument), or pass one probe with all the settings, e.g."
            " NoiseProbe(gammas=(0.25, 0.5, 1.0))."
        )
    return probes


def check_arguments(
    *,
    reference_data: Any,
    probes: Any,
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
    """Check every argument of :class:`~lightning_overtrain.OvertrainingMonitor` (by keyword).

    Raises:
        ValueError: naming the argument, the value received and what to pass instead.
    """
    check_batches_argument(
        reference_data, "reference_data", "held-out pretraining batches, e.g. val_dataloader"
    )
    checked_probes = check_probes(probes)
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
    check_callable("loss_fn", loss_fn, "Pass loss_fn(module, batch) -> scalar mean loss.")
    check_callable("tokens_fn", tokens_fn, "Pass tokens_fn(batch) -> int.")
    token_offset = check_int(
        "token_offset", token_offset, 0, "Pass the tokens seen before this run, or 0."
    )
    check_init_std(init_std)
    check_choice("on_probe_error", on_probe_error, ON_PROBE_ERROR, "Pass 'warn' or 'raise'.")
    check_name("prefix", prefix, "Pass e.g. prefix='overtrain'.", forbidden="")
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
    check_choice(
        "backup_device",
        backup_device,
        BACKUP_DEVICES,
        requirement="None (beside the weights) or 'cpu' (host memory)",
    )
    if policy is not None:
        check_instance(
            "policy",
            policy,
            InflectionPolicy,
            "an InflectionPolicy or None",
            "Pass e.g. policy=InflectionPolicy(action='stop').",
        )
    return CheckedArguments(
        checked_probes, reference_batches, reference_tokens, token_offset, cooldown_steps
    )
