"""Borrow the live model for a probe and hand it back exactly as it was.

A probe perturbs or fine-tunes the training weights in place. Before it does,
:class:`ModelBackup` copies parameters and buffers into buffers allocated once
and reused at every snapshot (one parameter-sized copy, never a ``deepcopy`` of
the module); :func:`borrowed` also saves everything else training could notice:
RNG states, each submodule's train/eval mode, grad mode, and ``.grad`` tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_overtrain.engine.rng import RngState


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
    rng = RngState.capture()
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
