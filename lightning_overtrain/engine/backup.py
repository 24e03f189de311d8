"""Borrow the live model for a probe and hand it back exactly as it was.

A probe perturbs or fine-tunes the training weights in place. Before it does,
:class:`ModelBackup` copies parameters and buffers into buffers allocated once
and reused at every snapshot (one parameter-sized copy, never a ``deepcopy`` of
the module); :func:`borrowed` also saves everything else training could notice:
RNG states, each submodule's train/eval mode, grad mode, and ``.grad`` tensors.

While the model is lent, ``module.state_dict()`` shows the saved (live) values,
not the probe's: a checkpoint written meanwhile (a SLURM requeue handler, a
callback, a user's hook, ``weights_only`` or not) holds the live run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from weakref import WeakKeyDictionary

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

    def saved_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(live tensor, its saved value)`` for every parameter and buffer (read-only)."""
        return list(zip(self.params + self.buffers, self._param_copies + self._buffer_copies))


# The backups shown by `state_dict()` of each lent module, outermost first, and the
# handle of the one hook that shows them: the outermost backup holds the live run
# (a cooldown branch lends the model, then the probes borrow the cooled weights).
_SHOWN: WeakKeyDictionary[nn.Module, tuple[Any, list[ModelBackup]]] = WeakKeyDictionary()


@contextmanager
def presented(module: nn.Module, backup: ModelBackup) -> Iterator[None]:
    """Inside, ``module.state_dict()`` returns ``backup``'s saved values; the module is untouched.

    Nested blocks on the same module show the outermost backup. Entries of the
    state dict that are not parameters or buffers in ``backup`` (extra state)
    are left as they are.

    Args:
        module: the module whose ``state_dict()`` is redirected.
        backup: a saved :class:`ModelBackup` of ``module``.

    Example::

        backup.save()
        with presented(model, backup):
            perturb(model)
            torch.save(model.state_dict(), "live.pt")  # the saved weights, not the perturbed
    """
    entry = _SHOWN.get(module)
    if entry is None:
        register = getattr(module, "register_state_dict_post_hook", None)
        if register is None:  # torch < 2.5 names it privately, with the same signature
            register = module._register_state_dict_hook
        entry = (register(_show_saved), [])
        _SHOWN[module] = entry
    handle, shown = entry
    shown.append(backup)
    try:
        yield
    finally:
        shown.pop()
        if not shown:
            handle.remove()
            del _SHOWN[module]


def _show_saved(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    entry = _SHOWN.get(module)
    if not entry or not entry[1]:
        return
    saved = {id(t): copy for t, copy in entry[1][0].saved_tensors()}
    # Tied weights appear under several names, all of them in the state dict.
    named = itertools.chain(
        module.named_parameters(remove_duplicate=False),
        module.named_buffers(remove_duplicate=False),
    )
    for name, tensor in named:
        key = prefix + name
        if key in state_dict and id(tensor) in saved:
            state_dict[key] = saved[id(tensor)].detach()


@contextmanager
def borrowed(module: nn.Module, backup: ModelBackup, train: bool = False) -> Iterator[nn.Module]:
    """Lend ``module`` to a probe; on exit, everything training could see is restored.

    Restored exactly: parameter and buffer values (from ``backup``), ``.grad``
    tensors (the objects and their values), each submodule's ``training`` flag,
    grad mode, and the python, numpy, torch and cuda RNG states. Optimizers are
    never touched: a probe that needs one brings its own. Each set-up step is
    undone even when a later one fails (a backup that cannot be saved loses
    nothing), and while lent, ``module.state_dict()`` shows the live values
    (:func:`presented`).

    The ``.grad`` tensors are set aside, not copied: inside the block every
    parameter's ``.grad`` is ``None`` (a fine-tune allocates its own, as a training
    step would), and on exit the very same tensors are put back, never written to.

    Args:
        module: the live model.
        backup: a :class:`ModelBackup` of ``module``; saved on entry.
        train: lend the module in train mode (fine-tuning) instead of eval mode.
    """
    with ExitStack() as undo:
        # Each step registers its undo as soon as it is done; they run in reverse.
        modes = [(m, m.training) for m in module.modules()]
        undo.callback(_set_modes, modes)
        undo.callback(torch.set_grad_enabled, torch.is_grad_enabled())
        undo.callback(RngState.capture().restore)
        # Setting the training grads aside (rather than cloning them) costs no memory,
        # and nothing the probe does can reach them: it sees `.grad is None`.
        grads = [(p, p.grad) for p in backup.params]
        undo.callback(_put_grads, grads)
        for param in backup.params:
            param.grad = None
        backup.save()
        undo.enter_context(presented(module, backup))
        # Registered after `presented`, so it runs first: the live values are shown
        # until the module holds them again.
        undo.callback(backup.restore)
        module.train(train)
        yield module


def _set_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, mode in modes:
        m.training = mode


def _put_grads(grads: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    for param, grad in grads:
        param.grad = grad
