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
