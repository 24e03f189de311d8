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
#: Panels per row: a figure of four panels is a 2 x 2 grid, never a strip.
COLUMNS = 2
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
    """A figure of ``panels`` in rows of :data:`COLUMNS` on the Agg canvas (no pyplot).

    Two panels sit side by side; three or four make a 2 x 2 grid (an unused cell is
    removed), so every panel keeps a readable size. Constrained layout sizes the margins
    to the labels, so no tick label, axis label or title is cut off at any size the
    figure is saved at (the W&B images included).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(panels, COLUMNS)
    rows = math.ceil(panels / columns)
    width, height = FIGSIZE_PER_PANEL
    fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=12)
    axes = list(fig.subplots(rows, columns, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.remove()
    return fig, axes[:panels]


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
    """The token range of the measured curves drawn on ``ax`` (lines with :data:`DATA_GID`
    or :data:`SELECTION_GID`)."""
    xs = [
        float(x)
        for line in ax.get_lines()
        if line.get_gid() in (DATA_GID, SELECTION_GID)
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


#: The detector's three states of a bottom, in the words of the console line and the
#: verdicts: the lowest point so far; the latest snapshots rising above it by more than
#: the noise, not yet for ``patience`` snapshots; and crossed (the console's "TURNED UP").
BOTTOM_STATES = {
    "lowest": "lowest so far (no turn yet)",
    "rising": "rising above its bottom (not crossed yet)",
    "crossed": "crossed: TURNED UP at this bottom",
}
_FILL = {"lowest": "none", "rising": "left", "crossed": "full"}
RING_SIZE = 11


def ring(ax: Axes, tokens: float, value: float, color: Any, state: str) -> None:
    """A ring around a curve's bottom ``(tokens, value)``, filled by the detector's state.

    Args:
        state: a key of :data:`BOTTOM_STATES`: ``"lowest"`` an open ring, ``"rising"``
            half filled, ``"crossed"`` filled.
    """
    ax.plot([tokens], [value], linestyle="none", **_ring_style(color, state))


def _ring_style(color: Any, state: str) -> dict[str, Any]:
    fill = _FILL[state]
    return {
        "marker": "o",
        "markersize": RING_SIZE,
        "fillstyle": "full" if fill == "none" else fill,
        "markerfacecolor": "none" if fill == "none" else color,
        "markerfacecoloralt": "none",
        "markeredgecolor": color,
        "markeredgewidth": 1.8,
        "zorder": 4,
    }


def selection_style(color: Any) -> dict[str, Any]:
    """A wide pale stroke under the other curves: a view that picks, at each snapshot,
    one of the panel's curves (the tuned lr) stays visible without hiding them."""
    return {
        "color": color,
        "linewidth": 9,
        "alpha": 0.25,
        "solid_capstyle": "round",
        "zorder": 1,
        "gid": SELECTION_GID,
    }


SELECTION_GID = "overtrain-selection"


def mark_beyond(ax: Axes, text: str, color: Any, side: str = "right") -> None:
    """An arrow at the ``side`` edge of ``ax`` for a mark past the axis, explained in the legend.

    The arrow sits on the edge (at mid-height), in the curve's colour; ``text`` (what lies
    past the edge) becomes its legend entry, so it never covers a curve.
    """
    from matplotlib.transforms import blended_transform_factory

    right = side == "right"
    slot = sum(1 for line in ax.lines if line.get_gid() == BEYOND_GID)
    ax.plot(
        [0.985 if right else 0.015],
        [0.5 - 0.06 * slot],
        transform=blended_transform_factory(ax.transAxes, ax.transAxes),
        marker="$→$" if right else "$←$",
        markersize=12,
        color=color,
        linestyle="none",
        clip_on=False,
        zorder=5,
        gid=BEYOND_GID,
        label=f"{text} →" if right else f"← {text}",
    )


def bound_text(value: float, latest: float) -> str:
    """A forecast bound as the verdicts quote it: ``"32M"``, or ``">562M"`` past
    :data:`~lightning_overtrain.inflection.verdicts.FAR_FACTOR` x ``latest``. An open
    bound has no text: it is drawn as an arrow."""
    from lightning_overtrain.inflection.verdicts import FAR_FACTOR, far_tokens, tokens_text

    return (
        f">{tokens_text(FAR_FACTOR * latest)}" if far_tokens(value, latest) else tokens_text(value)
    )


def fit_values(ax: Axes, values: Sequence[float], noise: float) -> str | None:
    """Keep the y-range of ``ax`` at least the noise band, so noise never looks like a trend.

    Args:
        values: every value of the curves drawn on ``ax``.
        noise: the largest standard error drawn (0 without any).

    Returns:
        The note written in the panel when its curves are flat within the noise (their
        whole range inside ``±noise``, or inside 0.1% of their size without a standard
        error), else None.
    """
    if not values:
        return None
    low, high = min(values), max(values)
    size = max(abs(low), abs(high))
    band = 2 * noise if noise > 0 else 2e-3 * size
    if high - low >= band or band == 0:
        return None
    middle = (low + high) / 2
    ax.set_ylim(middle - band, middle + band)
    within = f"±{noise:.2g} (the standard error)" if noise > 0 else "0.1%"
    note = f"flat within {within}"
    ax.text(
        0.5,
        0.5,
        note,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=9,
        color="0.3",
        gid=FLAT_GID,
        bbox={"facecolor": "white", "edgecolor": "0.6", "alpha": 0.9, "pad": 3},
    )
    return note


FLAT_GID = "overtrain-flat"


def choice_axis(ax: Axes, values: Sequence[float]) -> None:
    """A y-axis for a chosen setting (the tuned lr): log scale, a tick per value chosen,
    and at least a factor of 10 in range, so one constant choice reads as one level."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    chosen = sorted({v for v in values if v > 0})
    if not chosen:
        return
    ax.set_yscale("log")
    low, high = chosen[0] / 3, chosen[-1] * 3
    ax.set_ylim(low, high)
    ax.yaxis.set_major_locator(FixedLocator(chosen))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def log_edges(tokens: Sequence[float]) -> list[float]:
    """Heatmap cell borders halfway between snapshots in log space: each column sits on its T."""
    logs = [math.log(t) for t in tokens]
    if len(logs) == 1:
        return [tokens[0] / 2, tokens[0] * 2]  # wide enough for two tick labels
    mids = [(a + b) / 2 for a, b in itertools.pairwise(logs)]
    return [math.exp(x) for x in [2 * logs[0] - mids[0], *mids, 2 * logs[-1] - mids[-1]]]


#: The legend's key for each kind of mark (drawn in grey: the colour is the curve's).
MARK_LABELS = {
    "band": "shaded: ± standard error",
    "selection": None,  # labelled by the curve itself
    **{f"bottom:{state}": text for state, text in BOTTOM_STATES.items()},
    "forecast": "forecast turn T* (dashed)",
    "interval": "T* interval",
}


def legend(ax: Axes, marks: Sequence[str]) -> int:
    """The legend of ``ax``: every curve, then a grey key for each kind of mark drawn.

    Args:
        marks: which kinds of :data:`MARK_LABELS` were drawn on ``ax``.

    Returns:
        The lines of legend placed below the panel (0 when it fits inside): the figure
        grows by that much (see :func:`make_room_below`).
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    for kind in MARK_LABELS:
        if kind not in marks or MARK_LABELS[kind] is None:
            continue
        if kind.startswith("bottom:"):
            handle: Any = Line2D([], [], linestyle="none", **_ring_style("grey", kind[7:]))
            handle.set_markersize(8)
        elif kind == "forecast":
            handle = Line2D([], [], color="grey", linestyle="--")
        else:
            handle = Patch(color="grey", alpha=0.25)
        handles.append(handle)
        labels.append(MARK_LABELS[kind])
    if len(handles) > _LEGEND_INSIDE:  # below the panel, where it covers no curve or mark
        ax.legend(
            handles,
            labels,
            fontsize=8,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.2),
            ncols=2,
            frameon=False,
        )
        return math.ceil(len(handles) / 2)
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="best", framealpha=0.9)
    return 0


def make_room_below(fig: Figure, lines_per_row: Sequence[int]) -> None:
    """Make ``fig`` taller by the legend lines placed under each row of panels, so the
    panels keep their size (constrained layout gives the room to the legends)."""
    extra = sum(_LEGEND_LINE_INCHES * n for n in lines_per_row)
    if extra:
        width, height = fig.get_size_inches()
        fig.set_size_inches(width, height + extra)


# A short legend fits inside its panel; a longer one goes below it.
_LEGEND_INSIDE = 4
_LEGEND_LINE_INCHES = 0.2
