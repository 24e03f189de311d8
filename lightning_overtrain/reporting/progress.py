"""A progress bar while a snapshot's probes run, shown through Lightning's own progress bar.

A snapshot can take minutes (many passes over the reference set, fine-tuning
branches), and the training bar stands still meanwhile. :class:`SnapshotProgress`
counts the loss evaluations the probes make and shows them as a second bar under
the training bar: a task in a ``RichProgressBar``, a tqdm bar otherwise. The total
is what the previous snapshot needed (unknown at the first one). Nothing is shown
when the trainer has no progress bar (``enable_progress_bar=False``) or on ranks
other than zero.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from lightning_overtrain.engine.losses import LossFn

if TYPE_CHECKING:
    import lightning.pytorch as pl


class _Bar(Protocol):
    def update(self) -> None: ...

    def close(self) -> None: ...


class _RichBar:
    def __init__(self, progress: Any, description: str, total: int | None) -> None:
        self.progress = progress
        # Lightning's Rich progress draws an unknown total as an infinite task.
        self.task = progress.add_task(description, total=float("inf") if total is None else total)

    def update(self) -> None:
        self.progress.update(self.task, advance=1)

    def close(self) -> None:
        self.progress.remove_task(self.task)


class _TqdmBar:
    def __init__(self, position: int, description: str, total: int | None) -> None:
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        self.bar = Tqdm(
            desc=description,
            total=total,
            position=position,
            leave=False,
            dynamic_ncols=True,
            file=sys.stdout,
            unit="pass",
            smoothing=0,
        )

    def update(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _open_bar(trainer: pl.Trainer, description: str, total: int | None) -> _Bar | None:
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    callback = trainer.progress_bar_callback
    if callback is None or callback.is_disabled or not trainer.is_global_zero:
        return None
    if isinstance(callback, RichProgressBar):
        if callback.progress is None:
            return None  # the live display is not running (e.g. stopped by the user)
        return _RichBar(callback.progress, description, total)
    # Just under the training bar, where the validation bar would go.
    position = 2 * callback.process_position + 1 if isinstance(callback, TQDMProgressBar) else 1
    return _TqdmBar(position, description, total)


def label_epochs_of_a_steps_run(trainer: pl.Trainer) -> None:
    """Make a Rich progress bar say ``Epoch 0``, not ``Epoch 0/-2``, in a ``max_steps`` run.

    Lightning's ``RichProgressBar`` writes ``Epoch <n>/<max_epochs - 1>`` even when
    ``max_epochs`` is -1 (the default of a run bounded by ``max_steps``). Only that label
    of that bar changes; any other bar, or a run with ``max_epochs``, is left as it is.
    """
    from lightning.pytorch.callbacks import RichProgressBar

    bar = trainer.progress_bar_callback
    if not isinstance(bar, RichProgressBar) or (trainer.max_epochs or 0) >= 0:
        return
    describe = type(bar)._get_train_description

    def epoch_only(current_epoch: int) -> str:
        label = describe(bar, current_epoch)
        return label.replace(f"/{trainer.max_epochs - 1}", "", 1) if trainer.max_epochs else label

    bar._get_train_description = epoch_only  # type: ignore[method-assign]


def counted(loss_fn: LossFn, tick: Callable[[], None]) -> LossFn:
    """``loss_fn`` that calls ``tick()`` before each evaluation; same results."""

    def loss(module: Any, batch: Any) -> Any:
        tick()
        return loss_fn(module, batch)

    loss.__name__ = getattr(loss_fn, "__name__", "loss_fn")
    return loss


class SnapshotProgress:
    """Counts a snapshot's loss evaluations and shows them in the trainer's progress bar.

    Example::

        progress = SnapshotProgress()
        with progress.track(trainer, "Probing at 1,048,576 tokens") as tick:
            ctx.loss_fn = counted(ctx.loss_fn, tick)
            record = measure_snapshot(ctx, probes, on_failure)
    """

    def __init__(self) -> None:
        self.expected: int | None = None
        """Loss evaluations the previous snapshot made: the next bar's total."""

    @contextmanager
    def track(self, trainer: pl.Trainer, description: str) -> Iterator[Callable[[], None]]:
        """Show a bar for the duration of the block; yields the ``tick`` to call per pass."""
        bar = _open_bar(trainer, description, self.expected)
        count = 0

        def tick() -> None:
            nonlocal count
            count += 1
            if bar is not None:
                bar.update()

        try:
            yield tick
        finally:
            if bar is not None:
                bar.close()
            self.expected = count or None
