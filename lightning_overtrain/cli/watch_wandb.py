"""The watcher's W&B run: every record against ``overtrain/tokens``, resumed by id."""

from __future__ import annotations

import argparse
import contextlib
import secrets
import sys
from typing import Any

from lightning_overtrain import keys
from lightning_overtrain.history import Record
from lightning_overtrain.inflection.policy import Decision
from lightning_overtrain.reporting.loggers import WANDB_QUIET

PREFIX = "overtrain"


class WandbLog:
    """One W&B run for the watcher, against ``overtrain/tokens``; resumed by id on restart.

    W&B trouble (not installed, no login, no network) is a warning: the files still
    get every number.
    """

    def __init__(self, args: argparse.Namespace, state: dict[str, Any], settings: dict) -> None:
        self.run: Any = None
        try:
            import wandb

            # Our own id (wandb >= 0.2x has no `wandb.util.generate_id`): 8 lowercase
            # letters and digits, as W&B's run ids are, kept in watch.json for resuming.
            state.setdefault("wandb_run_id", secrets.token_hex(4))
            self.run = wandb.init(
                project=args.wandb_project,
                entity=args.wandb_entity,
                id=state["wandb_run_id"],
                resume="allow",
                dir=args.out,
                job_type="overtrain-watch",
                config={PREFIX: settings},
                settings=WANDB_QUIET,
            )
            self.run.define_metric(f"{PREFIX}/{keys.TOKENS}")
            self.run.define_metric(f"{PREFIX}/*", step_metric=f"{PREFIX}/{keys.TOKENS}")
        except Exception as exc:  # W&B is optional: the history files have everything
            self._disable("starting the W&B run", exc)

    def log(self, record: Record) -> None:
        if self.run is not None:
            try:
                self.run.log(keys.prefixed(PREFIX, record))
            except Exception as exc:
                self._disable("logging to W&B", exc)

    def alert(self, decision: Decision) -> None:
        if self.run is not None:
            title = f"Overtraining {decision.trigger}: {decision.signal}"[:63]
            level = "ERROR" if decision.action == "stop" else "WARN"
            with contextlib.suppress(Exception):
                self.run.alert(title=title, text=decision.message, level=level)

    def finish(self) -> None:
        if self.run is not None:
            with contextlib.suppress(Exception):
                self.run.finish()

    def _disable(self, what: str, exc: Exception) -> None:
        self.run = None
        print(
            f"warning: {what} failed ({type(exc).__name__}: {exc}); nothing more goes to W&B,"
            " the history files still get every number",
            file=sys.stderr,
        )
