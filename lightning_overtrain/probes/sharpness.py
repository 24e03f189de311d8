"""Critical sharpness (Kalra et al., arXiv 2601.16979): curvature in a handful of forward passes.

Given an update direction ``Delta`` (the step training would take, per unit lr),
the **critical learning rate** ``eta_c`` is the smallest step size along it at
which the loss goes up: ``L(theta - eta * Delta) > L(theta)``. The **critical
sharpness** is ``lambda_c = 2 / eta_c``, the curvature whose gradient-descent
stability limit is ``eta_c``. It needs no Hessian-vector product, only loss
evaluations, found by a line search (:func:`critical_step`):

1. bracket: from ``initial_step``, double the step while the loss does not rise
   (or halve it while it does), until one step is below ``eta_c`` and the next
   above it;
2. refine: bisect that bracket in log-space ``refine`` times; ``eta_c`` is the
   geometric middle of the last bracket.

On a quadratic, ``lambda_c = Delta^T H Delta / g.Delta``; for the gradient direction
(``Delta = g``) that is ``g^T H g / g^T g``, the Hessian's Rayleigh quotient along
the gradient, never above its largest eigenvalue.

The **relative** critical sharpness is the same measurement of one loss along the
update direction of another: here the pretraining (reference) loss along the
fine-tuning direction (the downstream gradient, or a fresh AdamW's first step on
it), ``lambda_c = Delta_ft^T H_ref Delta_ft / g_ref.Delta_ft`` on a quadratic. It asks
how far a fine-tune can step before it starts to undo pretraining: a cheap
predictor of forgetting. When the fine-tuning direction raises the pretraining
loss from the first step on (``g_ref.Delta_ft <= 0``) there is no critical step, and
only their alignment is logged.

Here the loss is the monitor's fixed reference set (the same batches at every
snapshot, as for the other probes), not a fresh training batch, so the curve over
tokens is not sampling noise; the gradient ``g`` is that set's (token-weighted,
summed over ranks, so every rank steps along the same direction). The maths lives
in :mod:`lightning_overtrain.probes.critical`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_overtrain import keys
from lightning_overtrain.checks import check_int
from lightning_overtrain.engine.collectives import rank as global_rank
from lightning_overtrain.engine.contract import Probe, ProbeContext, ProbeFailure
from lightning_overtrain.engine.data import check_batches_argument, split_for_rank, take_batches
from lightning_overtrain.engine.losses import LossFn, check_loss
from lightning_overtrain.engine.sharding import any_sharded
from lightning_overtrain.engine.tokens import TokensFn, checked_token_count, count_tokens
from lightning_overtrain.keys import Signal
from lightning_overtrain.probes.critical import (
    adam_update,
    check_adam,
    critical_step,
    global_dots,
    loss_rises,
    mean_gradient,
)

__all__ = ["SharpnessProbe", "adam_update", "check_adam", "critical_step"]

DIRECTIONS = ("gradient", "update")
RELATIVE_DIRECTIONS = ("gradient", "adam")
Data = Iterable[Any] | Callable[[], Iterable[Any]]


class SharpnessProbe(Probe):
    """Critical sharpness ``lambda_c = 2 / eta_c`` along the training update direction.

    At every snapshot: the reference set's gradient ``g`` on the borrowed model, the
    direction ``Delta`` (``g`` itself, or the step the training Adam/AdamW optimizer
    would take with ``g``), then a line search for the smallest step ``eta_c`` at
    which the reference loss rises (:func:`critical_step`). Logged, with
    ``sharpness`` the probe's ``name``:

    * ``sharpness/critical_sharpness``: ``2 / eta_c``;
    * ``sharpness/critical_lr``: ``eta_c``;
    * ``sharpness/forward_passes``: reference-set evaluations the search took;
    * with ``downstream_data``, the relative critical sharpness of the reference loss
      along the fine-tuning direction: ``sharpness/relative_critical_sharpness``,
      ``sharpness/relative_critical_lr``, ``sharpness/relative_forward_passes``, and
      always ``sharpness/relative_alignment``, the cosine between the reference
      gradient and the fine-tuning direction (<= 0: the fine-tune raises the
      pretraining loss at once, and the critical values are not logged).

    Cost: one backward pass over the reference set and ``forward_passes`` forward
    passes (about 5-10). Memory: the gradient and the direction, two parameter-sized
    tensors. The training gradients are set aside, the optimizer is only read, and
    the weights are restored after every evaluation. Under DDP every rank gets the
    same summed gradient, so all take the same steps and reach the same answer;
    under FSDP2 each rank holds and steps its shard of the direction only, and the
    sums and dot products are added across ranks (the numbers of one process). The
    relative view adds one backward pass over ``downstream_data``, its forward
    passes, and one more parameter-sized tensor.

    Args:
        direction: ``"gradient"`` (``Delta = g``; any optimizer) or ``"update"``
            (Adam/AdamW's next step per unit lr, from the optimizer the monitor passes
            in ``ctx.extras["optimizer"]``; see :func:`adam_update`).
        initial_step: the first step size tried; > 0. Default: the optimizer's lr for
            ``"update"`` (training sits near its edge of stability), 0.01 for
            ``"gradient"``. The search brackets from there in factors of 2.
        refine: bisections of the factor-2 bracket; ``eta_c`` is known to within a
            factor ``2 ** (2 ** -(refine + 1))`` (4 gives 2.2%).
        max_steps: evaluations allowed while bracketing; >= 2.
        name: the metric prefix.
        downstream_data: fine-tuning batches (a DataLoader, a list, or a callable
            returning either); the first ``downstream_batches`` are taken once, before
            training, and their gradient gives the fine-tuning direction. None
            (default): no relative view.
        downstream_batches: take at most this many batches; default 8.
        relative_direction: ``"gradient"`` (the downstream gradient) or ``"adam"`` (the
            first step of a fresh AdamW with torch's defaults, the fine-tune probe's
            default optimizer, per unit lr).
        downstream_loss_fn: the loss of a downstream batch; default the monitor's.
        tokens_fn: tokens in a downstream batch (its weight); default counts
            ``attention_mask`` or ``input_ids``.

    Raises:
        ValueError: on bad arguments; before training, for ``direction="update"``
            without an Adam/AdamW training optimizer, or downstream batches the loss
            cannot take.

    Example::

        monitor = OvertrainingMonitor(
            val_batches, points_per_decade=4, probes=[NoiseProbe(), SharpnessProbe()]
        )
    """

    def __init__(
        self,
        direction: str = "update",
        *,
        initial_step: float | None = None,
        refine: int = 4,
        max_steps: int = 40,
        name: str = "sharpness",
        downstream_data: Data | None = None,
        downstream_batches: int = 8,
        relative_direction: str = "gradient",
        downstream_loss_fn: LossFn | None = None,
        tokens_fn: TokensFn | None = None,
    ) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(
                f"`direction` must be one of {DIRECTIONS}, got {direction!r}. Pass"
                " direction='update' (Adam/AdamW's step) or direction='gradient'."
            )
        if initial_step is not None and (
            isinstance(initial_step, bool)
            or not isinstance(initial_step, (int, float))
            or not math.isfinite(initial_step)
            or initial_step <= 0
        ):
            raise ValueError(
                f"`initial_step` must be a finite number > 0 or None, got {initial_step!r}."
                " Pass e.g. initial_step=1e-3, or None for the default."
            )
        self.refine = check_int("refine", refine, 0, "Pass e.g. refine=4.")
        self.max_steps = check_int("max_steps", max_steps, 2, "Pass e.g. max_steps=40.")
        if not isinstance(name, str) or not name or "/" in name or any(c.isspace() for c in name):
            raise ValueError(
                f"`name` must be a non-empty string without '/' or spaces, got {name!r}."
            )
        if downstream_data is not None:
            check_batches_argument(
                downstream_data, "downstream_data", "fine-tuning batches, e.g. prose_loader"
            )
        if relative_direction not in RELATIVE_DIRECTIONS:
            raise ValueError(
                f"`relative_direction` must be one of {RELATIVE_DIRECTIONS}, got"
                f" {relative_direction!r}. Pass relative_direction='gradient'."
            )
        for argument, fn in (("downstream_loss_fn", downstream_loss_fn), ("tokens_fn", tokens_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"`{argument}` must be callable or None, got {fn!r}.")
        self.downstream_batches = check_int(
            "downstream_batches", downstream_batches, 1, "Pass e.g. downstream_batches=8."
        )
        self.direction = direction
        self.initial_step = None if initial_step is None else float(initial_step)
        self.name = name
        self.downstream_data = downstream_data
        self.relative_direction = relative_direction
        self.downstream_loss_fn = downstream_loss_fn
        self.tokens_fn: TokensFn = tokens_fn or count_tokens
        # Taken in validate(), once per fit: the same direction data at every snapshot.
        self._downstream: list[Any] = []
        self._downstream_weights: list[int] = []

    def config(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "initial_step": self.initial_step,
            "refine": self.refine,
            "max_steps": self.max_steps,
            "relative": None if self.downstream_data is None else self.relative_direction,
            "downstream_batches": self.downstream_batches,
        }

    def signals(self) -> list[Signal]:
        """The critical sharpness and step (and their relative views), one figure each.

        Rising, not U-shaped: sharpness is a sensitivity, not a loss whose bottom is
        the checkpoint to keep, so the default policy does not watch it.
        """
        out = self._figure(f"Critical sharpness along the {self.direction}", "", self.name)
        if self.downstream_data is not None:
            title = (
                "Relative critical sharpness: pretraining loss along the fine-tuning"
                f" {self.relative_direction}"
            )
            out += self._figure(title, "relative_", f"{self.name}_relative")
            out.append(
                Signal(
                    keys.sharpness_key("relative_alignment", self.name),
                    label=self.name,
                    unit="cosine",
                    figure=f"{self.name}_relative",
                    title=title,
                    panel="alignment of the fine-tuning direction with the pretraining gradient",
                    rank=None,
                )
            )
        return out

    def _figure(self, title: str, prefix: str, figure: str) -> list[Signal]:
        return [
            Signal(
                keys.sharpness_key(prefix + quantity, self.name),
                label=self.name,
                unit=unit,
                figure=figure,
                title=title,
                panel=panel,
                rank=None,
            )
            for quantity, panel, unit in (
                ("critical_sharpness", "critical sharpness λc = 2/ηc", "λc"),
                ("critical_lr", "critical step ηc (the loss rises past it)", "ηc"),
            )
        ]

    def validate(self, ctx: ProbeContext) -> None:
        if self.direction == "update":
            optimizer = ctx.extras.get("optimizer")
            if optimizer is None:
                raise ValueError(
                    "SharpnessProbe(direction='update') needs the training optimizer in"
                    " ctx.extras['optimizer'] (the monitor passes trainer.optimizers[0])."
                    " Pass direction='gradient' to measure along the gradient instead."
                )
            check_adam(optimizer)
        if self.downstream_data is None:
            return
        # Seeded: a shuffling DataLoader gives the same batches on every rank and every fit.
        taken = take_batches(
            self.downstream_data, self.downstream_batches, "downstream_data", seed=0
        )
        weights = [checked_token_count(self.tokens_fn, b) for b in taken]
        if sum(weights) == 0:
            raise ValueError(
                "`downstream_data` holds 0 tokens according to `tokens_fn`. Check its"
                " batches' `input_ids`/`attention_mask`, or pass `tokens_fn`."
            )
        # Sharded (FSDP2): every rank runs every backward pass, so no rank's share is empty.
        even = any_sharded(ctx.backup.params)
        local, self._downstream_weights = split_for_rank(
            taken, weights, global_rank(), ctx.world_size, even
        )
        self._downstream = [move_data_to_device(b, ctx.device) for b in local]
        first = move_data_to_device(taken[0], ctx.device)
        check_loss(ctx.module, ctx.backup, first, self._downstream_loss(ctx), "downstream_data")

    def run(self, ctx: ProbeContext) -> dict[str, float]:
        params = [p for p in ctx.backup.params if p.requires_grad]
        grads = mean_gradient(ctx, params, ctx.batches, ctx.weights, ctx.loss_fn)
        if self.direction == "update":
            optimizer = ctx.extras["optimizer"]
            step = adam_update(optimizer, params, grads)
            first = self.initial_step or float(optimizer.param_groups[0]["lr"])
        else:
            step, first = grads, self.initial_step or 0.01
        if not first > 0:
            raise ProbeFailure(f"the initial step is {first}; pass initial_step > 0")
        eta, passes = critical_step(
            loss_rises(ctx, params, step), first, self.refine, self.max_steps
        )
        key = lambda q: keys.sharpness_key(q, self.name)  # noqa: E731
        record = {
            key("critical_sharpness"): 2.0 / eta,
            key("critical_lr"): eta,
            key("forward_passes"): float(passes),
        }
        if self.downstream_data is not None:
            try:
                record.update(self._relative(ctx, params, grads))
            except ProbeFailure as exc:
                raise ProbeFailure(f"relative view: {exc}", partial=record) from exc
        return record

    def _downstream_loss(self, ctx: ProbeContext) -> LossFn:
        return self.downstream_loss_fn or ctx.loss_fn

    def _relative(
        self, ctx: ProbeContext, params: list[torch.Tensor], reference: list[torch.Tensor]
    ) -> dict[str, float]:
        """The reference loss's critical step along the fine-tuning direction."""
        ctx.backup.restore()  # the search above left the weights at its last step
        tuning = mean_gradient(
            ctx, params, self._downstream, self._downstream_weights, self._downstream_loss(ctx)
        )
        if self.relative_direction == "adam":
            # A fresh AdamW (no state): its first step, per unit lr; nothing is stepped.
            direction = adam_update(torch.optim.AdamW(params), params, tuning)
            first = self.initial_step or 1e-4
        else:
            direction, first = tuning, self.initial_step or 0.01
        g_d, g_g, d_d = global_dots(
            ctx, params, [(reference, direction), (reference, reference), (direction, direction)]
        )
        alignment = g_d / math.sqrt(g_g * d_d) if g_g > 0 and d_d > 0 else 0.0
        key = lambda q: keys.sharpness_key(q, self.name)  # noqa: E731
        record = {key("relative_alignment"): alignment}
        if not g_d > 0:  # the pretraining loss rises from the first step: no critical step
            return record
        eta, passes = critical_step(
            loss_rises(ctx, params, direction), first, self.refine, self.max_steps
        )
        record[key("relative_critical_sharpness")] = 2.0 / eta
        record[key("relative_critical_lr")] = eta
        record[key("relative_forward_passes")] = float(passes)
        return record
