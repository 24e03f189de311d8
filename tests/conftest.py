"""Shared pieces: a tiny byte-level GPT-2 on standard-library code, and a Trainer to fit it."""

from __future__ import annotations

import json
import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_overtrain import ProbeContext
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.testing.demo import ByteWindows, TinyCausalLM, english_prose, stdlib_code

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

CONTEXT = 32


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from a second thread, and two threads on a busy
    2-core machine spin against each other (3-4x the CPU for the same work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def code_text() -> bytes:
    return stdlib_code(max_bytes=200_000)


@pytest.fixture(scope="session")
def prose_text() -> bytes:
    return english_prose()[:100_000]


def make_module(seed: int = 0, **kwargs: Any) -> TinyCausalLM:
    pl.seed_everything(seed, verbose=False)
    settings = dict(n_layer=2, n_embd=32, n_head=2, context=CONTEXT, warmup_steps=4, lr=3e-3)
    settings.update(kwargs)
    return TinyCausalLM(**settings)


def train_loader(text: bytes, batch_size: int = 8, **kwargs: Any) -> DataLoader:
    return DataLoader(ByteWindows(text[:100_000], CONTEXT), batch_size=batch_size, **kwargs)


def reference_batches(
    text: bytes, n: int = 4, batch_size: int = 8
) -> list[dict[str, torch.Tensor]]:
    held_out = ByteWindows(text[-CONTEXT * batch_size * n :], CONTEXT)
    return list(DataLoader(held_out, batch_size=batch_size))


def history_text(history: list[dict], skip: tuple[str, ...] = ("probe_seconds",)) -> str:
    """A history as JSON text without the timing, to compare runs number for number
    (``==`` on the records would call the detector's NaN "no forecast yet" unequal)."""
    return json.dumps([{k: v for k, v in r.items() if k not in skip} for r in history])


#: The init stds of the quadratic test models (`a`, `b` and a constant `gain`).
SIGMAS = {"a": 0.3, "b": 0.1, "gain": 0.0}


def quadratic_context(model: torch.nn.Module) -> ProbeContext:
    """A probe context for a model whose loss is ``model.loss()`` (no data needed)."""
    backup = ModelBackup(model)
    return ProbeContext(
        module=model,
        backup=backup,
        sigmas=[SIGMAS[n] for n in backup.names],
        batches=[None],
        weights=[1],
        loss_fn=lambda module, batch: module.loss(),
    )


class LossRecorder(pl.Callback):
    """Keeps every training loss, to compare runs bit for bit."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def make_trainer(
    tmp_path: Any, callbacks: list[pl.Callback], max_steps: int, **kwargs: Any
) -> pl.Trainer:
    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=str(tmp_path),
    )
    settings.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **settings)
