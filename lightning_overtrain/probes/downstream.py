"""The held-out downstream split of a fine-tune probe: its losses and an optional metric.

:class:`HeldOut` holds this rank's share of the held-out batches (taken once per fit)
and measures the current weights on it, the reference loss beside it when asked, in
one collective; a metric is either a torchmetrics ``Metric`` or a plain callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_overtrain.engine.backup import borrowed
from lightning_overtrain.engine.contract import ProbeContext, ProbeFailure
from lightning_overtrain.engine.losses import LossFn, loss_sums

MetricInputs = Callable[[nn.Module, Any], tuple[Any, ...]]


def next_token_inputs(module: nn.Module, batch: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(logits[:, :-1], labels[:, 1:])``: what a torchmetrics metric of next tokens takes.

    Fits e.g. ``torchmetrics.text.Perplexity(ignore_index=-100)``. Labels default to
    ``input_ids``, masked to -100 where ``attention_mask`` is 0.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = module(**inputs).logits
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            labels = labels.masked_fill(mask == 0, -100)
    return logits[:, :-1], labels[:, 1:]


def is_torchmetric(metric: Any) -> bool:
    """Whether ``metric`` looks like a torchmetrics ``Metric`` (update, compute, reset)."""
    return all(callable(getattr(metric, a, None)) for a in ("update", "compute", "reset"))


@dataclass
class HeldOut:
    """This rank's held-out downstream batches, and what is measured on them.

    Attributes:
        batches: this rank's batches, on the model's device.
        weights: tokens per batch (0 for a sharded model's padding batch).
        metric: None, a torchmetrics ``Metric`` or ``metric(module, batch) -> float``.
        metric_inputs: the arguments of ``metric.update`` for a torchmetrics metric.
    """

    batches: Sequence[Any] = field(default_factory=list)
    weights: Sequence[int] = field(default_factory=list)
    metric: Any = None
    metric_inputs: MetricInputs = next_token_inputs

    def evaluate(self, ctx: ProbeContext, loss_fn: LossFn, reference: bool) -> dict[str, float]:
        """``downstream_loss`` (and ``metric``; ``reference_loss`` if asked) of the current weights.

        Raises:
            ProbeFailure: on every rank alike, if any rank failed or a value is not finite.
        """
        callable_metric = self.metric is not None and not is_torchmetric(self.metric)
        size = 2 * (reference + 1 + callable_metric)

        def local() -> torch.Tensor:
            parts = [ctx.local_loss_sums()] if reference else []
            parts.append(
                loss_sums(ctx.module, self.batches, self.weights, loss_fn, ctx.forward_context)
            )
            if callable_metric:
                parts.append(self._metric_sums(ctx))
            elif self.metric is not None:
                self.metric.reset()
                for batch, weight in zip(self.batches, self.weights):
                    with ctx.forward_context():
                        inputs = self.metric_inputs(ctx.module, batch)
                    if weight:  # a weight-0 batch only keeps a sharded model's passes even
                        self.metric.update(*inputs)
            return torch.cat(parts)

        sums = ctx.reduce_or_fail(local, (size,)).tolist()
        values = [sums[i] / sums[i + 1] for i in range(0, size, 2)]
        names = ["reference_loss"] * reference + ["downstream_loss"] + ["metric"] * callable_metric
        out = dict(zip(names, values))
        if self.metric is not None and not callable_metric:
            try:  # every rank got here: the metric's own cross-rank sync cannot hang
                out["metric"] = float(self.metric.compute())
            except Exception as exc:
                raise ProbeFailure(
                    f"`metric.compute()` failed: {type(exc).__name__}: {exc}"
                ) from exc
        bad = {k: v for k, v in out.items() if not math.isfinite(v)}
        if bad:
            raise ProbeFailure(f"non-finite {bad}")
        return out

    def _metric_sums(self, ctx: ProbeContext) -> torch.Tensor:
        total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        for batch, weight in zip(self.batches, self.weights):
            with ctx.forward_context():
                value = self.metric(ctx.module, batch)
            total[0] += torch.as_tensor(value, dtype=torch.float64).to(ctx.device) * weight
            total[1] += weight
        return total

    def check_metric(self, ctx: ProbeContext, batch: Any) -> None:
        """Before training: the metric takes ``batch`` and gives a finite number.

        Raises:
            ValueError: naming `metric`, what failed and how metrics are called.
        """
        metric = self.metric
        try:
            with borrowed(ctx.module, ctx.backup), torch.no_grad(), ctx.forward_context():
                if is_torchmetric(metric):
                    metric.to(ctx.device)
                    metric.reset()
                    metric.update(*self.metric_inputs(ctx.module, batch))
                    # compute() syncs across ranks: only a single process may call it here.
                    value = metric.compute() if ctx.world_size == 1 else 0.0
                    metric.reset()
                else:
                    value = metric(ctx.module, batch)
            value = float(value)
        except Exception as exc:
            raise ValueError(
                f"`metric` failed on the first `eval_data` batch: {type(exc).__name__}: {exc}."
                " A torchmetrics Metric is updated with `metric_inputs(module, batch)` (default"
                " next-token logits and labels); a callable is called as metric(module, batch)"
                " and must return a number."
            ) from exc
        if not math.isfinite(value):
            raise ValueError(f"`metric` returned {value} on the first `eval_data` batch.")
