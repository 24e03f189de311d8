"""Files the monitor writes and reads, handled as untrusted data.

Writers put a file in place atomically through a temporary file created
*exclusively* (``O_EXCL``, a random name, in the target's own directory), so a
symlink or FIFO planted at a predictable temporary name is never followed, and a
reader sees the old file or the new one, never half of one. Readers open only
regular files (a FIFO or a device is refused without being opened for reading,
so nothing blocks) and read at most a stated number of bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_overtrain.keys import Signal

#: The most a JSON file written by this package needs (settings, watcher state).
JSON_MAX_BYTES = 16 * 2**20
#: The most bytes of one history file read back (about a million snapshots' records).
HISTORY_MAX_BYTES = 1 << 30


class UnsafeFile(ValueError):
    """A file that is not read: not a regular file, or larger than its bound."""


def write_atomic(path: str, write: Callable[[IO[Any]], Any], binary: bool = False) -> None:
    """Write a text file at ``path`` through an exclusive temporary file, then rename it.

    Args:
        path: the file to create or replace (a symlink there is replaced, not followed).
        write: writes the content to the open temporary file.
        binary: open it in binary mode (a PNG), else text.

    Raises:
        OSError: when the directory cannot hold the file (full, read-only, missing);
            the temporary file is removed and ``path`` is left as it was.

    Example::

        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> write_atomic(os.path.join(d, "a.txt"), lambda f: f.write("hi"))
        >>> open(os.path.join(d, "a.txt")).read()
        'hi'
    """
    directory = os.path.dirname(os.path.abspath(path))
    # mkstemp: O_CREAT | O_EXCL | O_NOFOLLOW with a random name, mode 0600.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="") as f:
            write(f)
        os.chmod(tmp, 0o644)  # as an ordinary open() would have made it
        os.replace(tmp, path)  # atomic within one file system; replaces a symlink itself
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` so that a reader sees the old file or the new one.

    Raises:
        OSError: see :func:`write_atomic`.
    """
    write_atomic(path, lambda f: json.dump(data, f, indent=2, default=str))


def read_regular(path: str, max_bytes: int, follow_symlinks: bool = True) -> str:
    """The text of ``path`` if it is a regular file of at most ``max_bytes`` bytes.

    The file is opened non-blocking and checked on its open descriptor, so a FIFO,
    a device (``/dev/zero``) or a file swapped in after a check is never read.

    Args:
        path: the file.
        max_bytes: the largest size read.
        follow_symlinks: False refuses a symlink too (files whose place is their meaning).

    Raises:
        FileNotFoundError: if there is no such file.
        UnsafeFile: naming why it is not read.
        OSError: another failure to read it.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if not follow_symlinks and os.path.islink(path):
            raise UnsafeFile("it is a symlink, not a regular file") from exc
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(f"it is not a regular file ({_kind(info.st_mode)})")
        if info.st_size > max_bytes:
            raise UnsafeFile(f"it holds {info.st_size:,} bytes, more than the {max_bytes:,} read")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while read
        raise UnsafeFile(f"it holds more than the {max_bytes:,} bytes read")
    return data.decode("utf-8", errors="replace")


def read_json_object(path: str, max_bytes: int = JSON_MAX_BYTES) -> dict[str, Any]:
    """The JSON object in the regular file ``path``.

    Raises:
        FileNotFoundError: if there is no such file.
        UnsafeFile: if it is not a regular file of at most ``max_bytes``.
        ValueError: if it is not JSON, or not an object (the message says which).
    """
    text = read_regular(path, max_bytes)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"it is not complete JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
    return data


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"


#: A figure's name becomes ``<name>.png`` in the plots directory: a plain file name only.
_FIGURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,99}")


def confined_signals(signals: Sequence[Signal]) -> tuple[list[Signal], list[str]]:
    """Signals whose ``figure`` is a plain file name; others renamed, with a line each.

    A ``monitor.json`` handed over with a run may name a figure ``/abs/x`` or
    ``../../x``: the figure is then drawn under a safe name inside the plots directory.

    Returns:
        ``(signals, lines)``: the signals to draw, and what was renamed and why.
    """
    kept, lines = [], []
    for signal in signals:
        figure = signal.figure
        if figure is not None and not (_FIGURE_NAME.fullmatch(figure) and ".." not in figure):
            safe = re.sub(r"[^A-Za-z0-9_=+-]+", "_", figure).strip("_")[:100] or "figure"
            lines.append(
                f"the figure name {figure!r} of signal {signal.key!r} is not a plain file name;"
                f" drawn as {safe}.png inside the plots directory instead."
            )
            signal = dataclasses.replace(signal, figure=safe)
        kept.append(signal)
    return kept, lines


def inside(directory: str, path: str) -> bool:
    """Whether ``path`` (links resolved) lies inside ``directory`` (links resolved)."""
    root = os.path.realpath(directory)
    return os.path.commonpath([root, os.path.realpath(path)]) == root
