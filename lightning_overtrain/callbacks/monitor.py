"""``OvertrainingMonitor``: the Lightning ``Trainer``'s front end over the monitor's core.

The run's whole life (token clock, cadence, snapshots, judging, records, reporting,
the stop/keep decision, its state) is :class:`~lightning_overtrain.core.MonitorCore`'s;
this callback hands it the LightningModule (never the DDP wrapper, so no hidden
collectives), the strategy's ranks and agreement, the precision context and the
optimizers, and carries out its decisions (``trainer.should_stop``, the kept
snapshot as a Lightning checkpoint).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from lightning_overtrain.callbacks.keeping import save_best
from lightning_overtrain.callbacks.strategies import (
    check_precision,
    check_strategy,
    precision_extras,
)
from lightning_overtrain.core.fit_setup import default_reporters
from lightning_overtrain.core.host import Host
from lightning_overtrain.core.monitor_core import MonitorCore
from lightning_overtrain.engine.collectives import Collectives, all_reduce_sum
from lightning_overtrain.engine.contract import Probe
from lightning_overtrain.engine.data import ReferenceData
from lightning_overtrain.engine.init_std import InitStd
from lightning_overtrain.engine.losses import LossFn
from lightning_overtrain.engine.tokens import TokensFn
from lightning_overtrain.frontends.common import show_core
from lightning_overtrain.history import Record
from lightning_overtrain.inflection.policy import InflectionPolicy
from lightning_overtrain.reporting.base import Reporter, RunView
from lightning_overtrain.reporting.progress import label_epochs_of_a_steps_run
from lightning_overtrain.reporting.rundir import run_dirpath


def lightning_collectives(trainer: pl.Trainer) -> Collectives:
    """The ranks as the Trainer's strategy sees them; stop decisions agreed its way."""
    return Collectives(
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        reduce_sum=all_reduce_sum,
        any_rank=lambda flag: trainer.strategy.reduce_boolean_decision(flag, all=False),
    )


@show_core
class OvertrainingMonitor(Callback):
    """Watch a pretraining run for catastrophic overtraining (arXiv 2503.19206).

    At each snapshot the monitor evaluates ``L(theta_T)`` on a fixed reference set
    and runs its probes (by default the Gaussian-noise probe), then logs one record
    against ``T``, the tokens seen by the whole run, to every Lightning logger and
    to ``history.jsonl``/``history.csv`` in its directory. Training does not notice:
    weights, buffers, gradients, optimizer state, RNG states and train/eval mode are
    exactly as before each snapshot.

    Args:
        reference_data: held-out pretraining batches (a ``DataLoader``, a list of
            batches, or a callable returning either). Taken once before training
            (without moving any RNG) and evaluated identically at every snapshot;
            under DDP each rank evaluates its share and the sums are added.
        probes: the probes to run; default ``[NoiseProbe()]``.
        every_n_steps: snapshot every N optimizer steps.
        every_n_tokens: snapshot every N tokens.
        points_per_decade: log-spaced snapshots, this many per decade of tokens ...
        start_tokens: ... starting at this token count (default 1M tokens). Counts may
            be written as integral floats: ``start_tokens=1e6``.
        reference_batches: take at most this many batches from ``reference_data``.
        reference_tokens: or size the reference set in tokens: take whole batches until
            they hold at least this many (counted by ``tokens_fn``; about 8k is enough
            for the paper's probes). Not with ``reference_batches``. Default: every batch
            of ``reference_data``.
        loss_fn: ``loss_fn(module, batch) -> scalar mean loss``; default
            ``module(**batch).loss``, the transformers convention.
        tokens_fn: ``tokens_fn(batch) -> int``; default counts ``attention_mask`` or
            ``input_ids``. Also weights each reference batch in the mean loss.
        token_offset: tokens seen before this run (continued pretraining).
        init_std: the std the weights were initialized with, which scales the noise.
            Default: measured from the weights when training starts at step 0, else
            ``initializer_range`` from a transformers config. A float (matrices and
            embeddings; vectors count as constant), a ``{name: std}`` mapping or a
            callable ``(name, param) -> std``.
        on_probe_error: ``"warn"`` (log, count in ``probe_failures``, skip) or
            ``"raise"`` (stop training with the probe's error).
        dirpath: where history files go; default ``<trainer.log_dir>/<prefix>``.
        prefix: the metric prefix and state key, e.g. ``overtrain/tokens``.
        reporters: replace the default reporters: ``WandbReporter`` (with a
            ``WandbLogger``; list it first), ``LoggerReporter``, ``FileReporter``,
            ``PlotReporter`` (with matplotlib) and ``ConsoleReporter`` (one line per
            snapshot through the ``lightning.pytorch`` logger).
        cooldown_steps: before probing, anneal a branch of the model for this many
            steps of ``cooldown_data`` (the training optimizer's state and lr, decayed
            linearly to 0), so every probe measures "what if pretraining stopped
            here?"; the live run is restored after. 0 (default): no cooldown. The raw
            reference loss is logged as ``cooldown/raw_reference_loss``. Costs one more
            parameter copy, plus a copy of the optimizer state while the branch runs.
        cooldown_data: pretraining batches for the branch (a DataLoader, a list or a
            callable); the first ``cooldown_steps`` are taken once, the same at every
            snapshot, and under DDP each batch is split across ranks.
        policy: when to warn or stop, and which snapshot to keep (an
            :class:`~lightning_overtrain.inflection.policy.InflectionPolicy`). Default: watch
            every U-shaped signal the probes declare (``Probe.signals()``: the perturbed
            and post-fine-tune losses of the built-in probes), warn (never stop) once one turns
            upward, and keep the snapshot at the bottom of the curve as
            ``<dirpath>/best.ckpt`` (with a cooldown, the cooled weights that were measured,
            as ``best-cooled.ckpt``). Stopping is opt-in: ``InflectionPolicy(action="stop")``.
        backup_device: where the probes' parameter backups live: None (default) beside
            the weights, or ``"cpu"``: host memory (pinned when CUDA is available), so a
            probe adds at most a block of one tensor to accelerator memory at a time.

    Raises:
        ValueError: on bad arguments (the message names the argument, the value and
            the fix), or before training when the reference data or the loss do
            not work with the model.

    Example::

        monitor = OvertrainingMonitor(
            reference_data=held_out_batches,
            points_per_decade=4,
            start_tokens=1_000_000,
            probes=[NoiseProbe(gammas=(0.25, 0.5, 1.0), pairs=4)],
        )
        trainer = L.Trainer(callbacks=[monitor], logger=WandbLogger(project="pretrain"))
    """

    def __init__(
        self,
        reference_data: ReferenceData,
        *,
        probes: Sequence[Probe] | None = None,
        every_n_steps: int | None = None,
        every_n_tokens: int | None = None,
        points_per_decade: int | None = None,
        start_tokens: int | None = None,
        reference_batches: int | None = None,
        reference_tokens: int | None = None,
        loss_fn: LossFn | None = None,
        tokens_fn: TokensFn | None = None,
        token_offset: int = 0,
        init_std: InitStd | None = None,
        on_probe_error: Literal["warn", "raise"] = "warn",
        dirpath: str | os.PathLike[str] | None = None,
        prefix: str = "overtrain",
        reporters: Sequence[Reporter] | None = None,
        cooldown_steps: int = 0,
        cooldown_data: ReferenceData | None = None,
        policy: InflectionPolicy | None = None,
        backup_device: str | None = None,
    ) -> None:
        self.core = MonitorCore(
            reference_data,
            probes=probes,
            every_n_steps=every_n_steps,
            every_n_tokens=every_n_tokens,
            points_per_decade=points_per_decade,
            start_tokens=start_tokens,
            reference_batches=reference_batches,
            reference_tokens=reference_tokens,
            loss_fn=loss_fn,
            tokens_fn=tokens_fn,
            token_offset=token_offset,
            init_std=init_std,
            on_probe_error=on_probe_error,
            dirpath=dirpath,
            prefix=prefix,
            reporters=reporters,
            cooldown_steps=cooldown_steps,
            cooldown_data=cooldown_data,
            policy=policy,
            backup_device=backup_device,
        )
        self.core.state_key = self.state_key

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    def config(self) -> dict[str, Any]:
        """The monitor's settings, as written to ``monitor.json`` and the run's config."""
        return self.core.config()

    def view(self) -> RunView:
        """The read-only view of the run that reporters get."""
        return self.core.view()

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy)
        check_precision(trainer.precision_plugin)
        # trainer.log_dir broadcasts from rank zero, so every rank agrees.
        self.core.set_default_dirpath(
            os.path.join(trainer.log_dir or trainer.default_root_dir, self.prefix)
        )
        wandb = any(isinstance(lg, WandbLogger) for lg in trainer.loggers)
        self.core.use_reporters(default_reporters(wandb))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint's state is back: a resumed run keeps its directory, a new
        # one never overwrites another run's history (rank zero decides, all follow).
        self.core.set_dirpath(run_dirpath(trainer, self.core.dirpath, self.core.history))
        label_epochs_of_a_steps_run(trainer)
        host = Host(
            module=pl_module,
            collectives=lightning_collectives(trainer),
            forward_context=trainer.precision_plugin.forward_context,
            optimizers=lambda: trainer.optimizers,
            extras={
                **precision_extras(trainer.precision_plugin),
                # Its lr scheduler, read only (the schedule probe steps a copy of it).
                **(
                    {"lr_scheduler": trainer.lr_scheduler_configs[0].scheduler}
                    if trainer.lr_scheduler_configs
                    else {}
                ),
            },
            save_best=partial(save_best, trainer),
            handle=trainer,
            gradient_clip_val=trainer.gradient_clip_val,
            gradient_clip_algorithm=trainer.gradient_clip_algorithm,
            device=pl_module.device,
        )
        self.core.start(
            host,
            step=trainer.global_step,
            resumed_from=trainer.ckpt_path,
            choose_directory=False,
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.core.last_step = trainer.global_step  # restored from a checkpoint by now

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # The hot path: no host sync and no collective unless a snapshot may be due.
        if self.core.after_batch(batch, trainer.global_step):
            self.snapshot(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.core.end()  # every rank ends here

    def state_dict(self) -> dict[str, Any]:
        """The run state; during a snapshot, the state as it was before the snapshot began.

        A checkpoint written while a probe holds the model (a SLURM requeue handler,
        a user's hook) then pairs the live weights with the state that goes with them.
        """
        # Lightning builds a checkpoint on every rank, so every rank reaches its sum.
        return self.core.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.core.load_state_dict(state_dict)

    def snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Record:
        """Probe the live model now, append the record to :attr:`history` and report it.

        Called by the cadence; call it yourself for an extra snapshot (on every rank).
        Stops training (``trainer.should_stop``) when the ranks agree the policy says so.
        """
        record = self.core.snapshot(trainer.global_step)
        if self.core.stop_requested:
            trainer.should_stop = True
        return record
