"""The fine-tune with its lr tuned per snapshot (the paper's Figure 5 view)."""

from __future__ import annotations

from collections.abc import Mapping


def tuned_lr(results: Mapping[float, Mapping[str, float]]) -> dict[str, float]:
    """The fine-tune with the lr tuned for the downstream task (the paper's Figure 5 view).

    Of the learning rates measured at one snapshot, the one with the lowest held-out
    downstream loss after fine-tuning wins (the smaller lr on a tie); reported are that
    loss, the lr itself and the pretraining reference loss at that lr.

    Args:
        results: ``{lr: {"downstream_loss": ..., "reference_loss": ...}}`` after fine-tuning.

    Returns:
        ``{"downstream_loss_after", "lr", "reference_loss_after"}``.

    Raises:
        ValueError: if ``results`` is empty.

    Example::

        >>> tuned_lr({1e-4: {"downstream_loss": 2.0, "reference_loss": 1.5},
        ...           1e-3: {"downstream_loss": 1.8, "reference_loss": 1.9}})["lr"]
        0.001
    """
    if not results:
        raise ValueError("`results` is empty: no learning rate was measured.")
    lr = min(results, key=lambda r: (results[r]["downstream_loss"], r))
    return {
        "downstream_loss_after": results[lr]["downstream_loss"],
        "lr": lr,
        "reference_loss_after": results[lr]["reference_loss"],
    }
