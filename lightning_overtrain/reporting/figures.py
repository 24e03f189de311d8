"""The monitor's history as pictures: every declared signal against log tokens.

Pure functions from history records (see :mod:`lightning_overtrain.keys`) to
matplotlib figures, laid out by the probes' :class:`~lightning_overtrain.keys.Signal`
declarations (each names its figure, panel, label and unit; without declarations
they are inferred from the keys). They draw whatever the records hold and skip the
rest. The built-in probes give:

- ``noise``: the reference loss and the perturbed loss per gamma (the U-shaped
  curves), and ``delta`` per gamma (the sensitivity, rising with tokens);
- ``finetune`` (or the fine-tune probe's ``name``): forgetting, and the pretraining
  and downstream losses after fine-tuning, per learning rate;
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning_overtrain import keys
from lightning_overtrain.keys import Signal

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Records = Sequence[Mapping[str, Any]]

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
    for record in reversed(records):
        fields = {f: record.get(keys.inflection_key(signal, f)) for f in keys.INFLECTION_FIELDS}
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


def _colors_by_label(figure: Sequence[Signal], bases: set[str]) -> dict[str, Any]:
    # One colour per label across a figure's panels (the same gamma in both), the
    # falling base terms in black.
    labels = list(dict.fromkeys(s.label for s in figure if s.key not in bases))
    cmap = "viridis" if figure[0].figure == "noise" else "plasma"
    return dict(zip(labels, _colors(len(labels), cmap)))


def _panels(figure: Sequence[Signal]) -> dict[str, list[Signal]]:
    panels: dict[str, list[Signal]] = {}
    for signal in figure:
        panels.setdefault(signal.panel, []).append(signal)
    return panels


def line_figure(records: Records, figure: Sequence[Signal]) -> Figure | None:
    """One panel per declared ``panel`` with data, each signal a curve; None without data.

    A panel's signals that share a ``base`` not drawn in the figure get it as a dotted
    black curve; a signal that is another's ``base`` is drawn in black.
    """
    present = [s for s in figure if series(records, s.key)[0]]
    if not present:
        return None
    in_figure = {s.key for s in present}
    bases = {s.base for s in figure if s.base is not None}
    colors = _colors_by_label(present, bases)
    panels = _panels(present)
    fig, axes = _new_figure(len(panels), present[0].title)
    for ax, (title, signals) in zip(axes, panels.items()):
        shared = {s.base for s in signals}
        base = shared.pop() if len(shared) == 1 else None
        if base is not None and base not in in_figure:
            plot_signal(ax, records, base, label="reference", color="black", linestyle=":")
        for signal in signals:
            black = signal.key in bases
            color = "black" if black else colors[signal.label]
            plot_signal(ax, records, signal.key, label=signal.label, color=color)
        _tokens_axis(ax, signals[-1].unit, title)
        _legend(ax, _has_marks(records, [s.key for s in signals]))
    return fig


def _log_edges(tokens: Sequence[float]) -> list[float]:
    # Cell borders halfway between snapshots in log space, so each column sits on its T.
    logs = [math.log(t) for t in tokens]
    if len(logs) == 1:
        return [tokens[0] / math.sqrt(2), tokens[0] * math.sqrt(2)]
    mids = [(a + b) / 2 for a, b in itertools.pairwise(logs)]
    return [math.exp(x) for x in [2 * logs[0] - mids[0], *mids, 2 * logs[-1] - mids[-1]]]


def heatmap_figure(records: Records, figure: Sequence[Signal]) -> Figure | None:
    """Tokens x signals heatmaps, one panel per declared ``panel`` (rows: the panel's
    signals by label, e.g. per-layer ``delta`` per gamma); None without data."""
    present = [s for s in figure if series(records, s.key)[0]]
    if not present:
        return None
    import numpy as np

    panels = _panels(present)
    fig, axes = _new_figure(len(panels), present[0].title, left=0.9)
    for ax, (title, signals) in zip(axes, panels.items()):
        layers = [s.label for s in signals]
        names = [s.key for s in signals]
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
        ax.set_title(title, fontsize=10)
        fig.colorbar(mesh, ax=ax, label=signals[0].unit)
    return fig


def figure_signals(
    records: Records, signals: Sequence[Signal] | None = None
) -> dict[str, list[Signal]]:
    """The drawn signals by figure name: ``signals`` (default: inferred from the records'
    keys), then the built-in declarations of keys they leave out."""
    names = dict.fromkeys(k for r in records for k in r)
    out: dict[str, list[Signal]] = {}
    for signal in keys.merge_signals(signals or (), names):
        if signal.plot is not None and signal.figure:
            out.setdefault(signal.figure, []).append(signal)
    return out


def render_figures(records: Records, signals: Sequence[Signal] | None = None) -> dict[str, Figure]:
    """Every figure the records have data for, by name (``noise``, ``finetune``, ``layers``...).

    Args:
        records: the history.
        signals: the probes' declarations (as saved in ``monitor.json``); None infers
            the built-in ones from the keys.

    Example::

        figures = render_figures(read_history("lightning_logs/version_0/overtrain/history.jsonl"))
        figures["noise"].savefig("noise.png")
    """
    out = {}
    for name, figure in figure_signals(records, signals).items():
        draw = heatmap_figure if figure[0].plot == "heatmap" else line_figure
        fig = draw(records, figure)
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


def render_pngs(
    records: Records, dpi: int = 100, signals: Sequence[Signal] | None = None
) -> dict[str, bytes]:
    """Every figure of :func:`render_figures` as PNG bytes, by name.

    Rendering the same history twice in a row (same list, same length, same last
    record) returns the first result.
    """
    global _last_render
    key = (id(records), len(records), repr(records[-1]) if records else None, dpi, repr(signals))
    if _last_render is not None and _last_render[0] == key:
        return _last_render[1]
    pngs = {name: png_bytes(fig, dpi) for name, fig in render_figures(records, signals).items()}
    _last_render = (key, pngs)
    return pngs


def write_figures(
    records: Records, directory: str, dpi: int = 100, signals: Sequence[Signal] | None = None
) -> dict[str, str]:
    """Render the figures and write each as ``<directory>/<name>.png``, replacing old ones.

    Files are replaced atomically, so a reader never sees half a PNG.

    Returns:
        ``{name: path}`` of the files written.
    """
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for name, png in render_pngs(records, dpi, signals).items():
        path = os.path.join(directory, f"{name}.png")
        with open(path + ".tmp", "wb") as f:
            f.write(png)
        os.replace(path + ".tmp", path)
        paths[name] = path
    return paths
