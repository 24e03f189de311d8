"""``T``, the run's token count, kept on the device and counted exactly only when needed.

The hot path (after every micro-batch) adds it to a
:class:`~lightning_overtrain.engine.tokens.TokenCounter` without a host sync or a
collective; the batches' shapes bound the count from above, and only when that
bound could reach the cadence's next threshold is the exact count synchronised.
A front end whose framework already counts the run's tokens (the Hugging Face
``Trainer`` with ``include_num_input_tokens_seen``) sets the count instead.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_overtrain.callbacks.cadence import Cadence
from lightning_overtrain.core.log import warn
from lightning_overtrain.engine.collectives import Collectives
from lightning_overtrain.engine.tokens import TokenCounter, TokensFn, checked_token_count


class TokenClock:
    """The run's tokens ``T`` (all ranks, all accumulation steps, plus an offset).

    Args:
        tokens_fn: tokens in a batch.
        token_offset: tokens seen before this run (continued pretraining).
        collectives: the ranks' channel (replaced by :meth:`bind` once training starts).
    """

    def __init__(
        self, tokens_fn: TokensFn, token_offset: int = 0, collectives: Collectives | None = None
    ) -> None:
        self.tokens_fn = tokens_fn
        self.token_offset = token_offset
        self.collectives = collectives or Collectives()
        self.counter = TokenCounter(tokens_fn, self.collectives.rank)
        self._restored_window: int | None = None

    def bind(self, collectives: Collectives) -> None:
        """Count through ``collectives`` from now on (the front end's ranks), before training."""
        self.collectives = collectives
        self.counter.rank = collectives.rank
        if self._restored_window is not None:  # loaded before the ranks were known
            self.counter.set_window(self._restored_window if collectives.rank == 0 else 0)
            self._restored_window = None

    @property
    def tokens(self) -> int:
        """``T`` as of the last exact count."""
        return self.token_offset + self.counter.counted

    def add(self, batch: Any) -> None:
        """A micro-batch was trained on (no host sync, no collective)."""
        self.counter.add(batch)

    def add_count(self, tokens: int) -> None:
        """This rank trained on ``tokens`` more tokens (no host sync, no collective).

        Raises:
            ValueError: when ``tokens`` is not a non-negative whole number.
        """
        count = checked_token_count(lambda _: tokens, None)
        self.counter.add_count(count, count)

    def end_step(self) -> None:
        """An optimizer step finished."""
        self.counter.end_step()

    def set_counted(self, tokens: int) -> None:
        """The framework's own exact count of this run's tokens (all ranks), without offset."""
        self.counter = TokenCounter(self.tokens_fn, self.collectives.rank)
        self.counter.counted = int(tokens)

    def may_be_due(self, cadence: Cadence, step: int) -> bool:
        """Whether a snapshot may be due after ``step``, decided without any communication."""
        if cadence.every_n_steps is not None:
            return cadence.due(step, self.tokens)  # by steps: the count is not needed
        bound = self.token_offset + self.counter.upper_bound(self.collectives.world_size)
        return bound >= cadence.threshold(cadence.next_index)

    def sync(self, device: torch.device) -> None:
        """Count exactly, on every rank at the same step (one collective under several)."""
        if not self.counter.pending_steps:
            return  # the same on every rank: either all sum or none does
        c = self.collectives
        self.counter.sync(c.reduce_sum, c.world_size, device)
        if self.counter.outgrown:
            warn(
                c,
                "OvertrainingMonitor: a rank's batch held more tokens than any it had before, so"
                " the exact count came late and a snapshot may land a few steps after its"
                " threshold. Keep batch shapes fixed (pad to the context length) to avoid it.",
            )

    def state_dict(self, device: torch.device | None = None) -> dict[str, Any]:
        """The count, with the unfinished accumulation window summed over ranks.

        Every rank calls it at the same point (a checkpoint is built on every rank),
        so under several ranks its one sum pairs up.
        """
        window = self.counter.window_tokens()
        if self.collectives.world_size > 1:
            total = torch.tensor([window], dtype=torch.int64, device=device)
            window = int(self.collectives.reduce_sum(total).item())
        return {
            "counted_tokens": self.counter.counted,
            # T with the token_offset: what `lightning-overtrain probe` reads from a checkpoint.
            "tokens": self.tokens,
            "pending_tokens": window,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counter = TokenCounter(self.tokens_fn, self.collectives.rank)
        self.counter.counted = int(state.get("counted_tokens", 0))
        # Every rank loads rank 0's file: the window's sum is carried by rank 0 alone.
        window = int(state.get("pending_tokens", 0))
        self.counter.set_window(window if self.collectives.rank == 0 else 0)
        self._restored_window = window
