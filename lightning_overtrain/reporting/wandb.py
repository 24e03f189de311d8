"""W&B extras: probe curves on a tokens x-axis, a table of snapshots, plots and alerts.

The scalars themselves reach W&B through the ``WandbLogger`` like any metric (see
:class:`~lightning_overtrain.reporting.loggers.LoggerReporter`); this reporter adds
what a plain logger cannot. It imports wandb only when a run starts, so the rest
of the package works without it, and a W&B failure is a warning, never a training
failure.

Why every key is defined by name: ``WandbLogger`` defines the glob ``*`` with
``trainer/global_step`` as x-axis. W&B matches a logged key against its globs in
no fixed order (wandb-core keeps them in a Go map), so a second glob
``overtrain/*`` -> ``overtrain/tokens`` wins only by chance, key by key. A metric
defined by its full name is never matched against globs, so this reporter defines
each new key before its first row is logged: list it before ``LoggerReporter``.
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_overtrain import keys
from lightning_overtrain.history import columns, scalars
from lightning_overtrain.reporting.base import Reporter, RunView
from lightning_overtrain.reporting.figures import finite
from lightning_overtrain.reporting.png import matplotlib_available

if TYPE_CHECKING:
    import lightning.pytorch as pl

TABLE_KEY = "snapshots"
PLOTS_KEY = "plots"
MAX_TITLE = 63  # wandb.alert: "must be less than 64 characters long"
_LEVELS = {"warn": "WARN", "stop": "ERROR"}


def find_wandb_run(trainer: pl.Trainer) -> Any | None:
    """The run of the first ``WandbLogger`` in ``trainer.loggers``, else ``wandb.run``, else None.

    Raises:
        Exception: whatever ``wandb.init`` raises when the logger starts its run.
    """
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    import wandb

    return wandb.run


class WandbReporter(Reporter):
    """Makes the monitor's W&B run readable: tokens x-axis, snapshot table, plots, alerts.

    On rank zero (the monitor calls reporters nowhere else), with the run of the
    trainer's ``WandbLogger`` (or the run passed as ``run``, or ``wandb.run``):

    - every ``<prefix>/...`` metric is plotted against ``<prefix>/tokens`` (the probes'
      declared signals are defined at set-up, any other key before its first row);
    - ``<prefix>/snapshots``: a ``wandb.Table`` with one row per snapshot and every
      number the probes produced, logged whole at each snapshot;
    - ``<prefix>/plots/<name>``: the figures of :mod:`lightning_overtrain.reporting.figures` as
      images, logged with the tokens at each snapshot;
    - the monitor's settings in the run config under ``<prefix>``;
    - :meth:`alert` sends ``wandb.alert`` (``WARN`` for a warning, ``ERROR`` for a
      stop), at most one per title and level every ``alert_interval_s`` seconds.

    The monitor adds this reporter by itself when a ``WandbLogger`` is in
    ``trainer.loggers``. If wandb is missing or its run fails to start, it warns and
    does nothing; training goes on.

    Args:
        run: a ``wandb`` run to use instead of the logger's.
        table: log the snapshot table.
        images: log the plots as images (needs matplotlib).
        dpi: resolution of the plots.
        alert_interval_s: the least time between two alerts of the same title and level.

    Raises:
        ValueError: on a negative ``alert_interval_s`` or a ``dpi`` that is not a positive int.

    Example::

        trainer = L.Trainer(
            logger=WandbLogger(project="pretrain"),
            callbacks=[OvertrainingMonitor(reference_data=val_batches, points_per_decade=4)],
        )
    """

    def __init__(
        self,
        *,
        run: Any | None = None,
        table: bool = True,
        images: bool = True,
        dpi: int = 100,
        alert_interval_s: float = 600.0,
    ) -> None:
        if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 1:
            raise ValueError(f"`dpi` must be an int >= 1, got {dpi!r}. Pass e.g. dpi=100.")
        if (
            isinstance(alert_interval_s, bool)
            or not isinstance(alert_interval_s, (int, float))
            or not alert_interval_s >= 0
        ):
            raise ValueError(
                f"`alert_interval_s` must be a number of seconds >= 0, got {alert_interval_s!r}."
                " Pass e.g. alert_interval_s=600 (at most one alert per title per 10 minutes)."
            )
        self.table = table
        self.images = images
        self.dpi = dpi
        self.alert_interval_s = float(alert_interval_s)
        self._given_run = run
        self.run: Any | None = None
        self._wandb: Any | None = None
        self._defined: set[str] = set()
        self._last_alert: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def config(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "images": self.images,
            "dpi": self.dpi,
            "alert_interval_s": self.alert_interval_s,
        }

    # ------------------------------------------------------------------ events
    def setup(self, trainer: pl.Trainer, view: RunView) -> None:
        self.run, self._defined = None, set()
        try:
            import wandb
        except ImportError:
            rank_zero_warn(
                "WandbReporter: wandb is not installed, so nothing goes to W&B."
                " Install it with `pip install 'lightning-overtrain[wandb]'`. Training goes on."
            )
            return
        try:
            run = self._given_run if self._given_run is not None else find_wandb_run(trainer)
        except Exception as exc:  # wandb.init failing (network, login) must not stop training
            self._disable("starting the W&B run", exc)
            return
        if run is None:
            rank_zero_warn(
                "WandbReporter: no W&B run to report to. Add a `WandbLogger` to the Trainer"
                " (or call `wandb.init()` first). Training goes on."
            )
            return
        if self.images and not matplotlib_available():
            self.images = False
            rank_zero_warn(
                "WandbReporter: matplotlib is not installed, so no plots go to W&B."
                " Install it with `pip install 'lightning-overtrain[wandb]'`."
            )
        self.run, self._wandb = run, wandb
        tokens = f"{view.prefix}/{keys.TOKENS}"
        declared = [k for s in view.signals for k in (s.key, s.stderr)]
        self._call(
            "setting up the W&B run",
            self._define_axes,
            tokens,
            f"{view.prefix}/*",
            list(keys.prefixed(view.prefix, dict.fromkeys(declared))),
            {view.prefix: {**dict(view.config), "wandb": self.config()}},
        )

    def report(self, trainer: pl.Trainer, view: RunView, record: dict[str, float]) -> None:
        if self.run is not None:
            self._call("logging the snapshot to W&B", self._log_snapshot, view, record)

    def alert(self, trainer: pl.Trainer, view: RunView, title: str, text: str, level: str) -> None:
        """Send ``wandb.alert``, unless one with this title and level went out recently.

        The text gets the run's position (tokens, step) and how many alerts were held
        back since the last one sent.
        """
        if self.run is None:
            return
        key, now = (title, level), monotonic()
        last = self._last_alert.get(key)
        if last is not None and now - last < self.alert_interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        held = self._suppressed.pop(key, 0)
        text = f"{text}\n\nAt {view.tokens:,} tokens, step {trainer.global_step}."
        if held:
            text += f" {held} similar alert(s) held back since the last one."
        short = title if len(title) <= MAX_TITLE else title[: MAX_TITLE - 1] + "…"
        sent = self._call(
            "sending a W&B alert",
            self.run.alert,
            title=short,
            text=text,
            level=_LEVELS.get(level, "INFO"),
            wait_duration=max(self.alert_interval_s, 1.0),
        )
        if sent:
            self._last_alert[key] = now

    # ------------------------------------------------------------------ W&B calls
    def _define_axes(
        self, tokens: str, glob: str, declared: list[str], config: dict[str, Any]
    ) -> None:
        assert self.run is not None
        self.run.define_metric(tokens)  # the x-axis itself: no step metric of its own
        self._defined.add(tokens)
        # For keys logged by others under the prefix; ours are defined by name below.
        self.run.define_metric(glob, step_metric=tokens, step_sync=True)
        # The probes' declared signals, before any is logged; other keys as they appear.
        self._define(declared, tokens)
        self.run.config.update(config, allow_val_change=True)

    def _define(self, names: list[str], tokens: str) -> None:
        assert self.run is not None
        for key in names:
            if key not in self._defined:
                self.run.define_metric(key, step_metric=tokens, step_sync=True)
                self._defined.add(key)

    def _log_snapshot(self, view: RunView, record: dict[str, float]) -> None:
        assert self.run is not None and self._wandb is not None
        tokens = f"{view.prefix}/{keys.TOKENS}"
        self._define(list(keys.prefixed(view.prefix, scalars(record))), tokens)
        row: dict[str, Any] = {}
        if self.table:
            names = columns([scalars(r) for r in view.history])  # no per-sample lists
            data = [[_cell(r.get(c)) for c in names] for r in view.history]
            row[f"{view.prefix}/{TABLE_KEY}"] = self._wandb.Table(columns=names, data=data)
        if self.images:
            row.update(self._images(view))
        if not row:
            return
        self._define(list(row), tokens)
        row[tokens] = record[keys.TOKENS]
        self.run.log(row)

    def _images(self, view: RunView) -> dict[str, Any]:
        import io

        from PIL import Image

        from lightning_overtrain.reporting.figures import render_pngs

        assert self._wandb is not None
        return {
            f"{view.prefix}/{PLOTS_KEY}/{name}": self._wandb.Image(Image.open(io.BytesIO(png)))
            for name, png in render_pngs(view.history, self.dpi, view.signals).items()
        }

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> bool:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # W&B trouble is reported once and never stops training
            self._disable(what, exc)
            return False
        return True

    def _disable(self, what: str, exc: Exception) -> None:
        self.run = None
        rank_zero_warn(
            f"WandbReporter: {what} failed ({type(exc).__name__}: {exc}). No more W&B tables,"
            " plots or alerts for this run; training goes on, and the history files and"
            " Lightning loggers still get every number."
        )


def _cell(value: Any) -> Any:
    # Missing and non-finite numbers become empty cells: W&B tables hold JSON values.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value if finite(value) is not None else None
    return value
