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
its bottom ringed (only a real one, see :func:`real_bottom`) and the forecast ``T*``
drawn with its interval; the tokens axis fits the data, so a forecast past it is cut
at the edge and written there. How it all looks (colours with 3:1 contrast on white,
tick labels, layout) is in :mod:`~lightning_overtrain.reporting.figure_style`. Figures are
plain :class:`~matplotlib.figure.Figure` objects on the Agg canvas: no pyplot, no
display, no global state, so rendering is safe in any training process. matplotlib
is imported only when a figure is drawn, so it stays an optional dependency.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning_overtrain import keys
from lightning_overtrain.keys import Signal
from lightning_overtrain.reporting import figure_style as style
from lightning_overtrain.safe_io import write_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Records = Sequence[Mapping[str, Any]]


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


def real_bottom(tokens: Sequence[float], mark: Inflection | None) -> int | None:
    """The index in ``tokens`` of the detector's bottom, if it is a real one; else None.

    A real bottom is a measured snapshot with snapshots on both sides: the detector's
    minimum of a curve still falling (its last point) or only rising (its first) is an
    end of the curve, not a bottom, and gets no ring.

    Example::

        real_bottom([1e5, 1e6, 1e7], inflection(records, "noise/gamma=1/perturbed_loss"))
    """
    if mark is None or mark.bottom_tokens is None or not tokens:
        return None
    bottom = mark.bottom_tokens
    i = min(range(len(tokens)), key=lambda j: abs(math.log(tokens[j] / bottom)))
    on_a_snapshot = abs(math.log(tokens[i] / bottom)) < 0.01
    return i if on_a_snapshot and 0 < i < len(tokens) - 1 else None


def _draw_curve(ax: Axes, records: Records, key: str, label: str, color: Any, linestyle: str):
    tokens, values, errors = series(records, key)
    if not tokens:
        return None
    mark = inflection(records, key)
    shown = f"{label} (crossed)" if mark is not None and mark.crossed else label
    line = {"marker": "o", "markersize": 3, "linestyle": linestyle, "gid": style.DATA_GID}
    ax.plot(tokens, values, color=color, label=shown, **line)
    if any(e is not None for e in errors):
        low = [y - (e or 0.0) for y, e in zip(values, errors)]
        high = [y + (e or 0.0) for y, e in zip(values, errors)]
        ax.fill_between(tokens, low, high, color=color, alpha=0.15, linewidth=0)
    return tokens, values, mark


def _draw_marks(ax: Axes, drawn: tuple, label: str, color: Any) -> set[str]:
    # The bottom ring, T* and its interval, on an axis already fitted to the data: a mark
    # past the axis is cut at its edge and written there, never allowed to stretch it.
    tokens, values, mark = drawn
    kinds: set[str] = set()
    if mark is None:
        return kinds
    if (i := real_bottom(tokens, mark)) is not None:
        style.ring(ax, tokens[i], values[i], color, filled=mark.crossed)
        kinds.add("bottom")
    if mark.forecast_tokens is None:
        return kinds
    kinds.add("forecast")
    left, right = ax.get_xlim()
    t, low, high = mark.forecast_tokens, mark.forecast_low, mark.forecast_high
    latest = max(tokens)

    def bound(value: float | None) -> str:
        return style.bound_text(value, latest)

    if left <= t <= right:
        ax.axvline(t, color=color, linestyle="--", linewidth=1.2)
    if low is not None and (start := max(low, left)) < (end := min(high or math.inf, right)):
        ax.axvspan(start, end, color=color, alpha=0.08)
        kinds.add("interval")
    if t > right:
        far = bound(t).startswith(">")  # an extrapolation: its interval means nothing more
        interval = "" if low is None or far else f" [{bound(low)}, {bound(high)}]"
        style.mark_beyond(ax, f"{label}: T* {bound(t)}{' (extrapolated)' * far}{interval}", color)
    elif t < left:
        style.mark_beyond(ax, f"{label}: T* {bound(t)}", color, side="left")
    elif high is None or high > right:
        style.mark_beyond(ax, f"{label}: T* interval to {bound(high)}", color)
    return kinds


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

    A real bottom found by the detector (see :func:`real_bottom`) gets a ring, filled
    once the inflection is crossed; the forecast ``T*`` a dashed line and its interval a
    shaded span. The x-axis is fitted to the curves drawn so far: a forecast past it is
    cut at the edge and written there (``γ=1: T* 20M [3M, 40M] →``).

    Args:
        ax: the axes to draw on.
        records: the history.
        key: the signal's record key.
        label: its legend label (``(crossed)`` is added once crossed).
        color: its colour (see :func:`~lightning_overtrain.reporting.figure_style.palette`).
        linestyle: its line style.

    Returns:
        Whether anything was drawn.

    Example::

        fig, (ax,) = figure_style.new_figure(1, "mine")
        plot_signal(ax, records, "noise/gamma=1/perturbed_loss", label="γ=1", color="C0")
    """
    drawn = _draw_curve(ax, records, key, label, color, linestyle)
    if drawn is None:
        return False
    style.fit_tokens(ax)
    _draw_marks(ax, drawn, label, color)
    return True


def _colors_by_label(figure: Sequence[Signal], bases: set[str]) -> dict[str, Any]:
    # One colour per label across a figure's panels (the same gamma in both), the
    # falling base terms in black.
    labels = list(dict.fromkeys(s.label for s in figure if s.key not in bases))
    return dict(zip(labels, style.palette(len(labels), "plasma")))


def _panels(figure: Sequence[Signal]) -> dict[str, list[Signal]]:
    panels: dict[str, list[Signal]] = {}
    for signal in figure:
        panels.setdefault(signal.panel, []).append(signal)
    return panels


def _units(signals: Sequence[Signal]) -> str:
    # The y-label names what the panel's curves are, in their declared units.
    return " / ".join(dict.fromkeys(s.unit for s in signals))


def line_figure(records: Records, figure: Sequence[Signal]) -> Figure | None:
    """One panel per declared ``panel`` with data, each signal a curve; None without data.

    A panel's signals that share a ``base`` not drawn in the figure get it as a dotted
    black curve; a signal that is another's ``base`` is drawn in black. Each panel's
    y-label is its signals' ``unit``; its x-axis fits the data (see :func:`plot_signal`).
    """
    present = [s for s in figure if series(records, s.key)[0]]
    if not present:
        return None
    in_figure = {s.key for s in present}
    # The reference loss is black even before any perturbed loss names it as its base.
    bases = {s.base for s in figure if s.base is not None} | {keys.REFERENCE_LOSS}
    colors = _colors_by_label(present, bases)
    panels = _panels(present)
    fig, axes = style.new_figure(len(panels), present[0].title)
    for ax, (title, signals) in zip(axes, panels.items()):
        shared = {s.base for s in signals}
        base = shared.pop() if len(shared) == 1 else None
        todo = [(base, "reference", "black", ":")] if base and base not in in_figure else []
        for signal in signals:
            color = "black" if signal.key in bases else colors[signal.label]
            todo.append((signal.key, signal.label, color, "-"))
        curves = [(label, c, _draw_curve(ax, records, k, label, c, ls)) for k, label, c, ls in todo]
        style.fit_tokens(ax)  # to every curve first, so no mark decides the axis
        marks: set[str] = set()
        for label, color, drawn in curves:
            if drawn is not None:
                marks |= _draw_marks(ax, drawn, label, color)
        ax.set_ylabel(_units(signals))
        ax.set_title(title, fontsize=10)
        style.legend(ax, sorted(marks))
    return fig


def heatmap_figure(records: Records, figure: Sequence[Signal]) -> Figure | None:
    """Tokens x signals heatmaps, one panel per declared ``panel`` (rows: the panel's
    signals by label, e.g. per-layer ``delta`` per gamma); None without data."""
    present = [s for s in figure if series(records, s.key)[0]]
    if not present:
        return None
    import numpy as np

    panels = _panels(present)
    fig, axes = style.new_figure(len(panels), present[0].title)
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
            style.log_edges(tokens),
            np.arange(len(layers) + 1),
            np.ma.masked_invalid(grid),
            cmap="magma",
            shading="flat",
        )
        ax.set_xscale("log")
        style.tokens_axis(ax)
        ax.grid(False)
        ax.set_yticks(np.arange(len(layers)) + 0.5, layers, fontsize=7)
        ax.invert_yaxis()  # the first layer on top, as in the model
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=10)
        fig.colorbar(mesh, ax=ax, label=_units(signals))
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
        write_atomic(path, lambda f, png=png: f.write(png), binary=True)  # exclusive temp file
        paths[name] = path
    return paths
