"""The metric naming scheme: one place, so logs, files and plots agree.

Every record key is relative (``noise/gamma=0.5/delta``); loggers see it under the
monitor's prefix (``overtrain/noise/gamma=0.5/delta``), and every logged row carries
``overtrain/tokens`` so any logger can plot against tokens.
"""

from __future__ import annotations

TOKENS = "tokens"
STEP = "step"
REFERENCE_LOSS = "reference_loss"
PROBE_FAILURES = "probe_failures"
PROBE_SECONDS = "probe_seconds"
BEST_TOKENS = "best/tokens"
BEST_VALUE = "best/value"
COOLDOWN_RAW_REFERENCE_LOSS = "cooldown/raw_reference_loss"
COOLDOWN_TRAIN_LOSS = "cooldown/train_loss"


def noise_key(gamma: float, quantity: str) -> str:
    """``noise/gamma=<gamma>/<quantity>``, e.g. ``noise/gamma=0.5/delta``."""
    return f"noise/gamma={gamma:g}/{quantity}"


def layer_noise_key(gamma: float, group: str, quantity: str) -> str:
    """``noise/gamma=<gamma>/layer=<group>/<quantity>``, e.g. ``noise/gamma=0.5/layer=h.0/delta``.

    One key per (gamma, group): a logger draws tokens x layers from them (see
    :func:`parse_layer_noise_key`).
    """
    return f"noise/gamma={gamma:g}/layer={group}/{quantity}"


def parse_layer_noise_key(key: str) -> tuple[float, str, str] | None:
    """``(gamma, group, quantity)`` of a :func:`layer_noise_key`, or None for any other key."""
    parts = key.split("/")
    if (
        len(parts) != 4
        or parts[0] != "noise"
        or not parts[1].startswith("gamma=")
        or not parts[2].startswith("layer=")
    ):
        return None
    return float(parts[1][len("gamma=") :]), parts[2][len("layer=") :], parts[3]


def finetune_key(lr: float | None, quantity: str, probe: str = "finetune") -> str:
    """``<probe>/lr=<lr>/<quantity>``, e.g. ``finetune/lr=0.001/forgetting``.

    With ``lr=None``, a quantity measured before any fine-tune:
    ``finetune/downstream_loss_before``.
    """
    return f"{probe}/{quantity}" if lr is None else f"{probe}/lr={lr:g}/{quantity}"


def finetune_tuned_key(quantity: str, probe: str = "finetune") -> str:
    """``<probe>/tuned/<quantity>``: the fine-tune with the lr tuned per snapshot.

    E.g. ``finetune/tuned/downstream_loss_after`` (the best over the probe's lrs),
    ``finetune/tuned/lr`` (the lr that won), ``finetune/tuned/reference_loss_after``.
    """
    return f"{probe}/tuned/{quantity}"


def sharpness_key(quantity: str, probe: str = "sharpness") -> str:
    """``<probe>/<quantity>``, e.g. ``sharpness/critical_sharpness``."""
    return f"{probe}/{quantity}"


def inflection_key(signal: str, quantity: str) -> str:
    """``inflection/<signal>/<quantity>``: what the detector says about one signal."""
    return f"inflection/{signal}/{quantity}"


def prefixed(prefix: str, record: dict[str, float]) -> dict[str, float]:
    """The record as loggers see it: every key under ``<prefix>/``."""
    return {f"{prefix}/{key}": value for key, value in record.items()}
