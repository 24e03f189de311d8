"""The monitor's history as pictures: every probe curve against log tokens.

Pure functions from history records (see :mod:`lightning_overtrain.keys`) to
matplotlib figures. They draw whatever the records hold and skip the rest:

- ``noise``: the reference loss and the perturbed loss per gamma (the U-shaped
  curves), and ``delta`` per gamma (the sensitivity, rising with tokens);
- ``finetune``: forgetting, and the pretraining and downstream losses after
  fine-tuning, per learning rate;
- ``layers``: per-layer sensitivity as a tokens x layer heatmap, one per gamma.

Where the records carry ``inflection/<signal>/...`` keys, the signal's curve gets
its bottom marked and the forecast ``T*`` drawn with its interval. Figures are
plain :class:`~matplotlib.figure.Figure` objects on the Agg canvas: no pyplot, no
display, no global state, so rendering is safe in any training process. matplotlib
is imported only when a figure is drawn, so it stays an optional dependency.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning_overtrain import keys

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Records = Sequence[Mapping[str, Any]]

NOISE = re.compile(r"^noise/gamma=(?P<gamma>[^/]+)/(?P<quantity>perturbed_loss|delta)$")
LAYER = re.compile(r"^noise/gamma=(?P<gamma>[^/]+)/layer=(?P<layer>[^/]+)/delta$")
FINETUNE = re.compile(
    r"^finetune/lr=(?P<lr>[^/]+)/(?P<quantity>forgetting|reference_loss_after|downstream_loss_after)$"
)
INFLECTION_FIELDS = ("crossed", "bottom_tokens", "forecast_tokens", "forecast_low", "forecast_high")
# A forecast far beyond the data would squash the measured curve into a corner.
_MAX_FORECAST_REACH = 100.0
_FIGSIZE_PER_PANEL = (4.6, 3.6)


def finite(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, not a number, NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def series(records: Records, key: str) -> tuple[list[float], list[float], list[float | None]]:
    """``(tokens, values, stderrs)`` of ``key`` over the snapshots that measured it.

    Snapshots at 0 tokens are left out (the axis is log tokens), as are missing and
    non-finite values; ``stderrs`` holds ``<key>_stderr`` where the records have it.
    """
    tokens, values, errors = [], [], []
    for record in records:
        t, y = finite(record.get(keys.TOKENS)), finite(record.get(key))
        if t is None or t <= 0 or y is None:
            continue
        tokens.append(t)
        values.append(y)
        errors.append(finite(record.get(f"{key}_stderr")))
    return tokens, values, errors


@dataclass(frozen=True)
class Inflection:
    """The detector's latest view of one signal (None where it has not said).

    ``forecast_high`` is None when the interval is unbounded above.
    """

    crossed: bool
    bottom_tokens: float | None
    forecast_tokens: float | None
    forecast_low: float | None
    forecast_high: float | None


def inflection(records: Records, signal: str) -> Inflection | None:
    """The latest ``inflection/<signal>/...`` values in ``records``, or None if there are none.

    A missing or infinite ``forecast_high`` ("it may never turn up") reads as None: the
    interval then runs to the right edge of the plot.
    """
    prefix = f"inflection/{signal}/"
    for record in reversed(records):
        fields = {f: record.get(prefix + f) for f in INFLECTION_FIELDS}
        if all(v is None for v in fields.values()):
            continue
        return Inflection(
            crossed=bool(finite(fields["crossed"])),
            bottom_tokens=_positive(fields["bottom_tokens"]),
            forecast_tokens=_positive(fields["forecast_tokens"]),
            forecast_low=_positive(fields["forecast_low"]),
            forecast_high=_positive(fields["forecast_high"]),
        )
    return None


def _positive(value: Any) -> float | None:
    value = finite(value)
    return value if value is not None and value > 0 else None


def _matching(records: Records, pattern: re.Pattern[str]) -> list[re.Match[str]]:
    seen: dict[str, re.Match[str]] = {}
    for record in records:
        for key in record:
            if key not in seen and (match := pattern.match(key)):
                seen[key] = match
    return list(seen.values())


def _by_number(labels: Iterable[str]) -> list[str]:
    def number(label: str) -> float:
        try:
            return float(label)
        except ValueError:
            return math.inf

    return sorted(set(labels), key=lambda s: (number(s), s))


def _colors(n: int, cmap: str) -> list[Any]:
    from matplotlib import colormaps

    palette = colormaps[cmap]
    return [palette(0.15 + 0.7 * i / max(n - 1, 1)) for i in range(n)]


def _new_figure(panels: int, title: str, left: float = 0.65) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = _FIGSIZE_PER_PANEL
    fig = Figure(figsize=(width * panels, height))
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=11)
    # Fixed margins (in inches) rather than a layout engine: half the rendering time.
    fig.subplots_adjust(
        left=left / (width * panels),
        right=1 - 0.15 / (width * panels),
        bottom=0.5 / height,
        top=1 - 0.6 / height,
        wspace=0.3,
    )
    return fig, list(fig.subplots(1, panels, squeeze=False)[0])


def _tokens_axis(ax: Axes, ylabel: str, title: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)


def plot_signal(
    ax: Axes,
    records: Records,
    key: str,
    *,
    label: str,
    color: Any,
    linestyle: str = "-",
) -> bool:
    """Draw ``key`` against tokens with its standard-error band and its inflection marks.

    The bottom found by the detector gets a ring (filled once the inflection is
    crossed); the forecast ``T*`` a dashed line and its interval a shaded span.

    Returns:
        Whether anything was drawn.
    """
    tokens, values, errors = series(records, key)
    if not tokens:
        return False
    mark = inflection(records, key)
    if mark is not None and mark.crossed:
        label = f"{label} (crossed)"
    ax.plot(tokens, values, marker="o", markersize=3, color=color, linestyle=linestyle, label=label)
    if any(e is not None for e in errors):
        low = [y - (e or 0.0) for y, e in zip(values, errors)]
        high = [y + (e or 0.0) for y, e in zip(values, errors)]
        ax.fill_between(tokens, low, high, color=color, alpha=0.15, linewidth=0)
    if mark is None:
        return True
    if mark.bottom_tokens is not None:
        bottom = mark.bottom_tokens
        nearest = min(range(len(tokens)), key=lambda i: abs(math.log(tokens[i] / bottom)))
        ax.plot(
            [bottom],
            [values[nearest]],
            marker="o",
            markersize=10,
            markerfacecolor=color if mark.crossed else "none",
            markeredgecolor=color,
            markeredgewidth=1.5,
            alpha=0.8,
        )
    if mark.forecast_tokens is not None:
        reach = max(tokens) * _MAX_FORECAST_REACH
        if mark.forecast_tokens <= reach:
            ax.axvline(mark.forecast_tokens, color=color, linestyle="--", linewidth=1.2)
        low, high = mark.forecast_low, mark.forecast_high
        if low is not None and low <= reach:
            high = reach if high is None else min(high, reach)
            ax.axvspan(low, high, color=color, alpha=0.08)
    return True


def _legend(ax: Axes, marks: bool) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if marks:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles += [
            Line2D([], [], marker="o", color="grey", markerfacecolor="none", linestyle="none"),
            Line2D([], [], color="grey", linestyle="--"),
            Patch(color="grey", alpha=0.2),
        ]
        labels += ["bottom (filled: crossed)", "forecast T*", "T* interval"]
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="best")


def _has_marks(records: Records, names: Iterable[str]) -> bool:
    return any(inflection(records, k) is not None for k in names)


def noise_figure(records: Records) -> Figure | None:
    """Reference and perturbed loss per gamma, and ``delta`` per gamma; None if neither exists."""
    matches = _matching(records, NOISE)
    has_reference = bool(series(records, keys.REFERENCE_LOSS)[0])
    if not matches and not has_reference:
        return None
    gammas = _by_number(m["gamma"] for m in matches)
    colors = dict(zip(gammas, _colors(len(gammas), "viridis")))
    has_delta = any(m["quantity"] == "delta" for m in matches)
    fig, axes = _new_figure(2 if has_delta else 1, "Sensitivity to Gaussian noise")

    loss_ax = axes[0]
    plot_signal(loss_ax, records, keys.REFERENCE_LOSS, label="reference", color="black")
    loss_keys = [f"noise/gamma={g}/perturbed_loss" for g in gammas]
    for gamma, key in zip(gammas, loss_keys):
        plot_signal(loss_ax, records, key, label=f"γ={gamma}", color=colors[gamma])
    _tokens_axis(loss_ax, "loss", "reference and perturbed loss")
    _legend(loss_ax, _has_marks(records, [keys.REFERENCE_LOSS, *loss_keys]))

    if has_delta:
        delta_ax = axes[1]
        delta_keys = [f"noise/gamma={g}/delta" for g in gammas]
        for gamma, key in zip(gammas, delta_keys):
            plot_signal(delta_ax, records, key, label=f"γ={gamma}", color=colors[gamma])
        _tokens_axis(delta_ax, "perturbed − reference loss", "sensitivity δ")
        _legend(delta_ax, _has_marks(records, delta_keys))
    return fig


def finetune_figure(records: Records) -> Figure | None:
    """Forgetting and the losses after fine-tuning, per learning rate; None if none exist."""
    matches = _matching(records, FINETUNE)
    if not matches:
        return None
    lrs = _by_number(m["lr"] for m in matches)
    colors = dict(zip(lrs, _colors(len(lrs), "plasma")))
    panels = [
        (q, title)
        for q, title in (
            ("forgetting", "forgetting (pretraining loss rise)"),
            ("reference_loss_after", "pretraining loss after fine-tuning"),
            ("downstream_loss_after", "downstream loss after fine-tuning"),
        )
        if any(m["quantity"] == q for m in matches)
    ]
    fig, axes = _new_figure(len(panels), "Fine-tuning probe")
    for ax, (quantity, title) in zip(axes, panels):
        names = [f"finetune/lr={lr}/{quantity}" for lr in lrs]
        if quantity == "reference_loss_after":
            plot_signal(
                ax, records, keys.REFERENCE_LOSS, label="before", color="black", linestyle=":"
            )
        for lr, key in zip(lrs, names):
            plot_signal(ax, records, key, label=f"lr={lr}", color=colors[lr])
        _tokens_axis(ax, "loss", title)
        _legend(ax, _has_marks(records, names))
    return fig


def _log_edges(tokens: Sequence[float]) -> list[float]:
    # Cell borders halfway between snapshots in log space, so each column sits on its T.
    logs = [math.log(t) for t in tokens]
    if len(logs) == 1:
        return [tokens[0] / math.sqrt(2), tokens[0] * math.sqrt(2)]
    mids = [(a + b) / 2 for a, b in itertools.pairwise(logs)]
    return [math.exp(x) for x in [2 * logs[0] - mids[0], *mids, 2 * logs[-1] - mids[-1]]]


def layers_figure(records: Records) -> Figure | None:
    """Per-layer ``delta`` as a tokens x layer heatmap, one panel per gamma; None if absent."""
    matches = _matching(records, LAYER)
    if not matches:
        return None
    import numpy as np

    gammas = _by_number(m["gamma"] for m in matches)
    fig, axes = _new_figure(len(gammas), "Per-layer sensitivity δ", left=0.9)
    for ax, gamma in zip(axes, gammas):
        layers = list(dict.fromkeys(m["layer"] for m in matches if m["gamma"] == gamma))
        names = [f"noise/gamma={gamma}/layer={layer}/delta" for layer in layers]
        rows = [
            r
            for r in records
            if (_positive(r.get(keys.TOKENS)) is not None)
            and any(finite(r.get(k)) is not None for k in names)
        ]
        if not rows:
            ax.set_axis_off()
            continue
        tokens = [float(r[keys.TOKENS]) for r in rows]
        grid = np.array([[finite(r.get(k)) for r in rows] for k in names], dtype=float)
        mesh = ax.pcolormesh(
            _log_edges(tokens),
            np.arange(len(layers) + 1),
            np.ma.masked_invalid(grid),
            cmap="magma",
            shading="flat",
        )
        ax.set_xscale("log")
        ax.set_yticks(np.arange(len(layers)) + 0.5, layers, fontsize=7)
        ax.invert_yaxis()  # the first layer on top, as in the model
        ax.set_xlabel("tokens")
        ax.set_title(f"γ={gamma}", fontsize=10)
        fig.colorbar(mesh, ax=ax, label="δ")
    return fig


FIGURES = {"noise": noise_figure, "finetune": finetune_figure, "layers": layers_figure}


def render_figures(records: Records) -> dict[str, Figure]:
    """Every figure the records have data for, by name (``noise``, ``finetune``, ``layers``).

    Example::

        figures = render_figures(read_history("lightning_logs/version_0/overtrain/history.jsonl"))
        figures["noise"].savefig("noise.png")
    """
    out = {}
    for name, draw in FIGURES.items():
        fig = draw(records)
        if fig is not None:
            out[name] = fig
    return out


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# The PNGs of the latest history rendered: the file and W&B reporters both show the
# same pictures at each snapshot, and rendering is the slow part, so it happens once.
_last_render: tuple[tuple[Any, ...], dict[str, bytes]] | None = None


def render_pngs(records: Records, dpi: int = 100) -> dict[str, bytes]:
    """Every figure of :func:`render_figures` as PNG bytes, by name.

    Rendering the same history twice in a row (same list, same length, same last
    record) returns the first result.
    """
    global _last_render
    key = (id(records), len(records), repr(records[-1]) if records else None, dpi)
    if _last_render is not None and _last_render[0] == key:
        return _last_render[1]
    pngs = {name: png_bytes(fig, dpi) for name, fig in render_figures(records).items()}
    _last_render = (key, pngs)
    return pngs


def write_figures(records: Records, directory: str, dpi: int = 100) -> dict[str, str]:
    """Render the figures and write each as ``<directory>/<name>.png``, replacing old ones.

    Files are replaced atomically, so a reader never sees half a PNG.

    Returns:
        ``{name: path}`` of the files written.
    """
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for name, png in render_pngs(records, dpi).items():
        path = os.path.join(directory, f"{name}.png")
        with open(path + ".tmp", "wb") as f:
            f.write(png)
        os.replace(path + ".tmp", path)
        paths[name] = path
    return paths
