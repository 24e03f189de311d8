"""The cooldown branch: "what if pretraining stopped here?".

In the paper's controlled runs every token budget is its own run, annealed to
zero lr; an intermediate checkpoint of one run is not, and lr decay itself
sharpens a model and worsens forgetting after fine-tuning (Rofin et al., arXiv
2604.13627), so probing a checkpoint taken mid-schedule measures a model no
finished run would be.

Before a snapshot is probed, the branch continues pretraining for ``steps``
optimizer steps on batches the user gives, with a copy of the training optimizer
(its state and current lr), the lr decaying linearly to 0; the probes then
measure the cooled weights, and on exit everything is put back.

Invisible to training: the training optimizer is never stepped, loaded or
written (the branch steps a new instance of the same class, built on the same
parameters, loaded with a deep copy of its state); weights, buffers, ``.grad``,
train/eval and grad mode and every RNG come back exactly (:func:`borrowed`).
Extra memory: one more parameter and buffer copy (the live weights, while the
probes use the monitor's backup for the cooled ones), one copy of the optimizer
state and the branch's gradients, the last two freed before the probes run.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_overtrain import keys
from lightning_overtrain.checks import check_int
from lightning_overtrain.engine.backup import ModelBackup, borrowed
from lightning_overtrain.engine.contract import ProbeContext
from lightning_overtrain.engine.data import ShardedBatches, shard_batches
from lightning_overtrain.engine.losses import check_loss
from lightning_overtrain.engine.rng import seeded_rng
from lightning_overtrain.engine.sharding import any_sharded
from lightning_overtrain.engine.tokens import TokensFn, count_tokens
from lightning_overtrain.engine.train_loop import grad_scaler, train_steps
from lightning_overtrain.history import Record


def linear_to_zero(steps: int) -> Callable[[int], float]:
    """The lr factor at step ``i``: ``(steps - i) / steps``, reaching 0 after the last step."""
    return lambda i: (steps - i) / steps


def copy_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A new optimizer of the same class on the same parameters, with a deep copy of the state.

    Stepping the copy moves the parameters as the original would, while the
    original's state, param groups, step counters and hooks stay untouched.

    Raises:
        ValueError: if the class cannot be built again from its param groups.
    """
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": list(group["params"])}
        for group in optimizer.param_groups
    ]
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    # `defaults` may carry keys the constructor does not take (AdamW's decoupled_weight_decay).
    kwargs = {k: v for k, v in optimizer.defaults.items() if takes_any or k in accepted}
    try:
        clone = cls(groups, **kwargs)
    except Exception as exc:
        raise ValueError(
            f"The cooldown branch cannot build a copy of the training optimizer"
            f" ({cls.__name__}) from its param groups: {type(exc).__name__}: {exc}."
            " Use a torch.optim optimizer, or set cooldown_steps=0."
        ) from exc
    # A deep copy: load_state_dict may keep the very tensors it is given.
    clone.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return clone


class CooldownBranch:
    """Anneal a branch of the live model before the probes measure it, then put it back.

    Args:
        module: the live model (the LightningModule, never a DDP wrapper).
        batches: pretraining batches, the same on every rank; the first ``steps``
            are used, cycled if fewer, the same at every snapshot.
        steps: optimizer steps of the branch; >= 1.
        tokens_fn: tokens in a batch, the weight of its loss across ranks.
        rank: this rank.
        world_size: number of ranks; each batch is split across them by rows.
        seed: seeds dropout in the branch, the same at every snapshot.
        backup_device: where the copy of the live weights lives (None: beside them;
            ``"cpu"``: host memory).

    Raises:
        ValueError: on ``steps`` < 1 or batches that cannot be split.

    Example::

        branch = CooldownBranch(model, pretraining_batches, steps=50)
        with branch.branch(ctx, trainer.optimizers[0]) as metrics:
            ...  # ctx.module now holds the cooled weights
    """

    def __init__(
        self,
        module: nn.Module,
        batches: Sequence[Any],
        steps: int,
        *,
        tokens_fn: TokensFn = count_tokens,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        backup_device: str | None = None,
    ) -> None:
        check_int("cooldown_steps", steps, 1, "Pass e.g. 20% of the steps between snapshots.")
        self.steps = steps
        self.seed = seed
        self.origin = ModelBackup(module, device=backup_device)
        device = self.origin.params[0].device if self.origin.params else torch.device("cpu")
        self.sharded = any_sharded(self.origin.params)
        self.data: ShardedBatches = shard_batches(
            batches[:steps],
            rank,
            world_size,
            tokens_fn,
            device,
            "cooldown_data",
            even=self.sharded,
        )

    @property
    def nbytes(self) -> int:
        """Bytes the branch holds between snapshots: its copy of the live weights."""
        return self.origin.nbytes

    def validate(self, ctx: ProbeContext, optimizer: torch.optim.Optimizer) -> None:
        """Check, before training, that the loss takes the batches and the optimizer copies."""
        check_loss(ctx.module, ctx.backup, self.data.local[0], ctx.loss_fn, "cooldown_data")
        copy_optimizer(optimizer)

    @contextmanager
    def branch(
        self,
        ctx: ProbeContext,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> Iterator[Record]:
        """Inside: ``ctx.module`` holds the cooled weights; on exit, the live ones.

        Args:
            ctx: the snapshot's context (module, loss, precision, reduction).
            optimizer: the training optimizer; only read.
            gradient_clip_val: clip as the trainer does (None: no clipping).
            gradient_clip_algorithm: ``"norm"`` (default) or ``"value"``.

        Yields:
            ``{"cooldown/train_loss": mean loss over the branch's steps}``.

        Raises:
            ProbeFailure: on every rank alike if the branch failed on any rank.
        """
        with borrowed(ctx.module, self.origin, train=True):
            branch_optimizer: torch.optim.Optimizer | None = copy_optimizer(optimizer)
            params = [p for group in branch_optimizer.param_groups for p in group["params"]]
            try:
                with torch.enable_grad(), seeded_rng(self.seed):
                    losses = train_steps(
                        ctx.module,
                        branch_optimizer,
                        self.data,
                        self.steps,
                        ctx.loss_fn,
                        forward_context=ctx.forward_context,
                        reduce_sum=ctx.reduce_sum,
                        world_size=ctx.world_size,
                        lr_scale=linear_to_zero(self.steps),
                        clip_val=gradient_clip_val,
                        clip_algorithm="value" if gradient_clip_algorithm == "value" else "norm",
                        label="the cooldown branch",
                        sharded=self.sharded,
                        scaler=grad_scaler(ctx),
                    )
            finally:
                # The probes need neither the branch's gradients nor its optimizer state.
                branch_optimizer = None
                for param in params:
                    param.grad = None
            yield {keys.COOLDOWN_TRAIN_LOSS: float(np.mean(losses))}
