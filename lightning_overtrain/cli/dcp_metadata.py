"""Read a distributed checkpoint's ``.metadata`` without running code from it.

torch's :class:`~torch.distributed.checkpoint.FileSystemReader` reads ``.metadata``
with a plain ``pickle.load``: a ``.metadata`` planted in a watched directory would run
whatever it names. :class:`SafeFileSystemReader` unpickles it with an allow-list of
the classes a real ``dcp.save`` writes there (the checkpoint metadata dataclasses,
``torch.Size``, dtypes, layouts, memory formats, paths); anything else is refused
with :class:`UnsafeMetadataError`, unless the user passed ``--unsafe-load``.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

# Every global a .metadata pickle from dcp.save refers to (listed by saving a model
# with an AdamW state, bf16 and fp32 tensors and plain Python values, torch 2.13),
# plus the enum torch encodes memory formats with and the other path flavours.
_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch": frozenset({"Size"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "complex", "slice", "bytearray"}),
}


class UnsafeMetadataError(pickle.UnpicklingError):
    """A ``.metadata`` that names something a checkpoint's metadata never holds."""


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the allow-listed globals (and torch's dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeMetadataError(f"{module}.{name}")


def load_metadata(path: str) -> Metadata:
    """The :class:`~torch.distributed.checkpoint.metadata.Metadata` in the file ``path``.

    Raises:
        UnsafeMetadataError: naming the file, the refused global and ``--unsafe-load``.
        OSError: if the file cannot be read.

    Example::

        metadata = load_metadata("checkpoints/step100/.metadata")
    """
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except UnsafeMetadataError as exc:
            raise UnsafeMetadataError(
                f"{path} refers to {exc}, which a distributed checkpoint's metadata never"
                " holds: refused, as reading it could run code; pass --unsafe-load if you"
                " trust this directory"
            ) from None
    if not isinstance(metadata, Metadata):
        raise UnsafeMetadataError(
            f"{path} holds a {type(metadata).__name__}, not a distributed checkpoint's metadata"
        )
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """:class:`~torch.distributed.checkpoint.FileSystemReader` whose ``.metadata`` is read
    by :func:`load_metadata` (an allow-list) instead of a plain ``pickle.load``.

    Example::

        dcp.load(state, storage_reader=SafeFileSystemReader(path), no_dist=True)
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # The same as torch's, but with the allow-listed unpickler.
        metadata = load_metadata(os.fspath(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def metadata_reader(dcp_dir: str, unsafe_load: bool = False) -> FileSystemReader:
    """torch's own reader with ``--unsafe-load``, the allow-listed one without."""
    return FileSystemReader(dcp_dir) if unsafe_load else SafeFileSystemReader(dcp_dir)
