"""Forgetting at a matched fine-tune loss (Rofin et al., arXiv 2604.13627).

Forgetting after a fixed number of fine-tune steps mixes two things: how fragile
the snapshot is, and how far it had to move to learn the task. Comparing
snapshots where their fine-tunes reach the **same held-out downstream loss**
separates them: the fine-tune runs until that loss is at or below a target
(within a step cap), and the forgetting is read there, together with the number
of steps it took.

:class:`FineTuneWatch` follows one fine-tune step by step: it takes the
fixed-budget measurements at the budget's last step and the matched ones at the
first step that reaches the target, and says when the fine-tune may stop.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lightning_overtrain import keys
from lightning_overtrain.engine.contract import ProbeContext
from lightning_overtrain.engine.losses import LossFn, loss_sums
from lightning_overtrain.keys import Signal
from lightning_overtrain.probes.downstream import HeldOut

#: Record quantities per lr: ``<probe>/lr=<lr>/<quantity>``.
MATCHED_FORGETTING = "matched_forgetting"
MATCHED_STEPS = "matched_steps"
MATCHED_REACHED = "matched_reached"


class FineTuneWatch:
    """Called after every optimizer step of one fine-tune (``after_step`` of ``train_steps``).

    Args:
        ctx: the snapshot's context.
        held_out: the held-out downstream split.
        loss_fn: the downstream loss function.
        steps: the fixed budget: at this step the full measurement is taken.
        target: the matched downstream loss, or None (no matched view).
        cap: the most steps the matched view may take (>= ``steps`` steps are run anyway).
        before: the held-out downstream loss before fine-tuning (reached at step 0 when
            already at or below ``target``).

    Attributes:
        fixed: the measurement after ``steps`` steps (``reference_loss``, ``downstream_loss``,
            maybe ``metric``); None until then.
        reached_at: the first step whose downstream loss is at or below ``target``.
        reference_at: the reference loss at that step.
    """

    def __init__(
        self,
        ctx: ProbeContext,
        held_out: HeldOut,
        loss_fn: LossFn,
        steps: int,
        target: float | None,
        cap: int,
        before: float,
    ) -> None:
        self.ctx, self.held_out, self.loss_fn = ctx, held_out, loss_fn
        self.steps, self.target, self.cap = steps, target, cap
        self.fixed: dict[str, float] | None = None
        self.reached_at: int | None = None
        self.reference_at: float | None = None
        if target is not None and before <= target:
            self.reached_at, self.reference_at = 0, ctx.reference_loss

    @property
    def total_steps(self) -> int:
        """Steps to run at most: the budget, or the cap when the matched view needs more."""
        return self.steps if self.target is None else max(self.steps, self.cap)

    def __call__(self, step: int) -> bool:
        """Measure after optimizer step ``step``; True once nothing is left to measure."""
        ctx, matching = self.ctx, self.target is not None and self.reached_at is None
        if step != self.steps and not matching:
            return self.fixed is not None
        ctx.module.eval()  # the same evaluation as the fixed-budget one; no dropout drawn
        try:
            with torch.no_grad():
                if step == self.steps:
                    self.fixed = self.held_out.evaluate(ctx, self.loss_fn, reference=True)
                    downstream = self.fixed["downstream_loss"]
                    reference = self.fixed["reference_loss"]
                else:
                    downstream, reference = self._downstream_loss(), None
                if matching and self.target is not None and downstream <= self.target:
                    if reference is None:
                        sums = ctx.reduce_or_fail(ctx.local_loss_sums, (2,))
                        reference = float(sums[0] / sums[1])
                    self.reached_at, self.reference_at = step, reference
        finally:
            ctx.module.train()
            # FSDP2 may keep the gathered weights after this forward: the next optimizer
            # step writes the shards, and the next forward must gather them again.
            ctx.backup.reshard()
        done_matching = self.target is None or self.reached_at is not None or step >= self.cap
        return self.fixed is not None and done_matching

    def _downstream_loss(self) -> float:
        held, ctx = self.held_out, self.ctx

        def local() -> torch.Tensor:
            return loss_sums(
                ctx.module, held.batches, held.weights, self.loss_fn, ctx.forward_context
            )

        sums = ctx.reduce_or_fail(local, (2,))
        return float(sums[0] / sums[1])

    def record(self, lr: float, probe: str) -> dict[str, float]:
        """The matched view's keys for ``lr``: reached or not, and where it was reached."""
        if self.target is None:
            return {}
        key = lambda q: keys.finetune_key(lr, q, probe)  # noqa: E731
        if self.reached_at is None or self.reference_at is None:
            return {key(MATCHED_REACHED): 0.0}
        return {
            key(MATCHED_REACHED): 1.0,
            key(MATCHED_STEPS): float(self.reached_at),
            key(MATCHED_FORGETTING): self.reference_at - self.ctx.reference_loss,
        }


def matched_signals(lrs: Iterable[float], probe: str, title: str) -> list[Signal]:
    """The matched view's curves, per lr: forgetting at the target, and the steps it took.

    Neither is U-shaped, so the default policy does not watch them and neither can be
    the best snapshot's signal: the matched forgetting is a sensitivity (like the
    fixed-budget forgetting, it is expected to rise as the snapshot grows fragile),
    and early on its level is set by how far the snapshot is from the target rather
    than by fragility (a snapshot already at the target forgets nothing), and a
    snapshot that misses the target within the cap has no point at all: a bottom
    read from such a curve would not be the checkpoint to keep.
    """
    out = []
    panels = {
        MATCHED_FORGETTING: (
            "forgetting at the matched downstream loss",
            "Δ pretraining loss (after − before)",
        ),
        MATCHED_STEPS: ("fine-tune steps to reach the matched downstream loss", "steps"),
    }
    for quantity, (panel, unit) in panels.items():
        for lr in sorted(set(lrs)):
            out.append(
                Signal(
                    keys.finetune_key(lr, quantity, probe),
                    label=keys.lr_key(lr),
                    unit=unit,
                    figure=probe,
                    title=title,
                    panel=panel,
                    rank=None,
                )
            )
    return out
