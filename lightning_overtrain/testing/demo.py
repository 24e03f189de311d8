"""A tiny byte-level causal LM and offline text, for examples, tests and benchmarks.

Everything here runs on a laptop CPU with no download: the model is built from a
transformers config (needs the ``transformers`` extra), and the text is what every
Python installation ships: the standard library's own sources (code) and the
English prose of ``pydoc_data.topics`` (a natural downstream task unlike code).
"""

from __future__ import annotations

import os
import sysconfig
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset

from lightning_overtrain.engine.losses import transformers_loss

VOCAB_SIZE = 256  # bytes are the tokens: no tokenizer to download


def quiet_known_warnings() -> None:
    """Silence the dependency warnings the examples are known to raise, each harmless.

    The same filters as the test configuration (``pyproject.toml``); anything else
    still shows.
    """
    # torch 2.13 deprecates `LeafSpec`, which lightning 2.6's `utilities/_pytree.py`
    # still builds at every training step (lightning's to change; no effect on the run).
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )
    # jsonargparse 4.49 deprecates calls that LightningCLI 2.6 still makes.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="lightning.pytorch.cli")


def stdlib_code(max_bytes: int = 30_000_000) -> bytes:
    """The Python standard library's ``.py`` sources, in a fixed order, up to ``max_bytes``."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in {"site-packages", "__pycache__"})
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                data = f.read()
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                return b"".join(chunks)[:max_bytes]
    return b"".join(chunks)


def english_prose() -> bytes:
    """English documentation prose (``pydoc_data.topics``, about 0.8 MB), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


class ByteWindows(Dataset):
    """Non-overlapping windows of ``context`` bytes as ``{"input_ids": LongTensor}``.

    Args:
        data: the text.
        context: tokens per example.

    Raises:
        ValueError: if the text is shorter than one window.
    """

    def __init__(self, data: bytes, context: int) -> None:
        if len(data) < context:
            raise ValueError(f"`data` has {len(data)} bytes, fewer than one window of {context}.")
        usable = len(data) // context * context
        self.tokens = torch.frombuffer(bytearray(data[:usable]), dtype=torch.uint8).view(
            -1, context
        )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index].long()}


class TinyCausalLM(pl.LightningModule):
    """A small GPT-2 trained with AdamW (by default 125k parameters: 2 layers, width 64).

    Args:
        n_layer: transformer blocks.
        n_embd: width.
        n_head: attention heads.
        context: tokens per sequence.
        lr: peak learning rate.
        weight_decay: AdamW weight decay on matrices (the U-shape needs it).
        warmup_steps: linear warm-up, then constant lr (as in the paper's checkpoints).
        initializer_range: init std of matrices and embeddings.

    Example::

        model = TinyCausalLM(n_layer=2, n_embd=64)
        loss = model.model(input_ids=ids, labels=ids).loss
    """

    def __init__(
        self,
        n_layer: int = 2,
        n_embd: int = 64,
        n_head: int = 2,
        context: int = 128,
        lr: float = 2e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 64,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.save_hyperparameters()
        config = GPT2Config(
            vocab_size=VOCAB_SIZE,
            n_positions=context,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            initializer_range=initializer_range,
            bos_token_id=None,
            eos_token_id=None,
        )
        self.model = GPT2LMHeadModel(config)
        # transformers picks the loss from the class name, and "GPT2LMHeadModel" matches no
        # entry of its LOSS_MAPPING: it would warn "`loss_type=None` ... unrecognized" and use
        # the causal-LM loss anyway. Name that loss, so the demo model raises no warning.
        self.model.loss_type = "ForCausalLM"

    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = transformers_loss(self.model, batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        matrices = [p for p in self.parameters() if p.dim() >= 2]
        vectors = [p for p in self.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": matrices, "weight_decay": hp.weight_decay},
                {"params": vectors, "weight_decay": 0.0},
            ],
            lr=hp.lr,
            betas=(0.9, 0.95),
        )
        warmup = max(hp.warmup_steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
