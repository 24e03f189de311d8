"""The overtraining monitor from a LightningCLI YAML: no Python to change, one config to read.

``monitor_cli.yaml`` puts :class:`OvertrainingMonitor` and its probes under
``trainer.callbacks`` with ``class_path``/``init_args``, like any Lightning
callback. The model is the tiny byte-level GPT of ``lightning_overtrain.testing.demo``;
the data, the Python standard library's sources with the held-out tail as the
monitor's reference set. Plots land in ``<log dir>/overtrain/plots``.

Usage::

    python examples/monitor_cli.py fit --config examples/monitor_cli.yaml
    python examples/monitor_cli.py fit --config examples/monitor_cli.yaml --trainer.max_steps=50
    # Live in W&B: swap the logger (offline runs upload later with `wandb sync`).
    python examples/monitor_cli.py fit --config examples/monitor_cli.yaml \\
        --trainer.logger=WandbLogger --trainer.logger.project=lightning-overtrain
    # The README's example plot (10M tokens, about 20 minutes on 2 busy CPU cores):
    python examples/monitor_cli.py fit --config examples/monitor_cli.yaml \\
        --plot docs/example_plot.png
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

from lightning_overtrain import OvertrainingMonitor
from lightning_overtrain.cli.text import split_text
from lightning_overtrain.testing.demo import (
    ByteWindows,
    TinyCausalLM,
    quiet_known_warnings,
    stdlib_code,
)

HELD_OUT = 0.02


class StdlibCode(pl.LightningDataModule):
    """The Python standard library's sources as byte windows; the held-out tail is not trained on.

    Args:
        max_bytes: how much source text to read.
        context: tokens per sequence (match the model's).
        batch_size: sequences per training batch.
    """

    def __init__(
        self, max_bytes: int = 30_000_000, context: int = 128, batch_size: int = 32
    ) -> None:
        super().__init__()
        self.max_bytes, self.context, self.batch_size = max_bytes, context, batch_size

    def train_dataloader(self) -> DataLoader:
        train, _ = split_text(stdlib_code(self.max_bytes), HELD_OUT)
        windows = ByteWindows(train, self.context)
        return DataLoader(windows, batch_size=self.batch_size, shuffle=True, drop_last=True)


class HeldOutBatches:
    """The monitor's reference set: ``batches`` batches from the held-out tail of the text.

    A callable, so the YAML can configure it with ``class_path``/``init_args`` and the
    monitor reads the text only when training starts.

    Args:
        max_bytes: how much source text to read (match the data module's).
        context: tokens per sequence.
        batch_size: sequences per batch.
        batches: how many batches (8 x 8 x 128 = 8k tokens is enough for a stable loss).
    """

    def __init__(
        self, max_bytes: int = 30_000_000, context: int = 128, batch_size: int = 8, batches: int = 8
    ) -> None:
        self.max_bytes, self.context = max_bytes, context
        self.batch_size, self.batches = batch_size, batches

    def __call__(self) -> list[dict[str, Any]]:
        _, held_out = split_text(stdlib_code(self.max_bytes), HELD_OUT)
        loader = DataLoader(ByteWindows(held_out, self.context), batch_size=self.batch_size)
        return [batch for batch, _ in zip(loader, range(self.batches))]


def copy_plot(trainer: pl.Trainer, target: str) -> None:
    """Copy the monitor's noise plot to ``target`` (how ``docs/example_plot.png`` is made)."""
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, OvertrainingMonitor))
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    shutil.copyfile(os.path.join(monitor.dirpath, "plots", "noise.png"), target)
    print(f"noise plot copied to {target}")


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args`` as on the command line, minus ``--plot PATH``)."""
    from_command_line = args is None
    args = list(sys.argv[1:] if args is None else args)
    quiet_known_warnings()
    plot = None
    if "--plot" in args:
        at = args.index("--plot")
        plot = args[at + 1]
        del args[at : at + 2]
    if from_command_line:
        # LightningCLI warns when given both `args` and a command line: hand it the command
        # line itself, without our --plot.
        sys.argv[1:] = args
        cli = LightningCLI(TinyCausalLM, StdlibCode)
    else:
        cli = LightningCLI(TinyCausalLM, StdlibCode, args=args)
    if plot is not None:
        copy_plot(cli.trainer, plot)
    return cli


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so the YAML can import us
    main()
