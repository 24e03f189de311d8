"""The metric-key grammar: every key is built and parsed here, and every signal declared.

Every record key is relative (``noise/gamma=0.5/delta``); loggers see it under the
monitor's prefix (``overtrain/noise/gamma=0.5/delta``), and every logged row carries
``overtrain/tokens`` so any logger can plot against tokens.

Numbers in keys (``gamma=``, ``lr=``) are written in one canonical form, Python's
``format(x, "g")``: ``1e-3`` -> ``lr=0.001``, ``1e-5`` -> ``lr=1e-05``, ``0.25`` ->
``gamma=0.25``. Build keys with :func:`noise_key` / :func:`finetune_key` (or find the
``lr=`` part with :func:`lr_key`) rather than typing them.

A probe declares what it measures as :class:`Signal` objects (``Probe.signals()``); the
policy's default watch list, the figures, the summary table, W&B's axes and the best
snapshot all follow from those declarations. :func:`~lightning_overtrain.history.infer_signals`
rebuilds the built-in declarations from record keys alone, for a history whose run saved none.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

TOKENS = "tokens"
STEP = "step"
REFERENCE_LOSS = "reference_loss"
PROBE_FAILURES = "probe_failures"
PROBE_SECONDS = "probe_seconds"
BEST_TOKENS = "best/tokens"
BEST_VALUE = "best/value"
COOLDOWN_RAW_REFERENCE_LOSS = "cooldown/raw_reference_loss"
COOLDOWN_TRAIN_LOSS = "cooldown/train_loss"
STDERR_SUFFIX = "_stderr"

#: What the policy adds per watched signal, under ``inflection/<signal>/<field>``.
INFLECTION_FIELDS = (
    "crossed",
    "bottom_tokens",
    "bottom_value",
    "bottom_measured",
    "rise",
    "rise_threshold",
    "forecast_tokens",
    "forecast_low",
    "forecast_high",
)
NOISE_QUANTITIES = ("perturbed_loss", "delta")
FINETUNE_QUANTITIES = ("forgetting", "reference_loss_after", "downstream_loss_after")


def number(value: float | str) -> str:
    """The canonical text of a number in a key: ``number(1e-3) == "0.001"``.

    Raises:
        ValueError: on a value that is not a finite number (a string must parse as one).
    """
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}. Pass e.g. 1e-3.") from None
    if not math.isfinite(x):
        raise ValueError(f"expected a finite number, got {value!r}.")
    return format(x, "g")


def noise_key(gamma: float, quantity: str) -> str:
    """``noise/gamma=<gamma>/<quantity>``, e.g. ``noise/gamma=0.5/delta``."""
    return f"noise/gamma={number(gamma)}/{quantity}"


def layer_noise_key(gamma: float, group: str, quantity: str) -> str:
    """``noise/gamma=<gamma>/layer=<group>/<quantity>``, e.g. ``noise/gamma=0.5/layer=h.0/delta``.

    One key per (gamma, group): a logger draws tokens x layers from them (see
    :func:`parse_layer_noise_key`).
    """
    return f"noise/gamma={number(gamma)}/layer={group}/{quantity}"


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


def lr_key(lr: float | str) -> str:
    """The ``lr=`` part of a fine-tune key, in canonical form: ``lr_key(1e-3) == "lr=0.001"``.

    Accepts what users type (``1e-3``, ``"1e-3"``, ``0.001``), so a key is found without
    guessing its spelling: ``record[f"finetune/{lr_key(1e-3)}/forgetting"]``.
    """
    return f"lr={number(lr)}"


def parse_lr_key(part: str) -> float | None:
    """The learning rate of an ``lr=<lr>`` key part (``"lr=1e-3"`` -> 0.001), else None."""
    if not part.startswith("lr="):
        return None
    try:
        return float(part[len("lr=") :])
    except ValueError:
        return None


def finetune_key(lr: float | str | None, quantity: str, probe: str = "finetune") -> str:
    """``<probe>/lr=<lr>/<quantity>``, e.g. ``finetune_key(1e-3, "forgetting")``.

    ``lr`` in any spelling (``1e-3`` and ``0.001`` give ``finetune/lr=0.001/forgetting``).
    With ``lr=None``, a quantity measured before any fine-tune:
    ``finetune/downstream_loss_before``.
    """
    return f"{probe}/{quantity}" if lr is None else f"{probe}/{lr_key(lr)}/{quantity}"


def parse_finetune_key(key: str) -> tuple[str, float, str] | None:
    """``(probe, lr, quantity)`` of a :func:`finetune_key` with an lr, else None."""
    parts = key.split("/")
    if len(parts) != 3 or (lr := parse_lr_key(parts[1])) is None:
        return None
    return parts[0], lr, parts[2]


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


def prefixed(prefix: str, record: Mapping[str, float]) -> dict[str, float]:
    """The record as loggers see it: every key under ``<prefix>/``."""
    return {f"{prefix}/{key}": value for key, value in record.items()}


def key_pattern(glob: str) -> re.Pattern[str]:
    """A metric-key glob as a regex: ``*`` matches within one path part (not ``/``)."""
    return re.compile("".join("[^/]*" if c == "*" else re.escape(c) for c in glob) + r"\Z")


@dataclass(frozen=True)
class Signal:
    """One quantity a probe measures, and how the rest of the package treats it.

    Args:
        key: the record key, e.g. ``noise/gamma=1/perturbed_loss``.
        u_shaped: the curve falls, then turns upward with tokens: the default policy
            watches it for an inflection, and it can be the best snapshot's signal.
        base: the key of its falling term, when ``key = base + sensitivity`` (for a
            perturbed loss: ``reference_loss``); the forecast fits the two terms apart.
        sensitivity: the key of its rising term (for a perturbed loss: ``.../delta``).
        stderr: the key of its standard error; default ``<key>_stderr``.
        label: its legend label in a figure (e.g. ``γ=1``); default the key.
        unit: the y-axis label of its panel.
        figure: the figure it is drawn in (also the PNG's name); default the key's
            first part; ``""`` with ``plot=None``.
        title: the figure's title; default the figure's name.
        panel: the panel's title in its figure; default the key's last part.
        plot: ``"line"`` (against log tokens), ``"heatmap"`` (tokens x the panel's
            signals, by label) or None (not drawn).
        summary: a column of ``lightning-overtrain report``'s summary table.
        rank: for ``best_signal="auto"``: among the U-shaped signals of a record, the
            highest rank is the best snapshot's signal (ties: the first declared);
            None never picks it.

    Example::

        class MyProbe(Probe):
            name = "mine"

            def signals(self):
                return [Signal("mine/loss", u_shaped=True, label="my loss")]
    """

    key: str
    u_shaped: bool = False
    base: str | None = None
    sensitivity: str | None = None
    stderr: str = ""
    label: str = ""
    unit: str = "loss"
    figure: str | None = None
    title: str = ""
    panel: str = ""
    plot: str | None = "line"
    summary: bool = True
    rank: float | None = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key or self.key != self.key.strip("/"):
            raise ValueError(f"`key` must be a record key like 'mine/loss', got {self.key!r}.")
        if self.plot not in ("line", "heatmap", None):
            raise ValueError(f"`plot` must be 'line', 'heatmap' or None, got {self.plot!r}.")
        if (self.base is None) != (self.sensitivity is None):
            raise ValueError(
                f"Signal {self.key!r}: `base` and `sensitivity` go together, got"
                f" base={self.base!r}, sensitivity={self.sensitivity!r}. Pass both or neither."
            )
        parts = self.key.split("/")
        figure = parts[0] if self.figure is None else self.figure
        defaults = {
            "stderr": self.key + STDERR_SUFFIX,
            "label": self.key,
            "title": figure,
            "panel": parts[-1],
        }
        for name, default in defaults.items():
            if not getattr(self, name):
                object.__setattr__(self, name, default)
        object.__setattr__(self, "figure", figure)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for ``monitor.json``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Signal:
        """The signal of :meth:`to_dict` (unknown fields are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def reference_signal() -> Signal:
    """The monitor's own ``reference_loss``, drawn first in the noise figure."""
    return Signal(
        REFERENCE_LOSS,
        label="reference",
        figure="noise",
        title=_NOISE_TITLE,
        panel=_NOISE_LOSS_PANEL,
        rank=None,
    )


_NOISE_TITLE = "Sensitivity to Gaussian noise"
_NOISE_LOSS_PANEL = "reference and perturbed loss"


def noise_signals(
    gammas: Iterable[float], layer_groups: Mapping[float, Sequence[str]] | None = None
) -> list[Signal]:
    """The :class:`~lightning_overtrain.probes.noise.NoiseProbe`'s signals, gammas ascending.

    Args:
        gammas: the probe's noise magnitudes.
        layer_groups: ``{gamma: [group, ...]}`` of the per-layer keys (a heatmap each).
    """
    out = []
    for gamma in sorted(set(gammas)):
        label = f"γ={number(gamma)}"
        out.append(
            Signal(
                noise_key(gamma, "perturbed_loss"),
                u_shaped=True,
                base=REFERENCE_LOSS,
                sensitivity=noise_key(gamma, "delta"),
                label=label,
                figure="noise",
                title=_NOISE_TITLE,
                panel=_NOISE_LOSS_PANEL,
                rank=1 + gamma / (1 + gamma),  # the largest gamma, after any fine-tune loss
            )
        )
        out.append(
            Signal(
                noise_key(gamma, "delta"),
                label=f"γ={number(gamma)}",
                unit="δ = perturbed − reference loss",
                figure="noise",
                title=_NOISE_TITLE,
                panel="sensitivity δ",
                rank=None,
            )
        )
    for gamma in sorted((layer_groups or {}).keys()):
        for group in (layer_groups or {})[gamma]:
            out.append(
                Signal(
                    layer_noise_key(gamma, group, "delta"),
                    label=group,
                    unit="δ = perturbed − reference loss",
                    figure="layers",
                    title="Per-layer sensitivity δ",
                    panel=f"γ={number(gamma)}",
                    plot="heatmap",
                    summary=False,
                    rank=None,
                )
            )
    return out


_FINETUNE_PANELS = {
    "forgetting": ("forgetting (pretraining loss rise)", "Δ pretraining loss (after − before)"),
    "reference_loss_after": ("pretraining loss after fine-tuning", "loss"),
    "downstream_loss_after": ("downstream loss after fine-tuning", "loss"),
}


def finetune_signals(lrs: Iterable[float], probe: str = "finetune") -> list[Signal]:
    """The :class:`~lightning_overtrain.probes.finetune.FineTuneProbe`'s signals, by panel.

    The losses after fine-tuning are U-shaped in tokens (the paper); the reference loss
    after is ``reference_loss + forgetting``, and it ranks above any noise signal for
    the best snapshot (the largest lr first).
    """
    title = "Fine-tuning probe" if probe == "finetune" else f"Fine-tuning probe: {probe}"
    out = []
    for quantity, (panel, unit) in _FINETUNE_PANELS.items():
        for lr in sorted(set(lrs)):
            key = finetune_key(lr, quantity, probe)
            after = quantity != "forgetting"
            decomposed = quantity == "reference_loss_after"
            out.append(
                Signal(
                    key,
                    u_shaped=after,
                    base=REFERENCE_LOSS if decomposed else None,
                    sensitivity=finetune_key(lr, "forgetting", probe) if decomposed else None,
                    label=lr_key(lr),
                    unit=unit,
                    figure=probe,
                    title=title,
                    panel=panel,
                    summary=not after,
                    rank=3 + lr / (1 + lr) if decomposed else None,
                )
            )
    if len(set(lrs)) > 1:  # with one lr the tuned view is that lr's curve again
        out += _tuned_signals(probe, title)
    return out


def _tuned_signals(probe: str, title: str) -> list[Signal]:
    """The lr tuned per snapshot (the paper's Figure 5): its losses are watched like an lr's."""
    panels = {q: _FINETUNE_PANELS[q] for q in ("reference_loss_after", "downstream_loss_after")}
    out = [
        Signal(
            finetune_tuned_key(quantity, probe),
            u_shaped=True,
            label="tuned lr",
            unit=unit,
            figure=probe,
            title=title,
            panel=panel,
            summary=quantity == "downstream_loss_after",
            rank=None,
        )
        for quantity, (panel, unit) in panels.items()
    ]
    out.append(
        Signal(
            finetune_tuned_key("lr", probe),
            label="tuned lr",
            unit="lr",
            figure=probe,
            title=title,
            panel="the lr tuned for the downstream loss",
            rank=None,
        )
    )
    return out


SAMPLES_SUFFIX = "_samples"


def samples_key(key: str) -> str:
    """``<key>_samples``: the per-sample values behind ``key`` (a list, one per sample).

    A probe that samples (the noise probe's directions) records the value of each sample
    in a fixed order, the same samples at every snapshot, so the detector can judge a
    rise on the paired differences. E.g. ``noise/gamma=1/perturbed_loss_samples``.
    """
    return key + SAMPLES_SUFFIX
