"""Count host syncs (tensor-to-Python conversions) and collectives inside a block.

A ``TorchDispatchMode`` sees every ``aten._local_scalar_dense`` (what ``.item()``,
``int()``, ``float()`` and ``bool()`` of a tensor dispatch to); ``tolist`` and
``numpy`` bypass the dispatcher, so they are patched; every collective of
``torch.distributed`` is patched too. Used by test_host_syncs.py and ddp_run.py.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "barrier",
    "gather",
    "scatter",
)


class _Conversions(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts["conversions"] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting(counts: Counter):
    """Inside, add 1 to ``counts['conversions']`` or ``counts['collectives']`` per event."""

    def wrap(original: Callable[..., Any], kind: str) -> Callable[..., Any]:
        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[kind] += 1
            return original(*args, **kwargs)

        return counted

    with ExitStack() as stack:
        for name in ("tolist", "numpy"):
            stack.enter_context(
                mock.patch.object(
                    torch.Tensor, name, wrap(getattr(torch.Tensor, name), "conversions")
                )
            )
        for name in COLLECTIVES:
            if hasattr(dist, name):
                stack.enter_context(
                    mock.patch.object(dist, name, wrap(getattr(dist, name), "collectives"))
                )
        stack.enter_context(_Conversions(counts))
        yield counts


def count_hot_path(monitor: Any) -> list[dict[str, Any]]:
    """Wrap ``monitor.on_train_batch_end``: one entry per call with its counts and step."""
    calls: list[dict[str, Any]] = []
    hook = monitor.on_train_batch_end
    snapshot = monitor.snapshot

    def snapshot_marked(trainer, pl_module):
        calls[-1]["snapshot"] = True
        return snapshot(trainer, pl_module)

    monitor.snapshot = snapshot_marked

    def counted(trainer, pl_module, outputs, batch, batch_idx):
        entry: dict[str, Any] = {"step": None, "snapshot": False}
        calls.append(entry)
        counts: Counter = Counter()
        with counting(counts):
            hook(trainer, pl_module, outputs, batch, batch_idx)
        entry.update(step=trainer.global_step, **counts)

    monitor.on_train_batch_end = counted
    return calls
