"""Read back what an offline W&B run wrote, for tests (wandb ships no reader for ``.wandb`` files).

A ``.wandb`` file is a 7-byte header (``:W&B``, a 2-byte magic, a 1-byte version)
followed by a LevelDB-style log: 32 KiB blocks of chunks, each with a 7-byte header
(crc32c: 4 bytes, length: 2 bytes little-endian, type: 1 byte). A record spans one
FULL chunk, or FIRST, MIDDLE..., LAST; a block's tail shorter than a chunk header is
zero padding. Every record is a ``wandb.proto.wandb_internal_pb2.Record``.

Call ``wandb.finish()`` before reading. In wandb 0.31 ``finish()`` can return before
wandb-core has written the last records, so :func:`read_records` waits (up to
``wait_s``) until the run's ``exit`` record is in the file.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from collections.abc import Iterator
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

FILE_HEADER = 7
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def run_files(root: str | os.PathLike[str]) -> list[str]:
    """Every ``run-*.wandb`` file under ``root`` (a ``WANDB_DIR`` or a logger's save_dir)."""
    return sorted(glob.glob(os.path.join(os.fspath(root), "**", "run-*.wandb"), recursive=True))


def _payloads(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError(f"not a .wandb file: header {data[:FILE_HEADER]!r}")
    pos, parts = FILE_HEADER, []
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:
            pos += left_in_block  # zero padding at the end of a block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0 and length == 0:
            break  # preallocated zeros: nothing more was written
        if pos + CHUNK_HEADER + length > len(data):
            break  # still being written
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = [chunk]
        elif kind == MIDDLE:
            parts.append(chunk)
        elif kind == LAST:
            parts.append(chunk)
            yield b"".join(parts)
            parts = []
        else:
            raise ValueError(f"bad chunk type {kind} at byte {pos}")


def read_records(path: str | os.PathLike[str], wait_s: float = 30.0) -> list[pb.Record]:
    """Every record in a ``.wandb`` file, in the order they were written.

    Waits up to ``wait_s`` seconds for the run's ``exit`` record (the last one
    written); ``wait_s=0`` reads what is there now.

    Raises:
        TimeoutError: if the run has not ended within ``wait_s``.
    """
    deadline = time.monotonic() + wait_s
    while True:
        with open(path, "rb") as f:
            data = f.read()
        records = []
        for payload in _payloads(data):
            record = pb.Record()
            record.ParseFromString(payload)
            records.append(record)
        ended = any(r.WhichOneof("record_type") == "exit" for r in records)
        if ended or wait_s <= 0:
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no exit record after {wait_s}s: call wandb.finish()")
        time.sleep(0.1)


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _item_value(item: pb.HistoryItem) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    which = (
        item.WhichOneof("value") if "value" in {o.name for o in item.DESCRIPTOR.oneofs} else None
    )
    if which is not None:
        value = getattr(item, which)
        return json.loads(value) if which == "json" else value
    for name in ("number", "integer", "text", "boolean"):
        if item.HasField(name):
            return getattr(item, name)
    return None


def history(records: list[pb.Record]) -> list[dict[str, Any]]:
    """The logged rows (``run.log`` calls), as ``{key: value}`` dicts."""
    return [
        {_key(item): _item_value(item) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def metrics(records: list[pb.Record]) -> list[pb.MetricRecord]:
    """Every ``define_metric`` record, in order."""
    return [r.metric for r in records if r.WhichOneof("record_type") == "metric"]


def config(records: list[pb.Record]) -> dict[str, Any]:
    """The run's config, with every update applied in order."""
    out: dict[str, Any] = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            for item in r.config.update:
                out[_key(item)] = json.loads(item.value_json)
        elif r.WhichOneof("record_type") == "run":
            for item in r.run.config.update:
                out[_key(item)] = json.loads(item.value_json)
    return out


def alerts(records: list[pb.Record]) -> list[pb.AlertRecord]:
    """Every ``wandb.alert`` record, in order."""
    return [r.alert for r in records if r.WhichOneof("record_type") == "alert"]
