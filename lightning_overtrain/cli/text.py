"""Text the CLI reads and the windows and tokenizer it builds from it."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_overtrain.cli.loading import (
    import_object,
)
from lightning_overtrain.cli.series import (
    TRANSFORMERS,
    Checkpoint,
    SeriesError,
)
from lightning_overtrain.engine.data import take_reference_set
from lightning_overtrain.engine.tokens import count_tokens

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def read_text_files(paths: Sequence[str | os.PathLike[str]]) -> bytes:
    """The bytes of the user's own text files, concatenated in the given order."""
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.append(f.read())
    return b"\n".join(out)


def split_text(data: bytes, held_out: float) -> tuple[bytes, bytes]:
    """Split into (train, held-out) with the held-out part taken from the end."""
    cut = int(len(data) * (1 - held_out))
    return data[:cut], data[cut:]


def reference_set(
    args: argparse.Namespace, tokenize: Callable[[bytes], torch.Tensor], device: torch.device
) -> tuple[list[Any], list[int]]:
    if args.reference_fn is not None:
        data = import_object(args.reference_fn, "--reference-fn")
        what = f"--reference-fn {args.reference_fn!r}"
    else:
        data = windows(tokenize(read_text(args, "reference_text")), args, "--reference-text")
        what = "--reference-text"
    try:
        batches, weights = take_reference_set(data, args.reference_batches, count_tokens)
    except (ValueError, TypeError) as exc:
        raise SeriesError(f"{what}: {exc}") from exc
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return [move_data_to_device(b, device) for b in batches], weights


def read_text(args: argparse.Namespace, option: str) -> bytes:
    paths = getattr(args, option)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SeriesError(f"--{option.replace('_', '-')}: no such file {missing[0]!r}.")
    return read_text_files(paths)


def windows(ids: torch.Tensor, args: argparse.Namespace, what: str) -> list[dict[str, Any]]:
    """Non-overlapping sequences of ``--context`` tokens, in batches of ``--batch-size``.

    Each batch is ``{"input_ids": LongTensor[batch_size, context]}`` (the last one may
    hold fewer sequences): the format of the default loss, ``model(**batch).loss``.
    """
    n = len(ids) // args.context
    if n == 0:
        raise SeriesError(
            f"{what} holds {len(ids)} tokens, fewer than one sequence of --context"
            f" {args.context}. Pass more text or a smaller --context."
        )
    sequences = ids[: n * args.context].view(n, args.context)
    return [{"input_ids": batch} for batch in sequences.split(args.batch_size)]


def tokenizer(
    args: argparse.Namespace, ordered: list[Checkpoint]
) -> Callable[[bytes], torch.Tensor]:
    if args.tokenizer == "bytes" or (args.reference_text is None and not args.downstream_text):
        return lambda text: torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    path = args.tokenizer
    if path is None:
        saved = [
            c.path
            for c in ordered
            if c.kind == TRANSFORMERS
            and any(os.path.isfile(os.path.join(c.path, f)) for f in _TOKENIZER_FILES)
        ]
        if not saved:
            raise SeriesError(
                "Text needs a tokenizer and no checkpoint directory holds one: pass"
                " --tokenizer bytes (byte-level models) or --tokenizer PATH."
            )
        path = saved[0]
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise SeriesError(f"--tokenizer {path!r} cannot be loaded: {exc}") from exc

    def tokenize(text: bytes) -> torch.Tensor:
        ids = tokenizer(text.decode("utf-8", errors="replace"))["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    return tokenize
