"""How many tokens a batch holds: the x-axis of every curve the monitor draws."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

TokensFn = Callable[[Any], int]


def count_tokens(batch: Any) -> int:
    """Count the tokens in a training batch, the way the monitor does by default.

    A mapping with ``attention_mask`` counts the unmasked positions; one with
    ``input_ids`` (and no mask) counts them all; a tensor counts its elements; a
    tuple or list counts its first tensor (the usual ``(inputs, targets)`` shape).

    Args:
        batch: one batch as the ``DataLoader`` yields it (on any device).

    Returns:
        The number of tokens, as a Python int.

    Raises:
        TypeError: if the batch has none of these shapes; pass ``tokens_fn`` then.

    Example::

        >>> count_tokens({"input_ids": torch.zeros(4, 128, dtype=torch.long)})
        512
    """
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return ids.numel()
    elif isinstance(batch, torch.Tensor):
        return batch.numel()
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].numel()
    raise TypeError(
        f"Cannot count the tokens in this batch ({describe_batch(batch)}): the default"
        " `tokens_fn` reads `attention_mask` or `input_ids` from a dict, a tensor, or the first"
        " tensor of a tuple. Pass `tokens_fn=lambda batch: <number of tokens>`."
    )


def checked_token_count(tokens_fn: TokensFn, batch: Any) -> int:
    """Call ``tokens_fn`` and insist on a non-negative whole number."""
    count = tokens_fn(batch)
    if isinstance(count, torch.Tensor) and count.numel() == 1:
        count = count.item()
    if isinstance(count, float) and count.is_integer():
        count = int(count)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(
            f"`tokens_fn` must return a non-negative int for every batch, got {count!r}."
            " Return the number of tokens the batch holds,"
            " e.g. `int(batch['attention_mask'].sum())`."
        )
    return count


def describe_batch(batch: Any) -> str:
    """A batch's shape in a few words, for messages.

    Example::

        >>> describe_batch({"input_ids": torch.zeros(2, 3)})
        "dict with keys ['input_ids']"
        >>> describe_batch((torch.zeros(2, 3), 1))
        'tuple of (Tensor[2, 3], int)'
    """

    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"Tensor[{', '.join(map(str, value.shape))}]"
        return type(value).__name__

    if isinstance(batch, Mapping):
        return f"dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        more = ", ..." if len(batch) > 4 else ""
        return f"{type(batch).__name__} of ({', '.join(one(v) for v in batch[:4])}{more})"
    return one(batch)


def count_on_device(tokens_fn: TokensFn, batch: Any) -> tuple[int | torch.Tensor, int | None]:
    """A batch's token count without a host sync, and an upper bound known on the host.

    The default ``tokens_fn`` counts an ``attention_mask`` on the device (the sum
    stays a tensor) and bounds it by the mask's size; ``input_ids`` or a tensor
    count exactly from their shape. A user ``tokens_fn`` returning an int counts
    exactly (bound = count); one returning a tensor is bounded by the batch's
    shape when it has one of the default shapes, else unbounded (None).

    Returns:
        ``(count, bound)``: ``count`` a Python int or a 0-dim integer tensor.

    Raises:
        TypeError, ValueError: as :func:`count_tokens` and :func:`checked_token_count`.
    """
    if tokens_fn is count_tokens:
        if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
            mask = batch["attention_mask"]
            return mask.sum(), mask.numel()
        count = count_tokens(batch)
        return count, count
    count = tokens_fn(batch)
    if isinstance(count, torch.Tensor) and count.numel() == 1 and not count.is_floating_point():
        return count.reshape(()), shape_bound(batch)
    count = checked_token_count(lambda _: count, batch)
    return count, count


def shape_bound(batch: Any) -> int | None:
    """The most tokens a batch can hold, from its shape alone (None if it has no known shape)."""
    if isinstance(batch, Mapping):
        for key in ("attention_mask", "input_ids"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key].numel()
    elif isinstance(batch, torch.Tensor):
        return batch.numel()
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].numel()
    return None


class TokenCounter:
    """The run's token count, kept on the device between exact counts.

    Training steps add counts without a host sync or a collective: a count that
    needs the device (a mask's sum) accumulates in a tensor, and a bound from the
    batches' shapes accumulates on the host. :meth:`upper_bound` says, without
    any communication and identically on every rank, how many tokens the run may
    have seen; only when that could reach a snapshot's threshold does the caller
    :meth:`sync` (one ``.tolist()`` and, under several ranks, one all-reduce).

    Across ranks the bound of a step is the sum over ranks of the largest step
    each rank has had so far (learned at every exact count, so the bound is the
    same on every rank). The first step under several ranks is counted exactly.
    A rank whose step outgrows its own largest flags it; the flag travels with the
    next exact count (:attr:`outgrown`), since a snapshot may then land late.

    Args:
        tokens_fn: tokens in a batch, as :func:`count_on_device` takes it.
        rank: this rank (its slot in the agreed per-rank bounds).

    Example::

        counter = TokenCounter(count_tokens)
        counter.add(batch)
        counter.end_step()
        if counter.upper_bound() >= threshold:
            tokens = counter.sync(all_reduce_sum, world_size=1, device=device)
    """

    def __init__(self, tokens_fn: TokensFn, rank: int = 0) -> None:
        self.tokens_fn = tokens_fn
        self.rank = rank
        self.counted = 0  # exact, all ranks, every step up to the last sync
        self.outgrown = False  # some rank's step outgrew the agreed bound before the last sync
        self._window_int = 0  # this accumulation window (local)
        self._window_dev: torch.Tensor | None = None
        self._window_bound: int | None = 0
        self._steps_int = 0  # finished steps since the last sync (local)
        self._steps_dev: torch.Tensor | None = None
        self._steps = 0  # the same on every rank
        self._steps_bound: int | None = 0  # local bound of those steps
        self._largest_step: int | None = 0  # this rank's largest step bound so far
        self._agreed: list[int] | None = None  # every rank's largest step, as of the last sync
        self._grew = False

    def add(self, batch: Any) -> None:
        """Add a micro-batch (no host sync, no collective)."""
        self.add_count(*count_on_device(self.tokens_fn, batch))

    def add_count(self, count: int | torch.Tensor, bound: int | None) -> None:
        """Add a micro-batch's count (an int, or a 0-dim tensor on the device) and its bound."""
        if isinstance(count, torch.Tensor):
            self._window_dev = count if self._window_dev is None else self._window_dev + count
        else:
            self._window_int += count
        self._window_bound = (
            None if bound is None or self._window_bound is None else (self._window_bound + bound)
        )

    def end_step(self) -> None:
        """An optimizer step finished: the window joins the steps not counted exactly yet."""
        self._steps += 1
        self._steps_int += self._window_int
        if self._window_dev is not None:
            self._steps_dev = (
                self._window_dev if self._steps_dev is None else self._steps_dev + self._window_dev
            )
        bound = self._window_bound
        if bound is None or self._steps_bound is None:
            self._steps_bound = None
        else:
            self._steps_bound += bound
        if bound is None or self._largest_step is None:
            self._largest_step = None
        elif bound > self._largest_step:
            self._largest_step = bound
        if self._agreed is not None and (bound is None or bound > self._agreed[self.rank]):
            self._grew = True
        self._window_int, self._window_dev, self._window_bound = 0, None, 0

    @property
    def pending_steps(self) -> int:
        """Optimizer steps since the last exact count (the same on every rank)."""
        return self._steps

    def upper_bound(self, world_size: int = 1) -> float:
        """The most tokens the run can have seen by the last finished step (no communication)."""
        if self._steps == 0:
            return float(self.counted)
        if world_size == 1:
            if self._steps_dev is None:
                return float(self.counted + self._steps_int)  # exact already
            return float("inf") if self._steps_bound is None else self.counted + self._steps_bound
        if self._agreed is None or any(b < 0 for b in self._agreed):
            return float("inf")
        return float(self.counted + self._steps * sum(self._agreed))

    def sync(
        self,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor],
        world_size: int,
        device: torch.device,
    ) -> int:
        """Count the finished steps exactly (every rank must call it at the same step)."""
        if world_size == 1:
            if self._steps_dev is not None:
                self._steps_int += int(self._steps_dev.item())
            self.counted += self._steps_int
        else:
            largest = -1 if self._largest_step is None else self._largest_step
            packed = torch.zeros(2 + world_size, dtype=torch.int64, device=device)
            packed[0] = self._steps_int
            if self._steps_dev is not None:
                packed[0] += self._steps_dev.to(device)
            packed[1] = int(self._grew)
            packed[2 + self.rank] = largest
            totals = reduce_sum(packed).tolist()
            self.counted += totals[0]
            self.outgrown = bool(totals[1])
            self._agreed = totals[2:]
        self._steps, self._steps_int, self._steps_dev, self._steps_bound = 0, 0, None, 0
        self._grew = False
        return self.counted

    def window_tokens(self) -> int:
        """This rank's tokens in the unfinished accumulation window (a host sync)."""
        dev = 0 if self._window_dev is None else int(self._window_dev.item())
        return self._window_int + dev

    def set_window(self, tokens: int) -> None:
        """Restore the unfinished window's tokens (from a checkpoint)."""
        self._window_int, self._window_dev, self._window_bound = tokens, None, tokens
