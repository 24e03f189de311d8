"""The ``lightning-overtrain`` command line: probe a checkpoint series, report a run."""

from lightning_overtrain.cli.main import main

__all__ = ["main"]
