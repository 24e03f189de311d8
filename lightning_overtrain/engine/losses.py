"""How a batch becomes a loss, and the reference loss ``L(theta)`` over a fixed set.

The reference loss is a token-weighted mean: every batch contributes its loss
times its token count, so the number is the same however the set is split
across ranks (the sums are all-reduced, never the means).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from lightning_overtrain.engine.backup import ModelBackup, borrowed
from lightning_overtrain.engine.tokens import describe_batch

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def transformers_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    """The default loss: the transformers convention ``module(**batch).loss``.

    A batch without ``labels`` gets ``labels = input_ids`` (masked to -100 where
    ``attention_mask`` is 0), so a plain causal-LM batch works as it is.

    Args:
        module: a model whose forward takes the batch's keys, e.g. a transformers
            ``AutoModelForCausalLM`` or a LightningModule that forwards to one.
        batch: a mapping with ``input_ids`` (and optionally ``attention_mask``, ``labels``).

    Returns:
        The scalar mean next-token loss.

    Raises:
        TypeError: if the batch is not a mapping or the output carries no loss.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"The default loss needs a dict batch, got {type(batch).__name__}. Pass"
            " `loss_fn=lambda module, batch: <scalar mean loss>`."
        )
    if "labels" not in batch and "input_ids" in batch:
        labels = batch["input_ids"]
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            labels = labels.masked_fill(mask == 0, -100)
        batch = {**batch, "labels": labels}
    with kv_cache_off(module):
        output = module(**batch)
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", output)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(
            f"`module(**batch)` returned {type(output).__name__} without a scalar `loss`."
            " Pass `loss_fn=lambda module, batch: <scalar mean loss>` to compute it yourself."
        )
    return loss.reshape(())


@contextmanager
def kv_cache_off(module: nn.Module) -> Iterator[None]:
    """Switch off the key/value cache of every transformers config inside ``module``.

    A loss needs no cache, and building one slows a small model's forward by up to
    half; the flags are put back on exit, so the model is left as it was.
    """
    configs = [
        cfg
        for cfg in {
            id(c): c for c in (getattr(m, "config", None) for m in module.modules())
        }.values()
        if getattr(cfg, "use_cache", False) is True
    ]
    for cfg in configs:
        cfg.use_cache = False
    try:
        yield
    finally:
        for cfg in configs:
            cfg.use_cache = True


def loss_sums(
    module: nn.Module,
    batches: Iterable[Any],
    weights: Sequence[int],
    loss_fn: LossFn,
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> torch.Tensor:
    """Sum ``loss * weight`` and ``weight`` over batches, without leaving the device.

    Args:
        module: the model to evaluate, in whatever mode the caller set.
        batches: batches already on the module's device.
        weights: tokens per batch, the weight of each batch's mean loss.
        loss_fn: ``loss_fn(module, batch) -> scalar mean loss``.
        forward_context: the trainer's precision context (autocast for mixed precision).

    Returns:
        A float64 tensor ``[sum of loss * weight, sum of weight]``: add these across
        ranks, then divide, to get the token-weighted mean.
    """
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    total = torch.zeros((), dtype=torch.float64, device=device)
    weight = 0
    for batch, w in zip(batches, weights):
        with forward_context():
            loss = loss_fn(module, batch)
        total += loss.detach().to(torch.float64) * w
        weight += w
    return torch.stack([total, torch.tensor(float(weight), dtype=torch.float64, device=device)])


def check_losses(
    module: nn.Module,
    backup: ModelBackup,
    batches: Sequence[Any],
    loss_fn: LossFn,
    argument: str,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """:func:`check_loss` on every batch of this rank's share, once, before training.

    A bad token id in the reference set's 5th batch then fails here, naming batch 4,
    instead of failing every snapshot later. Under several ranks each checks its
    round-robin share (global index ``rank + i * world_size``) and the ranks agree
    (one gather of each rank's error), so all of them raise the same error.

    Raises:
        ValueError: naming the loss, the argument, the batch's index and the error.
    """
    error: str | None = None
    for i, batch in enumerate(batches):
        try:
            check_loss(module, backup, batch, loss_fn, argument, rank + i * world_size)
        except ValueError as exc:
            error = str(exc)
            break
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        errors: list[str | None] = [None] * world_size
        torch.distributed.all_gather_object(errors, error)  # every rank reaches it
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise ValueError(error)


def check_loss(
    module: nn.Module,
    backup: ModelBackup,
    batch: Any,
    loss_fn: LossFn,
    argument: str,
    index: int = 0,
) -> None:
    """Raise a clear error, before training, if ``loss_fn`` cannot use a batch of ``argument``.

    The model is borrowed (and handed back exactly) for the one forward pass. The
    message speaks of the loss that was passed: the user's own ``loss_fn`` by name,
    or the default transformers loss with how to replace it.

    Raises:
        ValueError: naming the loss, the argument, the error, and what to do instead.
    """
    with borrowed(module, backup), torch.no_grad():
        try:
            loss = loss_fn(module, batch)
        except Exception as exc:
            raise ValueError(_loss_failed(loss_fn, batch, argument, exc, index)) from exc
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"`loss_fn` ({_name(loss_fn)}) must return a scalar tensor for `{argument}` batch"
            f" {index},"
            f" got {type(loss).__name__}"
            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}."
            " Return the mean next-token loss of the batch."
        )


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or repr(fn)  # a functools.partial has no name


def _loss_failed(loss_fn: LossFn, batch: Any, argument: str, exc: Exception, index: int = 0) -> str:
    # The error's own text, without its final period, so the sentence ends with one.
    error = f"{type(exc).__name__}: {str(exc).rstrip().rstrip('.')}"
    which = "the first batch" if index == 0 else f"batch {index} (counting from 0)"
    where = f"on {which} of `{argument}` ({describe_batch(batch)})"
    if loss_fn is transformers_loss:
        advice = (
            ""
            if "loss_fn=" in error  # its own message already says what to pass
            else " Check that the batches fit the model (keys, token ids < vocabulary size),"
            " or pass `loss_fn=lambda module, batch: <scalar mean next-token loss>`."
        )
        return (
            f"`loss_fn` is the default, `module(**batch).loss` (the transformers convention),"
            f" and it failed {where}: {error}.{advice}"
        )
    return (
        f"Your `loss_fn` ({_name(loss_fn)}) failed {where}: {error}. Check that"
        f" `{_name(loss_fn)}(module, batch)` works on these batches and returns their scalar"
        " mean loss."
    )
