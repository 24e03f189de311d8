"""Random numbers a probe draws without training noticing: isolated and seeded RNG blocks."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class RngState:
    python: Any
    numpy: Any
    torch: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without moving any global RNG (python, numpy, torch, cuda)."""
    state = RngState.capture()
    try:
        yield
    finally:
        state.restore()


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch (and CUDA once in use) inside; restore them all on exit.

    A fine-tune in train mode draws dropout masks from the global RNG: seeding it
    from the probe's seed gives the same masks at every snapshot, and the training
    run never sees the difference.
    """
    with isolated_rng():
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        # Only once CUDA is up: seeding it earlier would be queued and land on training.
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(seed)
        yield
