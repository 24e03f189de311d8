"""Counting tokens and steps, and asking the cadence: is a snapshot due?

The half of :class:`~lightning_overtrain.core.monitor_core.MonitorCore` that runs on
every step: the hot path. No host sync and no collective unless the batches' shapes
say a snapshot may be due (:class:`~lightning_overtrain.core.token_clock.TokenClock`).
"""

from __future__ import annotations

from typing import Any

from lightning_overtrain.callbacks.cadence import Cadence
from lightning_overtrain.core.token_clock import TokenClock


class TokenSteps:
    """The per-step calls of :class:`~lightning_overtrain.core.monitor_core.MonitorCore`."""

    # Set in MonitorCore.__init__; it also gives tokens and _device().
    clock: TokenClock
    cadence: Cadence
    last_step: int
    _state_before_snapshot: dict[str, Any] | None
    _cadence_before: dict[str, Any] | None

    def after_batch(self, batch: Any, step: int) -> bool:
        """A micro-batch was trained on; ``step`` is the optimizer steps taken so far.

        The hot path: no host sync and no collective unless a snapshot may be due.

        Returns:
            Whether a snapshot is due now (call :meth:`snapshot` on every rank).
        """
        self.clock.add(batch)
        if step == self.last_step:
            return False  # inside a gradient-accumulation window: no optimizer step yet
        return self.end_step(step)

    def count(self, batch: Any) -> None:
        """A micro-batch was trained on (no host sync, no collective)."""
        self.clock.add(batch)

    def count_tokens(self, tokens: int) -> None:
        """This rank trained on ``tokens`` more tokens (no collective)."""
        self.clock.add_count(tokens)

    def end_step(self, step: int) -> bool:
        """Optimizer step ``step`` finished: whether a snapshot is due now (every rank)."""
        self.last_step = step
        self.clock.end_step()
        return self._due(step)

    def set_tokens(self, tokens: int, step: int) -> bool:
        """The framework's own count of this run's tokens (all ranks) after optimizer ``step``.

        Returns:
            Whether a snapshot is due now.
        """
        self.clock.set_counted(tokens)
        self.last_step = step
        return self._due(step, counted=True)

    @property
    def probing(self) -> bool:
        """Whether a snapshot holds the model now (its forward passes are not training's)."""
        return self._state_before_snapshot is not None

    def _due(self, step: int, counted: bool = False) -> bool:
        if not counted and not self.clock.may_be_due(self.cadence, step):
            return False
        self.clock.sync(self._device())
        cadence = self.cadence.state_dict()  # before `due` moves past this threshold
        if self.cadence.due(step, self.tokens):
            self._cadence_before = cadence
            return True
        return False
