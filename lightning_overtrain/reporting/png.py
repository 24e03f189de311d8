"""The probe curves as PNG files under the run's directory, whatever the logger (or none)."""

from __future__ import annotations

import importlib.util
import os
from time import monotonic
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_overtrain.history import PLOTS_DIR
from lightning_overtrain.reporting.base import Reporter

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_overtrain.callbacks.monitor import OvertrainingMonitor


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as missing
        return False


class PlotReporter(Reporter):
    """Writes ``noise.png``, ``finetune.png`` and ``layers.png`` (those with data).

    The files go to ``<monitor.dirpath>/<subdir>`` (``plots/`` by default, where
    ``lightning-overtrain report`` writes them too) and always show the whole
    history (see :mod:`lightning_overtrain.reporting.figures` for what each figure holds). They
    are redrawn at a snapshot when ``every_s`` seconds have passed since the last
    drawing (or since training started), and once more when training ends. The
    monitor adds this reporter by itself when matplotlib is installed. A plot that
    fails to render is a warning, never a training failure.

    Args:
        subdir: the folder under the monitor's directory.
        dpi: resolution of the PNGs.
        every_s: the least time between two drawings during training; drawing takes
            about a second, and snapshots minutes apart (the usual case) each get one.

    Raises:
        ValueError: on an empty ``subdir``, a ``dpi`` that is not a positive int or a
            negative ``every_s``.

    Example::

        monitor = OvertrainingMonitor(
            reference_data=val_batches,
            every_n_steps=500,
            reporters=[LoggerReporter(), FileReporter(), PlotReporter(dpi=150)],
        )
    """

    def __init__(self, subdir: str = PLOTS_DIR, dpi: int = 100, every_s: float = 60.0) -> None:
        if not isinstance(subdir, str) or not subdir:
            raise ValueError(f"`subdir` must be a non-empty folder name, got {subdir!r}.")
        if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 1:
            raise ValueError(f"`dpi` must be an int >= 1, got {dpi!r}. Pass e.g. dpi=100.")
        if isinstance(every_s, bool) or not isinstance(every_s, (int, float)) or not every_s >= 0:
            raise ValueError(
                f"`every_s` must be a number of seconds >= 0, got {every_s!r}."
                " Pass 0 to redraw at every snapshot."
            )
        self.subdir = subdir
        self.dpi = dpi
        self.every_s = float(every_s)
        self.paths: dict[str, str] = {}
        self._enabled = True
        self._drawn_at = 0.0
        self._drawn_snapshots = 0

    def config(self) -> dict[str, Any]:
        return {"subdir": self.subdir, "dpi": self.dpi, "every_s": self.every_s}

    def setup(self, trainer: pl.Trainer, monitor: OvertrainingMonitor) -> None:
        self._drawn_at, self._drawn_snapshots = monotonic(), 0
        self._enabled = matplotlib_available()
        if not self._enabled:
            rank_zero_warn(
                "PlotReporter: matplotlib is not installed, so no PNG plots will be written."
                " Install it with `pip install 'lightning-overtrain[plots]'`."
            )

    def report(
        self, trainer: pl.Trainer, monitor: OvertrainingMonitor, record: dict[str, float]
    ) -> None:
        if monotonic() - self._drawn_at >= self.every_s:
            self.draw(monitor)

    def teardown(self, trainer: pl.Trainer, monitor: OvertrainingMonitor) -> None:
        if len(monitor.history) != self._drawn_snapshots:
            self.draw(monitor)

    def draw(self, monitor: OvertrainingMonitor) -> None:
        """Write the PNGs of the monitor's whole history now."""
        if not self._enabled or not monitor.history:
            return
        from lightning_overtrain.reporting.figures import write_figures

        directory = os.path.join(monitor.dirpath, self.subdir)
        try:
            self.paths = write_figures(monitor.history, directory, dpi=self.dpi)
            self._drawn_at, self._drawn_snapshots = monotonic(), len(monitor.history)
        except Exception as exc:  # a broken plot must never stop a pretraining run
            self._enabled = False
            rank_zero_warn(
                f"PlotReporter: rendering the plots into {directory} failed"
                f" ({type(exc).__name__}: {exc}); no more plots for this run. Training goes"
                " on, and history.jsonl still holds every number."
            )
