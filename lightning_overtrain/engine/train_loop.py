"""The short training loop that the fine-tune probe and the cooldown branch share."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from lightning_overtrain.engine.contract import ProbeContext, ProbeFailure
from lightning_overtrain.engine.data import ShardedBatches
from lightning_overtrain.engine.losses import LossFn


def grad_scaler(ctx: ProbeContext) -> Any:
    """A fresh gradient scaler under 16-bit mixed precision, else None.

    The monitor puts a factory in ``ctx.extras["grad_scaler"]`` (starting from the
    training scaler's current scale); the training scaler itself is never touched.
    """
    factory = ctx.extras.get("grad_scaler")
    return factory() if factory is not None else None


def train_steps(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ShardedBatches,
    steps: int,
    loss_fn: LossFn,
    *,
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    world_size: int = 1,
    lr_scale: Callable[[int], float] | None = None,
    clip_val: float | None = None,
    clip_algorithm: str = "norm",
    label: str = "training",
    sharded: bool = False,
    scaler: Any = None,
    after_step: Callable[[int], bool] | None = None,
) -> list[float]:
    """Take ``steps`` optimizer steps on ``data`` (cycled), data-parallel across ranks.

    Each step: every rank backpropagates ``loss * (its tokens / the batch's tokens)``
    on its rows, the gradients are summed across ranks (so they are the gradient
    of the global batch's token-weighted mean loss), then the optimizer steps.
    Every rank reaches the same collectives even when its own step raised or
    produced a non-finite loss: a failure flag travels with each step's sums, and
    then every rank raises :class:`ProbeFailure` alike.

    Sharded parameters (FSDP2): the sharding reduces the gradients itself, as
    an average over ranks, in every backward pass; so every rank runs every
    forward and backward pass (an empty share runs at weight 0, see
    :func:`shard_batches` with ``even``), the loss is scaled by ``world_size`` to
    turn that average into the sum, and no second reduction happens here.

    Args:
        module: the model, in the mode the caller set, with grad enabled.
        optimizer: steps the parameters; its param groups' ``lr`` are scaled by
            ``lr_scale(step)`` (their values at the start times the factor).
        data: the global batches, sharded by :func:`shard_batches`.
        steps: optimizer steps.
        loss_fn: ``loss_fn(module, batch) -> scalar mean loss``.
        forward_context: the trainer's precision context.
        reduce_sum: adds a tensor across ranks in place.
        world_size: number of ranks.
        lr_scale: factor of the lr at each step (e.g. a linear decay); None: constant.
        clip_val: clip the summed gradients at this norm (or value); None: no clipping.
        clip_algorithm: ``"norm"`` or ``"value"``.
        label: what is being trained, for the failure message.
        sharded: the parameters are FSDP2 DTensors (see above).
        scaler: a ``torch.amp.GradScaler`` (16-bit mixed precision): the loss is scaled
            before backward, the gradients unscaled before clipping, and a step with
            inf/NaN gradients is skipped, as Lightning does for training.
        after_step: called with the number of steps taken after each optimizer step
            that succeeded on every rank; returning True stops early. It is called at
            the same points on every rank, so it may make collectives through the
            probe context (e.g. evaluate the weights in between steps).

    Returns:
        The global batch's mean loss at each step.

    Raises:
        ProbeFailure: on every rank, if any rank failed or the loss was not finite.
    """
    groups = optimizer.param_groups
    params = [p for group in groups for p in group["params"]]
    base_lrs = [group["lr"] for group in groups]
    device = params[0].device if params else torch.device("cpu")
    losses: list[float] = []
    error: BaseException | None = None
    failed_at = steps  # the step whose work raised, for the message
    for step in range(steps + 1):
        i = step % len(data)
        local = torch.zeros(2 + len(params), dtype=torch.float64, device=device)
        if step < steps and error is None:
            try:
                optimizer.zero_grad(set_to_none=True)
                if data.weights[i] or sharded:
                    with forward_context():
                        loss = loss_fn(module, data.local[i])
                    share = data.weights[i] / data.totals[i]
                    # FSDP averages the gradients over ranks: scale up so they sum.
                    scaled = loss * (share * world_size if sharded else share)
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    local[0] = loss.detach().to(torch.float64) * share
                if not sharded:
                    used = [p.grad is not None for p in params]
                    local[2:] = torch.tensor(used, dtype=torch.float64)
            except Exception as exc:  # any fault becomes a flag every rank sees
                error, failed_at = exc, step
        local[1] = float(error is not None)
        # The last pass only reports a failure of the last optimizer step.
        packed = reduce_sum(local).tolist()
        if packed[1] or not math.isfinite(packed[0]):
            failed = int(packed[1])
            where = f" on {failed} of {world_size} rank(s)" if world_size > 1 and failed else ""
            detail = (
                f"{type(error).__name__}: {error}"
                if error is not None
                else f"non-finite loss ({packed[0]})"
            )
            at = min(step, failed_at, steps - 1) + 1
            raise ProbeFailure(
                f"{label} failed at step {at} of {steps}{where}: {detail}"
            ) from error
        if step and after_step is not None and after_step(step):
            break
        if step == steps:
            break
        losses.append(packed[0])
        if world_size > 1 and not sharded:
            for param, used in zip(params, packed[2:]):
                if used:  # a parameter unused on every rank keeps `.grad is None`, as in 1 process
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
                    reduce_sum(param.grad)
        try:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip_val is not None:
                if clip_algorithm == "value":
                    torch.nn.utils.clip_grad_value_(params, clip_val)
                else:
                    torch.nn.utils.clip_grad_norm_(params, clip_val)
            if lr_scale is not None:
                for group, lr in zip(groups, base_lrs):
                    group["lr"] = lr * lr_scale(step)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        except Exception as exc:
            error, failed_at = exc, step
    return losses
