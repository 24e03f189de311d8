"""Sharded parameters (FSDP2 ``DTensor``): the local shard, where it sits in the global tensor.

Under ``fully_shard`` each parameter is a ``DTensor`` whose local tensor holds
this rank's rows. The probes perturb, back up and restore the local shard only;
the noise generator needs each local element's global flat position, and
``sigma_t`` needs the whole tensor's statistics.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - a torch without DTensor has no sharded params
    DTensor = None  # type: ignore[assignment,misc]


def fsdp_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The ``fully_shard``-ed submodules of ``module`` (FSDP2), outermost first."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard(modules: Iterable[torch.nn.Module]) -> None:
    """Free FSDP2's gathered parameters, so the next forward gathers the shards again.

    FSDP2 keeps the root module's parameters gathered after a forward pass (it
    would gather them again for backward). A probe that writes the shards (noise,
    a restore) must drop that stale copy, or the next forward would not see the
    write, and training would continue on the probe's weights.
    """
    for module in modules:
        module.reshard()  # type: ignore[operator]


def is_dtensor(tensor: object) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def any_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor`` (then every rank must run the same passes)."""
    return any(is_dtensor(t) for t in tensors)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``tensor`` (the tensor itself when it is not sharded).

    Writes into the result change the parameter: it is the DTensor's own storage.
    """
    return tensor._local_tensor if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def like_sharded(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local`` (a copy of ``like``'s shard) as a tensor of ``like``'s kind.

    For a ``DTensor`` the copy is wrapped with its mesh, placements and global shape,
    so a state dict built from it gathers (or saves as a distributed checkpoint)
    like the parameter would; any other tensor is returned as it is.
    """
    if not is_dtensor(like):
        return local
    return DTensor.from_local(
        local.to(like.device),
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a ``DTensor``)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def global_positions(tensor: torch.Tensor) -> tuple[int | None, torch.Tensor | None]:
    """Where the local shard's elements sit in the global tensor, flattened row-major.

    Returns:
        ``(start, None)`` when the local elements (in their own row-major order) are
        the global positions ``start, start + 1, ...`` (unsharded tensors, ``Shard(0)``,
        ``Replicate``); else ``(None, index)`` with an int64 tensor of every local
        element's global position, shaped like the local tensor.
    """
    if not is_dtensor(tensor):
        return 0, None
    shape = tuple(tensor.shape)
    mesh, placements = tensor.device_mesh, tensor.placements
    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    only_rows = all(
        isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in placements
    )
    if only_rows:
        row = 1
        for size in shape[1:]:
            row *= size
        return (offset[0] if shape else 0) * row, None
    device = tensor._local_tensor.device  # type: ignore[attr-defined]
    index = torch.zeros(local_shape, dtype=torch.int64, device=device)
    stride = 1
    for dim in reversed(range(len(shape))):
        positions = torch.arange(local_shape[dim], dtype=torch.int64, device=device) + offset[dim]
        view = [1] * len(shape)
        view[dim] = local_shape[dim]
        index += (positions * stride).view(view)
        stride *= shape[dim]
    return None, index
