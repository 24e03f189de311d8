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
from lightning_overtrain.engine.sharding import fsdp_modules, like_sharded, local_tensor, reshard


class ModelBackup:
    """One preallocated copy of a module's parameters and buffers (this rank's shards).

    For a sharded parameter (an FSDP2 ``DTensor``) only the local shard is copied,
    so each rank holds ``1 / world`` of the model. With ``device="cpu"`` the copy
    lives in host memory (pinned when CUDA is available, so copies to and from the
    accelerator are fast), and a probe's accelerator memory grows by at most a
    block of one tensor at a time.

    Args:
        module: the module to back up; its parameters and buffers must keep their
            shapes between :meth:`save` and :meth:`restore`.
        device: where the copy lives; None (default): beside each tensor.

    Example::

        backup = ModelBackup(model)
        backup.save()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        backup.restore()  # bit-identical to before
    """

    def __init__(self, module: nn.Module, device: str | torch.device | None = None) -> None:
        self.names = [n for n, _ in module.named_parameters()]
        self.params = [p for _, p in module.named_parameters()]
        self.buffers = [b for _, b in module.named_buffers()]
        self.device = None if device is None else torch.device(device)
        self._fsdp = fsdp_modules(module)
        self._param_copies = [self._allocate(local_tensor(p)) for p in self.params]
        self._buffer_copies = [self._allocate(local_tensor(b)) for b in self.buffers]

    def _allocate(self, like: torch.Tensor) -> torch.Tensor:
        if self.device is None:
            return torch.empty_like(like, memory_format=torch.contiguous_format)
        pin = self.device.type == "cpu" and torch.cuda.is_available()
        return torch.empty(like.shape, dtype=like.dtype, device=self.device, pin_memory=pin)

    @property
    def nbytes(self) -> int:
        """Bytes held by the copies: the probe's extra memory for the backup."""
        return sum(t.numel() * t.element_size() for t in self._param_copies + self._buffer_copies)

    @torch.no_grad()
    def save(self) -> None:
        for src, dst in zip(self.params + self.buffers, self._param_copies + self._buffer_copies):
            dst.copy_(local_tensor(src))

    @torch.no_grad()
    def restore(self) -> None:
        for dst, src in zip(self.params + self.buffers, self._param_copies + self._buffer_copies):
            local_tensor(dst).copy_(src)
        self.reshard()

    def reshard(self) -> None:
        """After writing the shards of an FSDP2 model: make the next forward see them."""
        reshard(self._fsdp)

    def saved_params(self) -> list[torch.Tensor]:
        """The saved parameter values (local shards), aligned with :attr:`params` (read-only)."""
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
            # A sharded parameter's copy is its local shard: shown as the DTensor it backs.
            state_dict[key] = like_sharded(saved[id(tensor)], tensor).detach()


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
