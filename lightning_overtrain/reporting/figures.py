"""The monitor's history as pictures: every declared signal against log tokens.

Pure functions from history records (see :mod:`lightning_overtrain.keys`) to
matplotlib figures, laid out by the probes' :class:`~lightning_overtrain.keys.Signal`
declarations (each names its figure, panel, label and unit). Only a history saved
without declarations (an older run) has them inferred from its keys, in one place,
:func:`figure_signals`. They draw whatever the records hold and skip the rest. The
built-in probes give:

- ``noise``: the reference loss and the perturbed loss per gamma (the U-shaped
  curves), and ``delta`` per gamma (the sensitivity, rising with tokens);
- ``finetune`` (or the fine-tune probe's ``name``): forgetting, and the pretraining
  and downstream losses after fine-tuning, per learning rate, with the tuned lr as a
  pale stroke under the lr it picks (both stay visible), and the lr it picked;
- ``layers``: per-layer sensitivity as a tokens x layer heatmap, one per gamma.

Where the records carry ``inflection/<signal>/...`` keys, the signal's curve gets the
detector's marks, in the console's words (see
:mod:`~lightning_overtrain.reporting.figure_marks`). A panel's y-axis spans at least
its noise band, and says "flat within" it when the curves move less. How it all looks
(colours with 3:1 contrast on white, a grid of two panels per row, tick labels, the
legend) is in :mod:`~lightning_overtrain.reporting.figure_style`. Figures are
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
from lightning_overtrain.history import infer_signals
from lightning_overtrain.keys import Signal
from lightning_overtrain.reporting import figure_style as style
from lightning_overtrain.reporting.figure_marks import (
    Inflection,
    draw_marks,
    finite,
    inflection,
    real_bottom,
)
from lightning_overtrain.safe_io import write_atomic

__all__ = ["Inflection", "finite", "inflection", "real_bottom", "render_figures", "series"]

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Records = Sequence[Mapping[str, Any]]


def series(
    records: Records, key: str, stderr: str | None = None
) -> tuple[list[float], list[float], list[float | None]]:
    """``(tokens, values, stderrs)`` of ``key`` over the snapshots that measured it.

    Snapshots at 0 tokens are left out (the axis is log tokens), as are missing and
    non-finite values; ``stderrs`` holds the ``stderr`` key's values (default
    ``<key>_stderr``, a :class:`~lightning_overtrain.keys.Signal`'s default) where present.
    """
    stderr = stderr or key + keys.STDERR_SUFFIX
    tokens, values, errors = [], [], []
    for record in records:
        t, y = finite(record.get(keys.TOKENS)), finite(record.get(key))
        if t is None or t <= 0 or y is None:
            continue
        tokens.append(t)
        values.append(y)
        errors.append(finite(record.get(stderr)))
    return tokens, values, errors


@dataclass
class _Curve:
    """One curve of a panel, as drawn: its points, its noise, and the detector's marks."""

    label: str
    color: Any
    tokens: list[float]
    values: list[float]
    errors: list[float | None]
    mark: Inflection | None
    selection: bool = False


def _draw_curve(ax: Axes, curve: _Curve, linestyle: str = "-") -> set[str]:
    state = {"crossed": " (crossed: TURNED UP)", "rising": " (rising above its bottom)"}
    shown = curve.label + (state.get(curve.mark.state, "") if curve.mark is not None else "")
    if curve.selection:
        ax.plot(curve.tokens, curve.values, label=shown, **style.selection_style(curve.color))
        return {"selection"}
    line = {"marker": "o", "markersize": 3.5, "linestyle": linestyle, "gid": style.DATA_GID}
    ax.plot(curve.tokens, curve.values, color=curve.color, label=shown, zorder=3, **line)
    if not any(e is not None for e in curve.errors):
        return set()
    low = [y - (e or 0.0) for y, e in zip(curve.values, curve.errors)]
    high = [y + (e or 0.0) for y, e in zip(curve.values, curve.errors)]
    ax.fill_between(curve.tokens, low, high, color=curve.color, alpha=0.15, linewidth=0)
    return {"band"}


def _picks_from(curve: _Curve, others: Sequence[_Curve]) -> bool:
    """Whether ``curve`` equals one of ``others`` at every snapshot (a view that picks
    among them, as the tuned lr does): drawn as it is, it would hide the one it picks."""
    if len(curve.tokens) < 1 or not others:
        return False
    at = [dict(zip(o.tokens, o.values)) for o in others]
    return all(
        any(t in points and math.isclose(points[t], y, rel_tol=1e-9) for points in at)
        for t, y in zip(curve.tokens, curve.values)
    )


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

    The detector's bottom gets a ring and its forecast a dashed line, as
    :mod:`~lightning_overtrain.reporting.figure_marks` draws them. The x-axis is fitted to
    the curves drawn so far: a forecast past it is written at the edge with an arrow.

    Args:
        ax: the axes to draw on.
        records: the history.
        key: the signal's record key.
        label: its legend label (the detector's state is added once it says one).
        color: its colour (see :func:`~lightning_overtrain.reporting.figure_style.palette`).
        linestyle: its line style.

    Returns:
        Whether anything was drawn.

    Example::

        fig, (ax,) = figure_style.new_figure(1, "mine")
        plot_signal(ax, records, "noise/gamma=1/perturbed_loss", label="γ=1", color="C0")
    """
    tokens, values, errors = series(records, key)
    if not tokens:
        return False
    curve = _Curve(label, color, tokens, values, errors, inflection(records, key))
    _draw_curve(ax, curve, linestyle)
    style.fit_tokens(ax)
    draw_marks(ax, tokens, values, curve.mark, label, color)
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


# One curve to draw: its declaration, colour and line style.
_Todo = tuple[Signal, Any, str]


def _curves(records: Records, todo: Sequence[_Todo]) -> list[_Curve]:
    out: list[_Curve] = []
    for signal, color, _ in todo:
        tokens, values, errors = series(records, signal.key, signal.stderr)
        mark = inflection(records, signal.key)
        curve = _Curve(signal.label, color, tokens, values, errors, mark)
        curve.selection = _picks_from(curve, [c for c in out if not c.selection])
        out.append(curve)
    return out


def _draw_panel(ax: Axes, records: Records, todo: Sequence[_Todo]) -> int:
    curves = _curves(records, todo)
    marks: set[str] = set()
    for curve, (_, _, linestyle) in zip(curves, todo):
        marks |= _draw_curve(ax, curve, linestyle)
    style.fit_tokens(ax)  # to every curve first, so no mark decides the axis
    for curve in curves:
        marks |= draw_marks(ax, curve.tokens, curve.values, curve.mark, curve.label, curve.color)
    drawn = [y for c in curves for y in c.values]
    if {signal.unit for signal, _, _ in todo} == {"lr"}:  # a setting chosen per snapshot
        style.choice_axis(ax, drawn)
    else:
        noise = max((e for c in curves for e in c.errors if e is not None), default=0.0)
        style.fit_values(ax, drawn, noise)
    return style.legend(ax, sorted(marks))


def line_figure(records: Records, figure: Sequence[Signal]) -> Figure | None:
    """One panel per declared ``panel`` with data, each signal a curve; None without data.

    A panel's signals that share a ``base`` not drawn in the figure get it as a dotted
    black curve; a signal that is another's ``base`` is drawn in black. A curve that
    picks, at every snapshot, one of the panel's earlier curves (the tuned lr) is a wide
    pale stroke under them, so both stay visible. Each panel's y-label is its signals'
    ``unit``; its x-axis fits the data, its y-axis spans at least the noise band (see
    :func:`~lightning_overtrain.reporting.figure_style.fit_values`).
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
    below: list[int] = []
    for ax, (title, signals) in zip(axes, panels.items()):
        shared = {s.base for s in signals}
        base = shared.pop() if len(shared) == 1 else None
        todo: list[_Todo] = []
        if base and base not in in_figure:
            todo.append((Signal(base, label="reference"), "black", ":"))
        for signal in signals:
            todo.append((signal, "black" if signal.key in bases else colors[signal.label], "-"))
        below.append(_draw_panel(ax, records, todo))
        ax.set_ylabel(_units(signals))
        ax.set_title(title, fontsize=11)
    rows = [below[i : i + style.COLUMNS] for i in range(0, len(below), style.COLUMNS)]
    style.make_room_below(fig, [max(row) for row in rows])
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
            if (finite(r.get(keys.TOKENS)) or 0) > 0
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
        ax.set_yticks(np.arange(len(layers)) + 0.5, layers, fontsize=8)
        ax.invert_yaxis()  # the first layer on top, as in the model
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=10)
        fig.colorbar(mesh, ax=ax, label=_units(signals))
    return fig


def figure_signals(
    records: Records, signals: Sequence[Signal] | None = None
) -> dict[str, list[Signal]]:
    """The drawn signals by figure name, as the probes declared them.

    Only a history saved without declarations (``signals`` None or empty: an older run)
    has them inferred from its keys, by :func:`~lightning_overtrain.history.infer_signals`.
    """
    if signals:
        declared = list(signals)
    else:
        declared = infer_signals(dict.fromkeys(k for r in records for k in r))
    out: dict[str, list[Signal]] = {}
    for signal in declared:
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
