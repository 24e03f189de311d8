"""The reproduction's pinned text: Python sources to pretrain on, a downstream text unlike them.

The pretraining corpus is a fixed list of files: every ``.py`` file of the Python
standard library (``site-packages`` and ``__pycache__`` left out), then every ``.py``
file of the ``torch`` package, each list sorted by path, read whole until
``max_bytes`` (the last file cut there). Both come with every installation the
project supports and are pinned (the Python release, ``torch`` in
``requirements/pinned.txt``), so no download is needed; but another Python or
torch release ships other bytes, so :func:`pinned_code` returns a fingerprint
(the sha256 of the bytes, of the file list, the versions) that a run writes into
its results and compares with the published ones (:func:`corpus_differences`).

The downstream text is the English prose of ``pydoc_data.topics`` written in
another alphabet: every byte moved to the other half of the byte range
(``b ^ 0x80``). The grammar and words are English, which the code's comments
and docstrings teach; the symbols are ones Python source almost never uses, so
pretraining alone barely lowers its loss and the fine-tune has to do the
learning, as for a new language or format after pretraining.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lightning_overtrain.testing.demo import english_prose


@dataclass(frozen=True)
class CorpusFingerprint:
    """What identifies the pretraining corpus: compare it before trusting old results.

    Attributes:
        sha256: sha256 of the corpus bytes, in order.
        files_sha256: sha256 of the file list (root label and relative path, in order).
        files: number of files read (the last one possibly cut).
        bytes: length of the corpus.
        python: the Python release whose standard library was read.
        torch: the torch release whose sources were read.
    """

    sha256: str
    files_sha256: str
    files: int
    bytes: int
    python: str
    torch: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def corpus_roots() -> list[tuple[str, str]]:
    """The source trees, in reading order, as ``(label, directory)``."""
    return [
        ("stdlib", sysconfig.get_paths()["stdlib"]),
        ("torch", os.path.dirname(os.path.abspath(torch.__file__))),
    ]


def pinned_files(max_bytes: int) -> list[tuple[str, str, str]]:
    """The corpus's files in reading order, as ``(label, relative path, absolute path)``.

    Args:
        max_bytes: stop once the files listed hold this many bytes.

    Raises:
        ValueError: if ``max_bytes`` < 1.
    """
    if max_bytes < 1:
        raise ValueError(f"`max_bytes` must be >= 1, got {max_bytes}. Pass e.g. 30_000_000.")
    out, total = [], 0
    for label, root in corpus_roots():
        for relative in _python_files(root):
            path = os.path.join(root, relative)
            out.append((label, relative, path))
            total += os.path.getsize(path)
            if total >= max_bytes:
                return out
    return out


def _python_files(root: str) -> list[str]:
    """Every ``.py`` file under ``root``, relative and sorted (walk order is the OS's)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in {"site-packages", "__pycache__"}]
        for name in filenames:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found, key=lambda p: p.split(os.sep))


def pinned_code(max_bytes: int) -> tuple[bytes, CorpusFingerprint]:
    """The pretraining corpus (``max_bytes`` long, or shorter if the trees hold less).

    Args:
        max_bytes: how many bytes to read.

    Returns:
        The bytes and their :class:`CorpusFingerprint`.

    Example::

        code, fingerprint = pinned_code(40_000_000)
        assert fingerprint.bytes == len(code)
    """
    files = pinned_files(max_bytes)
    chunks = []
    for _, _, path in files:
        with open(path, "rb") as f:
            chunks.append(f.read())
    data = b"".join(chunks)[:max_bytes]
    names = "\n".join(f"{label}:{'/'.join(rel.split(os.sep))}" for label, rel, _ in files)
    return data, CorpusFingerprint(
        sha256=hashlib.sha256(data).hexdigest(),
        files_sha256=hashlib.sha256(names.encode()).hexdigest(),
        files=len(files),
        bytes=len(data),
        python=platform.python_version(),
        torch=torch.__version__,
    )


def corpus_differences(published: dict[str, Any] | None, current: CorpusFingerprint) -> list[str]:
    """How ``current`` differs from a published fingerprint, one line per field (empty if same).

    Args:
        published: the ``corpus`` entry of earlier results (``None``: they recorded none).
        current: this run's fingerprint.
    """
    if not published:
        return ["the published results record no corpus fingerprint"]
    mine = current.to_dict()
    return [
        f"{field}: published {published.get(field)!r}, here {mine[field]!r}"
        for field in mine
        if published.get(field) != mine[field]
    ]


def foreign_prose() -> bytes:
    """English prose (``pydoc_data.topics``) in the upper half of the byte range (``b ^ 0x80``)."""
    return bytes(b ^ 0x80 for b in english_prose())
