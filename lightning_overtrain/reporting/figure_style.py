"""How the figures look: readable colours, a log-tokens axis that fits the data, marks at its edges.

Split from :mod:`lightning_overtrain.reporting.figures`, which decides *what* is drawn;
this module decides how it reads. matplotlib is imported only inside the functions
that need it, so importing this module costs nothing without it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: The least contrast ratio of a line colour against the white background (WCAG 2.1's
#: minimum for graphics, 3:1).
MIN_CONTRAST = 3.0
FIGSIZE_PER_PANEL = (4.6, 3.6)
#: The gid of the measured curves: the tokens axis is fitted to these, never to a mark.
DATA_GID = "overtrain-data"
BEYOND_GID = "overtrain-beyond"
# The x-axis runs this factor past the data on each side, and spans at least
# _MIN_SPAN, so that even one snapshot gets two tick labels.
_PAD = 10**0.08
_MIN_SPAN = 4.0
# Sequential maps cut before their light end: the last colour still has 3:1 contrast.
_MAP_RANGE = {"viridis": (0.15, 0.55), "plasma": (0.0, 0.6)}


def relative_luminance(color: Any) -> float:
    """WCAG 2.1 relative luminance of a matplotlib colour (0 for black, 1 for white)."""
    from matplotlib.colors import to_rgb

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in to_rgb(color))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(color: Any, background: Any = "white") -> float:
    """WCAG 2.1 contrast ratio of two colours, from 1 (the same) to 21 (black on white)."""
    a, b = sorted((relative_luminance(color), relative_luminance(background)))
    return (b + 0.05) / (a + 0.05)


def readable(color: Any, minimum: float = MIN_CONTRAST) -> tuple[float, float, float]:
    """``color`` darkened (same hue) until its contrast on white is at least ``minimum``."""
    from matplotlib.colors import to_rgb

    rgb = to_rgb(color)
    for step in range(100):
        darker = tuple(c * (1 - step / 100) for c in rgb)
        if contrast_ratio(darker) >= minimum:
            return darker
    return (0.0, 0.0, 0.0)


def palette(n: int, cmap: str) -> list[tuple[float, float, float]]:
    """``n`` colours in order along ``cmap``, each with :data:`MIN_CONTRAST` on white.

    The named maps are sampled only up to where they are still dark enough; any other
    map is sampled over 0.1-0.9 and darkened where it is too light.
    """
    from matplotlib import colormaps

    low, high = _MAP_RANGE.get(cmap, (0.1, 0.9))
    colors = colormaps[cmap]
    return [readable(colors(low + (high - low) * i / max(n - 1, 1))) for i in range(n)]


def new_figure(panels: int, title: str) -> tuple[Figure, list[Axes]]:
    """A figure of ``panels`` side by side on the Agg canvas (no pyplot, no global state).

    Constrained layout sizes the margins to the labels, so no tick label, axis label or
    title is cut off at any size the figure is saved at (the W&B images included).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = FIGSIZE_PER_PANEL
    fig = Figure(figsize=(width * panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=11)
    return fig, list(fig.subplots(1, panels, squeeze=False)[0])


def tokens_axis(ax: Axes) -> None:
    """Log tokens on x: labels in engineering notation (``100k``, ``1M``) on major ticks only.

    Decades are labelled; a range under two decades also at 2 and 5 times each decade
    (and 3 under one decade). Minor ticks stay, unlabelled, so labels never crowd.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from lightning_overtrain.inflection.verdicts import tokens_text

    ax.set_xscale("log")
    low, high = ax.get_xlim()
    decades = math.log10(high / low)
    subs = (1.0,) if decades >= 2 else (1.0, 2.0, 5.0) if decades >= 1 else (1.0, 2.0, 3.0, 5.0)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: tokens_text(x)))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs="auto"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("tokens")
    ax.grid(True, which="major", alpha=0.3)


def data_tokens(ax: Axes) -> tuple[float, float] | None:
    """The token range of the measured curves drawn on ``ax`` (lines with :data:`DATA_GID`)."""
    xs = [
        float(x)
        for line in ax.get_lines()
        if line.get_gid() == DATA_GID
        for x in line.get_xdata()
        if x > 0
    ]
    return (min(xs), max(xs)) if xs else None


def fit_tokens(ax: Axes) -> tuple[float, float] | None:
    """Fit the x-axis to the measured curves, with a margin, and fix it there.

    Later marks (a forecast, its interval) cannot stretch the axis: autoscaling is off
    once the limits are set. Returns the new limits, or None without curves.
    """
    found = data_tokens(ax)
    if found is None:
        return None
    low, high = found[0] / _PAD, found[1] * _PAD
    if high / low < _MIN_SPAN:
        widen = math.sqrt(_MIN_SPAN * low / high)
        low, high = low / widen, high * widen
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    tokens_axis(ax)
    return low, high


def ring(ax: Axes, tokens: float, value: float, color: Any, filled: bool) -> None:
    """A ring around the point ``(tokens, value)``: a curve's bottom (filled: crossed)."""
    ax.plot(
        [tokens],
        [value],
        marker="o",
        markersize=10,
        markerfacecolor=color if filled else "none",
        markeredgecolor=color,
        markeredgewidth=1.5,
        alpha=0.8,
        linestyle="none",
    )


def mark_beyond(ax: Axes, text: str, color: Any, side: str = "right") -> None:
    """Write ``text`` with an arrow at the ``side`` edge of ``ax``, for a mark past the axis.

    Marks stack downward from the top corner, one line each, in the curve's colour.
    """
    slot = sum(1 for t in ax.texts if t.get_gid() == BEYOND_GID)
    right = side == "right"
    ax.text(
        0.985 if right else 0.015,
        0.97 - 0.075 * slot,
        f"{text} →" if right else f"← {text}",
        transform=ax.transAxes,
        ha="right" if right else "left",
        va="top",
        fontsize=7,
        color=color,
        gid=BEYOND_GID,
        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
    )


def bound_text(value: float | None, latest: float) -> str:
    """A forecast bound as the verdicts quote it: ``"32M"``, ``"∞"`` for None, and
    ``">100M"`` past :data:`~lightning_overtrain.inflection.verdicts.FAR_FACTOR` x ``latest``."""
    from lightning_overtrain.inflection.verdicts import FAR_FACTOR, far_tokens, tokens_text

    if value is None:
        return "∞"
    return (
        f">{tokens_text(FAR_FACTOR * latest)}" if far_tokens(value, latest) else tokens_text(value)
    )


def log_edges(tokens: Sequence[float]) -> list[float]:
    """Heatmap cell borders halfway between snapshots in log space: each column sits on its T."""
    logs = [math.log(t) for t in tokens]
    if len(logs) == 1:
        return [tokens[0] / 2, tokens[0] * 2]  # wide enough for two tick labels
    mids = [(a + b) / 2 for a, b in itertools.pairwise(logs)]
    return [math.exp(x) for x in [2 * logs[0] - mids[0], *mids, 2 * logs[-1] - mids[-1]]]


def legend(ax: Axes, marks: Sequence[str]) -> None:
    """The legend of ``ax``, with a grey key for each kind of mark drawn on it.

    Args:
        marks: which of ``"bottom"``, ``"forecast"`` and ``"interval"`` were drawn.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    keys = {
        "bottom": (
            Line2D([], [], marker="o", color="grey", markerfacecolor="none", linestyle="none"),
            "bottom (filled: crossed)",
        ),
        "forecast": (Line2D([], [], color="grey", linestyle="--"), "forecast T*"),
        "interval": (Patch(color="grey", alpha=0.2), "T* interval"),
    }
    for kind in ("bottom", "forecast", "interval"):
        if kind in marks:
            handles.append(keys[kind][0])
            labels.append(keys[kind][1])
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="best")
