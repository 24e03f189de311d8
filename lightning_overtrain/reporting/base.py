"""Reporters: where the monitor's records go. Replaceable; the core imports no wandb.

A reporter sees the run through a :class:`RunView`, a read-only snapshot the monitor
hands it at each event, never the monitor itself: reporting stays below the callback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightning_overtrain.keys import Signal

if TYPE_CHECKING:
    import lightning.pytorch as pl


@dataclass(frozen=True)
class RunView:
    """What a reporter may read of the run, as it stands at one event.

    Attributes:
        dirpath: the monitor's directory (history files, plots, ``best.ckpt``).
        prefix: the metric prefix loggers see (``overtrain``).
        history: every record so far, in order (relative keys).
        tokens: ``T``, the tokens seen by the whole run.
        config: the monitor's settings, as in ``monitor.json``.
        signals: the probes' declared signals (see :class:`~lightning_overtrain.keys.Signal`).
        best_path: the kept best snapshot, or None.
        stop_reason: why the policy stopped training, or None.
    """

    dirpath: str
    prefix: str = "overtrain"
    history: Sequence[Mapping[str, Any]] = ()
    tokens: int = 0
    config: Mapping[str, Any] = field(default_factory=dict)
    signals: Sequence[Signal] = ()
    best_path: str | None = None
    stop_reason: str | None = None


class Reporter:
    """Receives the monitor's events on rank zero only.

    Reporters never make collective calls: the monitor calls them from rank zero
    after every rank has agreed on the numbers. Their first argument is the Lightning
    ``Trainer``, or outside it the front end's
    :class:`~lightning_overtrain.core.host.RunHandle` (``global_step``, ``loggers``,
    ``is_global_zero``), so a reporter that reads only those works under every front end.
    """

    def setup(self, trainer: pl.Trainer, view: RunView) -> None:
        """Called once before training, after the monitor has checked its inputs."""

    def report(self, trainer: pl.Trainer, view: RunView, record: dict[str, float]) -> None:
        """Called after every snapshot with the new record (relative keys)."""

    def alert(self, trainer: pl.Trainer, view: RunView, title: str, text: str, level: str) -> None:
        """Called when the monitor warns or stops (``level`` is ``"warn"`` or ``"stop"``)."""

    def teardown(self, trainer: pl.Trainer, view: RunView) -> None:
        """Called once when training ends."""

    def config(self) -> dict[str, Any]:
        return {}
