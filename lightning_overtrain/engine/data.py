"""Batches the monitor takes once and evaluates identically: taking, checking, sharding."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_overtrain.engine.rng import isolated_rng, seeded_rng
from lightning_overtrain.engine.tokens import TokensFn, checked_token_count

ReferenceData = Iterable[Any] | Callable[[], Iterable[Any]]

#: The most batches read from data that has no length when no count is given: an
#: endless or streaming loader is refused past it instead of filling memory forever.
MAX_UNSIZED_BATCHES = 4096

#: How to bound each argument's data, for the message when it has no end.
_SIZE_HINTS = {
    "reference_data": "Pass reference_tokens=8192 (the reference set's size in tokens) or"
    " reference_batches=N to take only the first batches.",
    "eval_data": "Pass eval_batches=N to take only the first N batches.",
}


def check_batches_argument(data: Any, argument: str, what: str) -> None:
    """Reject, before training, data that cannot be a source of batches.

    Args:
        data: the user's argument: a DataLoader, a list of batches or a callable.
        argument: its name, for the message.
        what: what to pass instead, for the message.

    Raises:
        ValueError: for None, a string, bytes or a bare tensor, or an empty sized collection.
    """
    if (
        data is None
        or not (callable(data) or isinstance(data, Iterable))
        or isinstance(data, (str, bytes, torch.Tensor))
    ):
        raise ValueError(
            f"`{argument}` must be a DataLoader, a list of batches or a callable returning one,"
            f" got {type(data).__name__}. Pass {what}."
        )
    try:
        empty = len(data) == 0  # type: ignore[arg-type]
    except TypeError:  # a callable, a generator or an iterable-style DataLoader: known later
        empty = False
    if empty:
        raise ValueError(f"`{argument}` is empty. Pass {what} (a non-empty DataLoader or list).")


def take_batches(
    data: Iterable[Any] | Callable[[], Iterable[Any]],
    limit: int | None,
    argument: str,
    hint: str = "Pass a non-empty DataLoader or list of batches.",
    seed: int | None = None,
) -> list[Any]:
    """The first ``limit`` batches of ``data`` (all if None), taken without moving any RNG.

    A shuffling DataLoader draws from the global RNG when iterated: isolating it
    keeps training's random numbers those of a run without the monitor. Data the
    monitor takes once this way is evaluated identically at every snapshot.

    Args:
        data: a DataLoader, a list of batches, or a callable returning either.
        limit: the most batches to take.
        argument: the user's argument name, for the error.
        hint: what to pass instead, for the error.
        seed: seed the RNG while iterating, so a shuffling DataLoader yields the same
            batches on every rank and in every fit (a resumed run too).

    Raises:
        ValueError: if ``data`` yields no batches.
    """
    iterable = data() if callable(data) else data
    # Data with no length and no count may never end (a streaming IterableDataset).
    bound = limit is None and not _has_length(iterable) and not isinstance(data, TokenBudget)
    with isolated_rng() if seed is None else seeded_rng(seed):
        batches = list(islice(iter(iterable), MAX_UNSIZED_BATCHES + 1 if bound else limit))
    if not batches:
        raise ValueError(f"`{argument}` yielded no batches. {hint}")
    if bound and len(batches) > MAX_UNSIZED_BATCHES:
        raise ValueError(
            f"`{argument}` has no length and yielded more than {MAX_UNSIZED_BATCHES:,} batches"
            " (an endless or streaming loader?), so it is not read to its end."
            f" {_SIZE_HINTS.get(argument, 'Pass a DataLoader with a length, or a list.')}"
        )
    for index, batch in enumerate(batches):
        check_not_text(batch, argument, index)
    return batches


def _has_length(data: Any) -> bool:
    try:
        len(data)
    except TypeError:
        return False
    return True


def check_not_text(batch: Any, argument: str, index: int) -> None:
    """Refuse a batch of untokenized text with a message that says so.

    Raises:
        ValueError: naming the argument, the batch and the fix (tokenize first).
    """
    tensors: list[torch.Tensor] = []
    apply_to_collection(batch, torch.Tensor, tensors.append)
    if tensors:  # token ids are there; text beside them (metadata) is the loss_fn's business
        return
    values = list(batch.values()) if isinstance(batch, Mapping) else [batch]
    text = [
        v
        for v in values
        if isinstance(v, (str, bytes))
        or (isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v))
    ]
    if text:
        sample = repr(text[0])[:60]
        raise ValueError(
            f"`{argument}` batch {index} holds text ({sample}), not token ids: the monitor"
            " evaluates the model on tokenized batches. Tokenize it first, e.g. a collate_fn"
            " returning tokenizer(texts, return_tensors='pt', padding=True)."
        )


class TokenBudget:
    """The leading batches of ``data`` up to a token budget: a reference set sized in tokens.

    Batches are whole, so the set holds at least ``tokens`` tokens (the last batch may
    pass the budget) unless ``data`` runs out first. It is a callable like any
    ``reference_data``, so :func:`take_batches` iterates it under its own RNG isolation.

    Args:
        data: a DataLoader, a list of batches, or a callable returning either.
        tokens: the budget, counted with ``tokens_fn``.
        tokens_fn: tokens in a batch.

    Example::

        >>> batches = [{"input_ids": torch.zeros(2, 8, dtype=torch.long)}] * 10
        >>> from lightning_overtrain.engine.tokens import count_tokens
        >>> len(list(TokenBudget(batches, 40, count_tokens)()))
        3
    """

    def __init__(self, data: ReferenceData, tokens: int, tokens_fn: TokensFn) -> None:
        self.data = data
        self.tokens = tokens
        self.tokens_fn = tokens_fn

    def __call__(self) -> Iterator[Any]:
        total, count = 0, 0
        for batch in self.data() if callable(self.data) else self.data:
            check_not_text(batch, "reference_data", count)  # before tokens_fn fails on it
            yield batch
            total += checked_token_count(self.tokens_fn, batch)
            count += 1
            if total >= self.tokens:
                return
        rank_zero_warn(
            f"`reference_tokens={self.tokens}` asks for more tokens than `reference_data`"
            f" holds ({total:,} tokens in {count} batch(es)): the reference set is all of it."
            f" Pass reference_tokens={total} or less, or more held-out data."
        )

    def __repr__(self) -> str:
        return f"TokenBudget({type(self.data).__name__}, tokens={self.tokens})"


def take_reference_set(
    reference_data: ReferenceData, max_batches: int | None, tokens_fn: TokensFn
) -> tuple[list[Any], list[int]]:
    """The reference batches (at most ``max_batches``) and their token counts.

    Shared by the monitor and the ``lightning-overtrain`` CLI, so both evaluate a
    reference set built the same way.

    Raises:
        ValueError: if the data yields no batches or no tokens.
    """
    batches = take_batches(
        reference_data,
        max_batches,
        "reference_data",
        "Pass held-out pretraining batches (a non-empty DataLoader or list).",
        seed=0,  # a shuffling DataLoader: the same reference set on every rank and every fit
    )
    weights = [checked_token_count(tokens_fn, b) for b in batches]
    if sum(weights) == 0:
        raise ValueError(
            "`reference_data` holds 0 tokens according to `tokens_fn`. Check the batches'"
            " `input_ids`/`attention_mask`, or pass `tokens_fn`."
        )
    return batches, weights


def split_for_rank(
    batches: Sequence[Any], weights: Sequence[int], rank: int, world_size: int, even: bool
) -> tuple[list[Any], list[int]]:
    """This rank's share of whole batches (round-robin), and their token weights.

    Args:
        batches: the same batches on every rank.
        weights: tokens per batch.
        rank: this rank.
        world_size: number of ranks.
        even: give every rank the same number of batches, padding the short ranks
            with copies of the first batch at weight 0 (they add nothing to a
            token-weighted sum). Sharded models need it: every forward pass
            gathers parameters with a collective, so every rank must make the same
            number of them.
    """
    local, local_weights = list(batches[rank::world_size]), list(weights[rank::world_size])
    if even and batches:
        longest = -(-len(batches) // world_size)
        while len(local) < longest:
            local.append(batches[0])
            local_weights.append(0)
    return local, local_weights


@dataclass
class ShardedBatches:
    """Global batches split across ranks by rows: this rank's share of each.

    Attributes:
        local: this rank's rows of each global batch (on the model's device; maybe empty).
        weights: tokens in each local share.
        totals: tokens in each global batch (the same on every rank).
    """

    local: list[Any]
    weights: list[int]
    totals: list[int]

    def __len__(self) -> int:
        return len(self.local)


def shard_batches(
    batches: Sequence[Any],
    rank: int,
    world_size: int,
    tokens_fn: TokensFn,
    device: torch.device,
    argument: str,
    even: bool = False,
) -> ShardedBatches:
    """Split every global batch by rows (``tensor_split`` on dim 0): rank ``r`` keeps part ``r``.

    With ``even`` (sharded models: every rank must run every forward and backward
    pass), a rank whose part is empty gets the batch's first row at weight 0.

    Args:
        batches: the same global batches on every rank.
        rank: this rank.
        world_size: number of ranks.
        tokens_fn: tokens in a batch (the weight of its loss).
        device: where this rank's shares go.
        argument: the user's argument name, for errors.
        even: no rank gets an empty part (see above).

    Raises:
        ValueError: on a batch with no tokens, or whose tensors disagree on the batch size.
    """
    local, weights, totals = [], [], []
    for i, batch in enumerate(batches):
        rows = _batch_rows(batch, f"{argument}[{i}]")
        total = checked_token_count(tokens_fn, batch)
        if total == 0:
            raise ValueError(
                f"`{argument}` batch {i} holds 0 tokens according to `tokens_fn`. Check its"
                " `input_ids`/`attention_mask`, or pass `tokens_fn`."
            )
        if world_size > 1:
            batch = apply_to_collection(
                batch,
                torch.Tensor,
                lambda t: t.tensor_split(world_size)[rank].clone() if t.dim() else t,
            )
            rows = _batch_rows(batch, f"{argument}[{i}]")
        weight = checked_token_count(tokens_fn, batch) if rows else 0
        if not rows and even:
            batch = apply_to_collection(
                batches[i], torch.Tensor, lambda t: t[:1].clone() if t.dim() else t
            )
        local.append(move_data_to_device(batch, device))
        weights.append(weight)
        totals.append(total)
    return ShardedBatches(local, weights, totals)


def _batch_rows(batch: Any, what: str) -> int:
    sizes: set[int] = set()
    apply_to_collection(batch, torch.Tensor, lambda t: sizes.add(t.shape[0]) if t.dim() else None)
    if len(sizes) != 1:
        raise ValueError(
            f"`{what}` must hold tensors that share their first dimension (the batch size), so"
            f" each batch can be split across ranks; got first dimensions {sorted(sizes)}."
        )
    return sizes.pop()


def fingerprint_batches(batches: Iterable[Any]) -> str:
    """A short hash of the batches' content, in order: what a resumed run compares.

    Every tensor of every batch counts (its dtype, shape and values, read on the
    CPU), with the batch's structure (dict keys, tuple positions); other leaves
    count by their ``repr``. Two sets with the same token count but other tokens,
    or the same batches in another order, get different fingerprints.

    Args:
        batches: the batches, e.g. the reference set from :func:`take_reference_set`.

    Returns:
        ``"sha256:"`` and the first 16 hex digits of the digest.

    Example::

        >>> ids = torch.arange(6).view(2, 3)
        >>> fingerprint_batches([{"input_ids": ids}]) == fingerprint_batches([{"input_ids": ids}])
        True
    """
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"tensor {value.dtype} {tuple(value.shape)}|".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            digest.update(f"dict {len(value)}|".encode())
            for key in sorted(value, key=str):  # key order is not content
                digest.update(f"{key!s}=".encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)}|".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{value!r}|".encode())

    for batch in batches:
        digest.update(b"batch|")
        feed(batch)
    return "sha256:" + digest.hexdigest()[:16]
