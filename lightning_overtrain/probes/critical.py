"""Critical sharpness, the maths: line search, update directions, gradients and dot products.

Given an update direction ``Delta`` (per unit lr), the **critical learning rate**
``eta_c`` is the smallest step along it at which a loss goes up:
``L(theta - eta * Delta) > L(theta)``; the **critical sharpness** is
``lambda_c = 2 / eta_c`` (Kalra et al., arXiv 2601.16979). On a quadratic
``L = L0 + g.x + x^T H x / 2`` the loss along ``-eta * Delta`` is
``L - eta g.Delta + eta^2 Delta^T H Delta / 2``, so ``eta_c = 2 g.Delta / Delta^T H Delta``
and ``lambda_c = Delta^T H Delta / g.Delta``. Nothing here needs a Hessian-vector
product: only loss evaluations, a gradient and dot products.

Sharded parameters (FSDP2 ``DTensor``): every tensor here is this rank's local
shard. Gradients come from ``backward()`` (FSDP2 reduce-scatters them into the
shards), steps are taken on the shards, and a dot product is the sum over ranks
of each rank's shard products, so any sharding gives the numbers of one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_overtrain.engine.contract import ProbeContext, ProbeFailure
from lightning_overtrain.engine.losses import LossFn
from lightning_overtrain.engine.sharding import any_sharded, is_dtensor, local_tensor

try:  # torch >= 2.4
    from torch.distributed.tensor import Replicate
except ImportError:  # pragma: no cover - no DTensor, no sharded parameters
    Replicate = None  # type: ignore[assignment,misc]


def critical_step(
    rises: Callable[[float], bool],
    initial_step: float,
    refine: int = 4,
    max_steps: int = 40,
) -> tuple[float, int]:
    """The smallest step ``eta`` with ``rises(eta)``, by bracketing then log-bisection.

    Args:
        rises: ``rises(eta)`` is True where the loss at step ``eta`` is above the start.
        initial_step: the first step tried; > 0.
        refine: bisections of the final factor-2 bracket (``2**-refine`` in log2 width).
        max_steps: give up after this many evaluations while bracketing.

    Returns:
        ``(eta_c, evaluations)``: the geometric middle of the final bracket, and how
        many times ``rises`` was called.

    Raises:
        ProbeFailure: if no bracket was found within ``max_steps`` evaluations (the loss
            rises for every step tried: not a descent direction; or never rises).

    Example::

        >>> eta, n = critical_step(lambda eta: eta > 0.3, initial_step=1.0, refine=10)
        >>> round(eta, 3), n
        (0.3, 13)
    """
    calls = 0

    def test(eta: float) -> bool:
        nonlocal calls
        calls += 1
        return rises(eta)

    low, high = initial_step, initial_step
    if test(initial_step):
        while True:  # halve until the loss no longer rises
            if calls >= max_steps:
                raise ProbeFailure(
                    f"the loss rose for every step down to {low:.3g}: not a descent direction"
                )
            high, low = low, low / 2
            if not test(low):
                break
    else:
        while True:  # double until the loss rises
            if calls >= max_steps:
                raise ProbeFailure(f"the loss did not rise for any step up to {high:.3g}")
            low, high = high, high * 2
            if test(high):
                break
    for _ in range(refine):
        middle = math.sqrt(low * high)
        if test(middle):
            high = middle
        else:
            low = middle
    return math.sqrt(low * high), calls


@torch.no_grad()
def adam_update(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The step ``optimizer`` (Adam or AdamW) would take next with ``grads``, per unit lr.

    With moments ``m, v`` and step count ``t`` from the optimizer's state (zeros if
    it has not stepped yet), the next update is ``m_hat / (sqrt(v_hat) + eps)``
    with ``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2`` bias-corrected at
    ``t + 1``, plus AdamW's decoupled ``weight_decay * theta`` (Adam's L2 decay is
    added to ``g`` first). The optimizer's state is only read.

    Args:
        optimizer: a ``torch.optim.Adam`` or ``AdamW`` holding ``params``.
        params: the parameters, in the order of ``grads``.
        grads: the gradient to step with (this rank's shard of each sharded parameter).

    Returns:
        The update of each parameter (its local shard under FSDP2).

    Raises:
        ValueError: for another optimizer, AMSGrad, or a parameter it does not hold.
    """
    check_adam(optimizer)
    decoupled = isinstance(optimizer, torch.optim.AdamW)
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out = []
    for param, grad in zip(params, grads):
        group = groups.get(id(param))
        if group is None:
            raise ValueError("`optimizer` does not hold every parameter of the module.")
        beta1, beta2 = group["betas"]
        eps, decay = group["eps"], group["weight_decay"]
        state = optimizer.state.get(param, {})
        theta = local_tensor(param)  # FSDP2: this rank's shard, like `grad` and the moments
        grad = grad if decoupled or decay == 0 else grad + decay * theta
        m = local_tensor(state["exp_avg"]) if "exp_avg" in state else torch.zeros_like(theta)
        v = local_tensor(state["exp_avg_sq"]) if "exp_avg_sq" in state else torch.zeros_like(theta)
        t = float(state.get("step", 0)) + 1
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        if decoupled and decay:
            update = update + decay * theta
        out.append(update)
    return out


def check_adam(optimizer: Any) -> None:
    """Raise ValueError unless ``optimizer`` is a torch Adam or AdamW without AMSGrad."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        raise ValueError(
            f"direction='update' reads an Adam or AdamW optimizer's moments, got"
            f" {type(optimizer).__name__}. Pass direction='gradient' for other optimizers."
        )
    if any(group.get("amsgrad") for group in optimizer.param_groups):
        raise ValueError(
            "direction='update' does not model AMSGrad; pass direction='gradient' or"
            " turn amsgrad off."
        )


def mean_gradient(
    ctx: ProbeContext,
    params: Sequence[torch.Tensor],
    batches: Sequence[Any],
    weights: Sequence[int],
    loss_fn: LossFn,
) -> list[torch.Tensor]:
    """The token-weighted mean gradient of ``loss_fn`` over every rank's ``batches``.

    Args:
        ctx: the snapshot's context (module, precision, reduction).
        params: the parameters to differentiate.
        batches: this rank's batches (under FSDP2 every rank the same number, padding
            at weight 0, since every rank must run every backward pass).
        weights: tokens per batch.
        loss_fn: ``loss_fn(module, batch) -> scalar mean loss``.

    Returns:
        One tensor per parameter, in its dtype: the whole gradient (one process, DDP)
        or this rank's shard of it (FSDP2). The same on every rank.

    Raises:
        ProbeFailure: on every rank alike, if any rank failed or the gradient is not finite.
    """
    if any_sharded(params):
        return _sharded_gradient(ctx, params, batches, weights, loss_fn)
    sizes = [p.numel() for p in params]

    def local() -> torch.Tensor:
        total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        with torch.enable_grad():
            for batch, weight in zip(batches, weights):
                with ctx.forward_context():
                    loss = loss_fn(ctx.module, batch)
                # autograd.grad, not backward(): no .grad is ever written.
                grads = torch.autograd.grad(loss * weight, params, allow_unused=True)
                for acc, grad in zip(total, grads):
                    if grad is not None:
                        acc += grad.to(torch.float64)
        tokens = torch.tensor([float(sum(weights))], dtype=torch.float64, device=ctx.device)
        return torch.cat([*(t.flatten() for t in total), tokens])

    summed = ctx.reduce_or_fail(local, (sum(sizes) + 1,))
    if not bool(torch.isfinite(summed).all()):
        raise ProbeFailure("the gradient is not finite")
    mean = summed[:-1] / summed[-1]
    return [chunk.view_as(p).to(p.dtype) for chunk, p in zip(mean.split(sizes), params)]


def _sharded_gradient(
    ctx: ProbeContext,
    params: Sequence[torch.Tensor],
    batches: Sequence[Any],
    weights: Sequence[int],
    loss_fn: LossFn,
) -> list[torch.Tensor]:
    # FSDP2's gradients flow through the gathered copies, not the sharded parameters, so
    # autograd.grad cannot reach them: backward() writes each rank's shard of the average
    # over ranks, which scaling each batch by world_size / global tokens makes the mean.
    local_tokens = torch.tensor([float(sum(weights))], dtype=torch.float64, device=ctx.device)
    tokens = float(ctx.reduce_or_fail(lambda: local_tokens, (1,))[0])
    out: list[torch.Tensor] = []

    def local() -> torch.Tensor:
        for param in params:
            param.grad = None
        with torch.enable_grad():
            for batch, weight in zip(batches, weights):
                with ctx.forward_context():
                    loss = loss_fn(ctx.module, batch)
                (loss * (weight * ctx.world_size / tokens)).backward()
        for param in params:
            grad = param.grad
            out.append(
                local_tensor(grad).clone()
                if grad is not None
                else torch.zeros_like(local_tensor(param))
            )
            param.grad = None
        finite = all(bool(torch.isfinite(g).all()) for g in out)
        return torch.tensor([0.0 if finite else 1.0], dtype=torch.float64, device=ctx.device)

    if ctx.reduce_or_fail(local, (1,))[0]:
        raise ProbeFailure("the gradient is not finite")
    return out


def global_dots(
    ctx: ProbeContext,
    params: Sequence[torch.Tensor],
    pairs: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]],
) -> list[float]:
    """``sum(a . b)`` over all parameters for each ``(a, b)`` in ``pairs``, the same on every rank.

    ``a`` and ``b`` hold one tensor per parameter (local shards under FSDP2). Each rank
    adds its products and the sums are added across ranks; a tensor every rank holds
    whole (unsharded, or replicated along a mesh dimension) counts once.
    """
    weights = [_replica_weight(p, ctx.world_size) for p in params]

    def local() -> torch.Tensor:
        out = torch.zeros(len(pairs), dtype=torch.float64, device=ctx.device)
        for i, (a, b) in enumerate(pairs):
            for x, y, w in zip(a, b, weights):
                out[i] += w * torch.dot(x.flatten().double(), y.flatten().double())
        return out

    return ctx.reduce_or_fail(local, (len(pairs),)).tolist()


def _replica_weight(param: torch.Tensor, world_size: int) -> float:
    """1 / the number of ranks that hold the same values of ``param``'s local tensor."""
    if not is_dtensor(param):
        return 1.0 / world_size
    mesh, copies = param.device_mesh, 1  # type: ignore[attr-defined]
    for dim, placement in enumerate(param.placements):  # type: ignore[attr-defined]
        if Replicate is not None and isinstance(placement, Replicate):
            copies *= mesh.size(dim)
    return 1.0 / copies


def loss_rises(
    ctx: ProbeContext, params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor]
) -> Callable[[float], bool]:
    """``rises(eta)``: is the reference loss at ``theta - eta * direction`` above its start?

    Each call starts from the live weights (``ctx.backup.restore()``) and steps the
    local shards; a loss that is not finite counts as risen (past the critical step).
    """
    start = ctx.reference_loss

    def rises(eta: float) -> bool:
        def local() -> torch.Tensor:
            ctx.backup.restore()  # each step size from the live weights, not the last one
            with torch.no_grad():
                for param, delta in zip(params, direction):
                    shard = local_tensor(param)
                    shard.sub_(delta.to(shard.dtype), alpha=eta)
            return ctx.local_loss_sums()

        sums = ctx.reduce_or_fail(local, (2,))
        loss = float(sums[0] / sums[1])
        return not math.isfinite(loss) or loss > start

    return rises
