"""A plain-torch LightningModule written into a temporary directory, and its checkpoints.

What a user of the CLI has: a ``mygpt.py`` of their own (not a transformers model),
a forward that takes token ids, and ``.ckpt`` files saved by Lightning.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import lightning
import torch

MODEL_SOURCE = """
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


class MyGPT(pl.LightningModule):
    def __init__(self, vocab: int = 256, dim: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def loss_fn(model, batch):
    ids = batch["input_ids"]
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def broken_loss(model, batch):
    return model(batch)
"""

TOKENS_PER_STEP = 1000
CONTEXT, BATCH = 16, 4
TEXT = bytes(range(32, 127)) * 8  # 760 bytes: more than 2 batches of 4 x 16


def write_model(directory: Path, name: str) -> Path:
    """Write the model as ``<directory>/<name>.py``; return its path."""
    path = directory / f"{name}.py"
    path.write_text(MODEL_SOURCE)
    return path


def write_checkpoints(directory: Path, steps: tuple[int, ...] = (1, 2, 3)) -> Path:
    """Lightning checkpoints of the model at ``steps`` (other weights each) in ``directory``."""
    source = write_model(directory, "_checkpoint_writer")
    spec = importlib.util.spec_from_file_location("_cli_models_writer", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source.unlink()
    ckpts = directory / "ckpts"
    ckpts.mkdir()
    for step in steps:
        torch.manual_seed(step)
        model = module.MyGPT()
        torch.save(
            {
                "state_dict": model.state_dict(),
                "global_step": step,
                "pytorch-lightning_version": lightning.__version__,
                "hyper_parameters": dict(model.hparams),
            },
            ckpts / f"step={step}.ckpt",
        )
    return ckpts


def probe_args(ckpts: Path, out: Path, reference: Path, *extra: str) -> list[str]:
    """``probe`` arguments for the plain-torch series (bytes, small windows, 1 noise pair)."""
    return [
        "probe",
        str(ckpts),
        "--out",
        str(out),
        "--reference-text",
        str(reference),
        "--tokenizer",
        "bytes",
        "--context",
        str(CONTEXT),
        "--batch-size",
        str(BATCH),
        "--reference-batches",
        "2",
        "--tokens-per-step",
        str(TOKENS_PER_STEP),
        "--init-std",
        "0.02",
        "--gammas",
        "0.5",
        "1",
        "--pairs",
        "1",
        "--no-progress",
        *extra,
    ]


def forget_module(name: str) -> Any:
    """Drop ``name`` from ``sys.modules`` (tests import their model under their own name)."""
    return sys.modules.pop(name, None)


def fsdp_run(out: str) -> None:
    """A real 2-process FSDP2 run (``ModelParallelStrategy``, ``fully_shard``, gloo) whose
    ``ModelCheckpoint`` and monitor write distributed checkpoints (``step=N.ckpt/``,
    ``best.ckpt/``); rank 0 writes the monitor's history to ``OUT/history.json``.

    Run as ``python tests/cli_models.py fsdp OUT`` (Lightning starts the second process).
    """
    import json
    import os

    from conftest import make_module, make_trainer, reference_batches, train_loader
    from fsdp_run import ShardedLM
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, DistributedSampler

    from lightning_overtrain import NoiseProbe, OvertrainingMonitor
    from lightning_overtrain.testing.demo import ByteWindows, stdlib_code

    torch.set_num_threads(1)
    text = stdlib_code(max_bytes=200_000)
    monitor = OvertrainingMonitor(
        reference_batches(text, n=2, batch_size=4),
        every_n_steps=2,
        probes=[NoiseProbe(gammas=(1.0,), pairs=1)],
        dirpath=os.path.join(out, "monitor"),
    )
    ckpts = ModelCheckpoint(
        dirpath=os.path.join(out, "ckpt"), every_n_train_steps=2, save_top_k=-1, filename="{step}"
    )
    module = make_module(0)
    sharded = ShardedLM(**module.hparams)
    sharded.load_state_dict(module.state_dict())
    data = train_loader(text).dataset
    assert isinstance(data, ByteWindows)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
    trainer = make_trainer(
        out,
        [monitor, ckpts],
        max_steps=4,
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        use_distributed_sampler=False,
        enable_checkpointing=True,
    )
    trainer.fit(sharded, DataLoader(data, batch_size=4, sampler=sampler))
    if trainer.global_rank == 0:
        with open(os.path.join(out, "history.json"), "w") as f:
            json.dump({"history": monitor.history, "best_path": monitor.best_path}, f)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    if sys.argv[1:2] == ["fsdp"]:
        fsdp_run(sys.argv[2])
