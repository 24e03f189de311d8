"""Borrow the live model for a probe and hand it back exactly as it was.

A probe perturbs or fine-tunes the training weights in place. Before it does,
:class:`ModelBackup` copies parameters and buffers into buffers allocated once
and reused at every snapshot (one parameter-sized copy, never a ``deepcopy`` of
the module); :func:`borrowed` also saves everything else training could notice:
RNG states, each submodule's train/eval mode, grad mode, and ``.grad`` tensors.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import nn


class ModelBackup:
    """One preallocated copy of a module's parameters and buffers.

    Args:
        module: the module to back up; its parameters and buffers must keep their
            shapes between :meth:`save` and :meth:`restore`.

    Example::

        backup = ModelBackup(model)
        backup.save()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        backup.restore()  # bit-identical to before
    """

    def __init__(self, module: nn.Module) -> None:
        self.names = [n for n, _ in module.named_parameters()]
        self.params = [p for _, p in module.named_parameters()]
        self.buffers = [b for _, b in module.named_buffers()]
        self._param_copies = [torch.empty_like(p) for p in self.params]
        self._buffer_copies = [torch.empty_like(b) for b in self.buffers]

    @property
    def nbytes(self) -> int:
        """Bytes held by the copies: the probe's extra memory for the backup."""
        return sum(t.numel() * t.element_size() for t in self._param_copies + self._buffer_copies)

    @torch.no_grad()
    def save(self) -> None:
        for src, dst in zip(self.params + self.buffers, self._param_copies + self._buffer_copies):
            dst.copy_(src)

    @torch.no_grad()
    def restore(self) -> None:
        for dst, src in zip(self.params + self.buffers, self._param_copies + self._buffer_copies):
            dst.copy_(src)

    def saved_params(self) -> list[torch.Tensor]:
        """The saved parameter values, aligned with :attr:`params` (read-only by contract)."""
        return self._param_copies


@dataclass
class _RngState:
    python: Any
    numpy: Any
    torch: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> _RngState:
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
    state = _RngState.capture()
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
    with isolated_rng() if seed is None else seeded_rng(seed):
        batches = list(islice(iter(iterable), limit))
    if not batches:
        raise ValueError(f"`{argument}` yielded no batches. {hint}")
    return batches


@contextmanager
def borrowed(module: nn.Module, backup: ModelBackup, train: bool = False) -> Iterator[nn.Module]:
    """Lend ``module`` to a probe; on exit, everything training could see is restored.

    Restored exactly: parameter and buffer values (from ``backup``), ``.grad``
    tensors (the objects and their values), each submodule's ``training`` flag,
    grad mode, and the python, numpy, torch and cuda RNG states. Optimizers are
    never touched: a probe that needs one brings its own.

    The ``.grad`` tensors are set aside, not copied: inside the block every
    parameter's ``.grad`` is ``None`` (a fine-tune allocates its own, as a training
    step would), and on exit the very same tensors are put back, never written to.

    Args:
        module: the live model.
        backup: a :class:`ModelBackup` of ``module``; saved on entry.
        train: lend the module in train mode (fine-tuning) instead of eval mode.
    """
    modes = [(m, m.training) for m in module.modules()]
    # Setting the training grads aside (rather than cloning them) costs no memory,
    # and nothing the probe does can reach them: it sees `.grad is None`.
    grads = [(p, p.grad) for p in backup.params]
    for param in backup.params:
        param.grad = None
    rng = _RngState.capture()
    grad_enabled = torch.is_grad_enabled()
    backup.save()
    try:
        module.train(train)
        yield module
    finally:
        backup.restore()
        for param, grad in grads:
            param.grad = grad
        for m, mode in modes:
            m.training = mode
        torch.set_grad_enabled(grad_enabled)
        rng.restore()
