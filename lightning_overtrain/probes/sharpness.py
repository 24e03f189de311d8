"""Critical sharpness (Kalra et al., arXiv 2601.16979): curvature in a handful of forward passes.

Given an update direction ``Delta`` (the step training would take, per unit lr),
the **critical learning rate** ``eta_c`` is the smallest step size along it at
which the loss goes up: ``L(theta - eta * Delta) > L(theta)``. The **critical
sharpness** is ``lambda_c = 2 / eta_c``, the curvature whose gradient-descent
stability limit is ``eta_c``. It needs no Hessian-vector product, only loss
evaluations, found by a line search:

1. bracket: from ``initial_step``, double the step while the loss does not rise
   (or halve it while it does), until one step is below ``eta_c`` and the next
   above it;
2. refine: bisect that bracket in log-space ``refine`` times; ``eta_c`` is the
   geometric middle of the last bracket.

On a quadratic ``L = L0 + g.x + x^T H x / 2`` the loss along ``-eta * Delta`` is
``L - eta g.Delta + eta^2 Delta^T H Delta / 2``, so ``eta_c = 2 g.Delta / Delta^T H Delta``
and ``lambda_c = Delta^T H Delta / g.Delta``; for the gradient direction
(``Delta = g``) that is ``g^T H g / g^T g``, the Hessian's Rayleigh quotient along
the gradient, never above its largest eigenvalue.

Here the loss is the monitor's fixed reference set (the same batches at every
snapshot, as for the other probes), not a fresh training batch, so the curve over
tokens is not sampling noise; the gradient ``g`` is that set's (token-weighted,
summed over ranks, so every rank steps along the same direction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_overtrain import keys
from lightning_overtrain.checks import check_int
from lightning_overtrain.engine.contract import Probe, ProbeContext, ProbeFailure
from lightning_overtrain.keys import Signal

DIRECTIONS = ("gradient", "update")


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
        grads: the gradient to step with.

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
        grad = grad if decoupled or decay == 0 else grad + decay * param
        m = state.get("exp_avg", torch.zeros_like(param))
        v = state.get("exp_avg_sq", torch.zeros_like(param))
        t = float(state.get("step", 0)) + 1
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        if decoupled and decay:
            update = update + decay * param
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


class SharpnessProbe(Probe):
    """Critical sharpness ``lambda_c = 2 / eta_c`` along the training update direction.

    At every snapshot: the reference set's gradient ``g`` on the borrowed model, the
    direction ``Delta`` (``g`` itself, or the step the training Adam/AdamW optimizer
    would take with ``g``), then a line search for the smallest step ``eta_c`` at
    which the reference loss rises (:func:`critical_step`). Logged, with
    ``sharpness`` the probe's ``name``:

    * ``sharpness/critical_sharpness``: ``2 / eta_c``;
    * ``sharpness/critical_lr``: ``eta_c``;
    * ``sharpness/forward_passes``: reference-set evaluations the search took.

    Cost: one backward pass over the reference set and ``forward_passes`` forward
    passes (about 5-10). Memory: the gradient and the direction, two parameter-sized
    tensors. The training gradients are set aside, the optimizer is only read, and
    the weights are restored after every evaluation. Under DDP every rank gets the
    same summed gradient, so all take the same steps and reach the same answer.

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

    Raises:
        ValueError: on bad arguments; before training, for ``direction="update"``
            without an Adam/AdamW training optimizer, or for FSDP2-sharded parameters.

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
        self.direction = direction
        self.initial_step = None if initial_step is None else float(initial_step)
        self.name = name

    def config(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "initial_step": self.initial_step,
            "refine": self.refine,
            "max_steps": self.max_steps,
        }

    def signals(self) -> list[Signal]:
        """The critical sharpness and the critical step, one figure; rising, not U-shaped."""
        title = f"Critical sharpness along the {self.direction}"
        return [
            Signal(
                keys.sharpness_key(quantity, self.name),
                label=self.name,
                unit=unit,
                figure=self.name,
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
        if any(type(p).__name__ == "DTensor" for p in ctx.backup.params):
            raise ValueError(
                "SharpnessProbe does not support sharded (FSDP2 DTensor) parameters yet: its"
                " direction is gathered as one flat tensor. Use it under DDP or one process."
            )
        if self.direction == "update":
            optimizer = ctx.extras.get("optimizer")
            if optimizer is None:
                raise ValueError(
                    "SharpnessProbe(direction='update') needs the training optimizer in"
                    " ctx.extras['optimizer'] (the monitor passes trainer.optimizers[0])."
                    " Pass direction='gradient' to measure along the gradient instead."
                )
            check_adam(optimizer)

    def run(self, ctx: ProbeContext) -> dict[str, float]:
        params = [p for p in ctx.backup.params if p.requires_grad]
        grads = self._gradient(ctx, params)
        if self.direction == "update":
            optimizer = ctx.extras["optimizer"]
            step = adam_update(optimizer, params, grads)
            first = self.initial_step or float(optimizer.param_groups[0]["lr"])
        else:
            step, first = grads, self.initial_step or 0.01
        if not first > 0:
            raise ProbeFailure(f"the initial step is {first}; pass initial_step > 0")
        start = ctx.reference_loss

        def rises(eta: float) -> bool:
            def local() -> torch.Tensor:
                ctx.backup.restore()  # each step size from the live weights, not the last one
                with torch.no_grad():
                    for param, delta in zip(params, step):
                        param.sub_(delta.to(param.dtype), alpha=eta)
                return ctx.local_loss_sums()

            sums = ctx.reduce_or_fail(local, (2,))
            loss = float(sums[0] / sums[1])
            # A step that blows the loss up to inf or NaN is past the critical one.
            return not math.isfinite(loss) or loss > start

        eta, passes = critical_step(rises, first, self.refine, self.max_steps)
        key = lambda q: keys.sharpness_key(q, self.name)  # noqa: E731
        return {
            key("critical_sharpness"): 2.0 / eta,
            key("critical_lr"): eta,
            key("forward_passes"): float(passes),
        }

    def _gradient(self, ctx: ProbeContext, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The reference set's token-weighted mean gradient, summed over ranks."""
        sizes = [p.numel() for p in params]

        def local() -> torch.Tensor:
            total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
            with torch.enable_grad():
                for batch, weight in zip(ctx.batches, ctx.weights):
                    with ctx.forward_context():
                        loss = ctx.loss_fn(ctx.module, batch)
                    # autograd.grad, not backward(): no .grad is ever written.
                    grads = torch.autograd.grad(loss * weight, params, allow_unused=True)
                    for acc, grad in zip(total, grads):
                        if grad is not None:
                            acc += grad.to(torch.float64)
            flat = [t.flatten() for t in total]
            tokens = torch.tensor([float(sum(ctx.weights))], dtype=torch.float64)
            return torch.cat([*flat, tokens.to(ctx.device)])

        summed = ctx.reduce_or_fail(local, (sum(sizes) + 1,))
        if not bool(torch.isfinite(summed).all()):
            raise ProbeFailure("the reference gradient is not finite")
        mean = summed[:-1] / summed[-1]
        return [chunk.view_as(p).to(p.dtype) for chunk, p in zip(mean.split(sizes), params)]
