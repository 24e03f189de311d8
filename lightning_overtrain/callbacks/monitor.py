"""``OvertrainingMonitor``: snapshots, probes and reports, from inside a Lightning run.

Data flows one way: Trainer hooks -> cadence (when?) -> snapshot (tokens, step,
weights) -> probes -> one record -> history -> reporters. The probes borrow the
live LightningModule (never the DDP wrapper, so no hidden collectives) and hand it
back exactly; the only collectives are sums the monitor makes on every rank at
the same points, so one rank's fault never leaves the others waiting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_overtrain import keys
from lightning_overtrain.callbacks.acting import act
from lightning_overtrain.callbacks.arguments import check_arguments
from lightning_overtrain.callbacks.cadence import Cadence
from lightning_overtrain.callbacks.fit_setup import (
    ReferenceShard,
    default_reporters,
    make_cooldown,
    resolve_init_std,
)
from lightning_overtrain.callbacks.keeping import (
    BEST_COOLED_FILE,
    BEST_FILE,
    best_not_written,
    save_best,
)
from lightning_overtrain.callbacks.strategies import (
    check_precision,
    check_strategy,
    precision_extras,
)
from lightning_overtrain.callbacks.token_clock import TokenClock
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.collectives import all_reduce_sum, world_size
from lightning_overtrain.engine.contract import Probe, ProbeContext, declared_signals
from lightning_overtrain.engine.data import (
    ReferenceData,
    TokenBudget,
)
from lightning_overtrain.engine.divergence import TrainingDiverged, diverged_message
from lightning_overtrain.engine.init_std import (
    InitStd,
)
from lightning_overtrain.engine.losses import LossFn, check_losses, transformers_loss
from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.engine.tokens import TokensFn, count_tokens
from lightning_overtrain.history import Record
from lightning_overtrain.inflection.policy import Decision, InflectionPolicy
from lightning_overtrain.keys import Signal
from lightning_overtrain.probes.cooldown import CooldownBranch
from lightning_overtrain.reporting.base import Reporter, RunView
from lightning_overtrain.reporting.guard import OUTPUT_FAILURES, call_reporters
from lightning_overtrain.reporting.progress import (
    SnapshotProgress,
    counted,
    label_epochs_of_a_steps_run,
)
from lightning_overtrain.reporting.rundir import run_dirpath

_JUDGING = "judging the snapshot (detector and policy)"


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
        checked = check_arguments(
            reference_data=reference_data,
            probes=probes,
            reference_batches=reference_batches,
            reference_tokens=reference_tokens,
            loss_fn=loss_fn,
            tokens_fn=tokens_fn,
            token_offset=token_offset,
            init_std=init_std,
            on_probe_error=on_probe_error,
            prefix=prefix,
            reporters=reporters,
            cooldown_steps=cooldown_steps,
            cooldown_data=cooldown_data,
            policy=policy,
            backup_device=backup_device,
        )
        self.cadence = Cadence(every_n_steps, every_n_tokens, points_per_decade, start_tokens)
        self.probes: list[Probe] = checked.probes
        reference_tokens = checked.reference_tokens
        self.reference_batches = checked.reference_batches
        self.loss_fn: LossFn = loss_fn or transformers_loss
        self.tokens_fn: TokensFn = tokens_fn or count_tokens
        # A token budget wraps the data, so the set is taken like any other reference_data.
        self.reference_data: ReferenceData = (
            reference_data
            if reference_tokens is None
            else TokenBudget(reference_data, reference_tokens, self.tokens_fn)
        )
        self.token_offset = checked.token_offset
        self.init_std = init_std
        self.on_probe_error = on_probe_error
        self.prefix = prefix
        self._dirpath = os.fspath(dirpath) if dirpath is not None else None
        self._user_reporters = list(reporters) if reporters is not None else None
        self.cooldown_steps = checked.cooldown_steps
        self.cooldown_data = cooldown_data
        self.backup_device = backup_device
        self.reporters: list[Reporter] = []
        self.signals: list[Signal] = [keys.reference_signal()]

        # Run state: all of it goes through state_dict().
        self.history: list[Record] = []
        self._clock = TokenClock(self.tokens_fn, self.token_offset)
        self.probe_failures = 0
        self.output_failures = 0  # writes of the monitor's files that failed (warned)
        self.init_stds: dict[str, float] | None = None
        self.init_std_source: str | None = None
        self.policy = policy if policy is not None else InflectionPolicy()
        self.stop_reason: str | None = None
        self._kept_cooled = False  # said once that best-cooled.ckpt is the cooled branch

        # Per-fit working state, rebuilt in on_fit_start.
        self._batches: list[Any] = []
        self._weights: list[int] = []
        self.reference_tokens = 0
        self.reference_fingerprint: str | None = None
        self._backup: ModelBackup | None = None
        self._cooldown: CooldownBranch | None = None
        self._last_step = 0
        self._progress = SnapshotProgress()
        self._state_before_snapshot: dict[str, Any] | None = None
        self._cadence_before: dict[str, Any] | None = None
        self._trainer_world, self._device = 1, torch.device("cpu")

    # ------------------------------------------------------------------ properties
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @property
    def counted_tokens(self) -> int:
        """Tokens of every optimizer step up to the last exact count (all ranks)."""
        return self._clock.counter.counted

    @property
    def tokens(self) -> int:
        """``T``: tokens seen by the whole run (all ranks, all accumulation steps).

        Counted exactly at every snapshot, checkpoint and the end of training; in
        between, the count waits on the device (no host sync on ordinary steps).
        """
        return self._clock.tokens

    @property
    def dirpath(self) -> str:
        if self._dirpath is None:
            raise RuntimeError("`dirpath` is known once the monitor is attached to a Trainer.")
        return self._dirpath

    def config(self) -> dict[str, Any]:
        """The monitor's settings, as written to ``monitor.json`` and the run's config."""
        return {
            "cadence": self.cadence.describe(),
            "probes": {p.name: p.config() for p in self.probes},
            "reference_batches": len(self._batches) * max(world_size(), 1)
            if self.reference_batches is None
            else self.reference_batches,
            "reference_tokens": self.reference_tokens,
            "reference_fingerprint": self.reference_fingerprint,
            "loss_fn": getattr(self.loss_fn, "__name__", repr(self.loss_fn)),
            "token_offset": self.token_offset,
            "init_std_source": self.init_std_source,
            "on_probe_error": self.on_probe_error,
            "prefix": self.prefix,
            "cooldown_steps": self.cooldown_steps,
            "policy": self.policy.config(),
            "signals": [s.to_dict() for s in self.signals],
        }

    def view(self) -> RunView:
        """The read-only view of the run that reporters get."""
        return RunView(
            dirpath=self.dirpath,
            prefix=self.prefix,
            history=tuple(self.history),
            tokens=self.tokens,
            config=self.config(),
            signals=tuple(self.signals),
            best_path=self.best_path,
            stop_reason=self.stop_reason,
        )

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy)
        check_precision(trainer.precision_plugin)
        if self._dirpath is None:
            # trainer.log_dir broadcasts from rank zero, so every rank agrees.
            self._dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, self.prefix)
        self.reporters = (
            list(self._user_reporters)
            if self._user_reporters is not None
            else default_reporters(trainer)
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint's state is back: a resumed run keeps its directory, a new
        # one never overwrites another run's history.
        self._dirpath = run_dirpath(trainer, self.dirpath, self.history)
        label_epochs_of_a_steps_run(trainer)
        shard = ReferenceShard(
            self.reference_data, self.reference_batches, self.tokens_fn, trainer, pl_module
        )
        self._batches, self._weights = shard.batches, shard.weights
        self.reference_tokens, self.reference_fingerprint = shard.tokens, shard.fingerprint
        self._backup = ModelBackup(pl_module, device=self.backup_device)
        if self.init_stds is None:  # else restored from a checkpoint: the same noise scale
            self.init_stds, self.init_std_source = resolve_init_std(
                trainer, pl_module, self.init_std
            )
        # Every batch once (a bad token id in batch 5 is named now, not at every snapshot).
        check_losses(
            pl_module,
            self._backup,
            self._batches,
            self.loss_fn,
            "reference_data",
            trainer.global_rank,
            trainer.world_size,
        )
        ctx = self._context(trainer, pl_module)
        if self.cooldown_steps:
            self._cooldown = make_cooldown(
                trainer,
                pl_module,
                ctx,
                self.cooldown_data,
                self.cooldown_steps,
                self.tokens_fn,
                self.backup_device,
            )
        for probe in self.probes:
            probe.validate(ctx)
        self.signals = declared_signals(self.probes)
        self.policy.declare(self.signals)
        if trainer.is_global_zero:
            view = self.view()
            self.output_failures = call_reporters(
                self.reporters, "setup", lambda r: r.setup(trainer, view), self.output_failures
            )
        rank_zero_info(
            f"OvertrainingMonitor: {len(self.probes)} probe(s),"
            f" snapshots {self.cadence.describe()},"
            f" reference set of {self.reference_tokens:,} tokens, init std from"
            f" {self.init_std_source}; history in {self.dirpath}"
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._trainer_world, self._device = trainer.world_size, pl_module.device

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # The hot path: no host sync and no collective unless a snapshot may be due.
        self._clock.add(batch)
        step = trainer.global_step
        if step == self._last_step:
            return  # inside a gradient-accumulation window: no optimizer step yet
        self._last_step = step
        self._clock.end_step()
        if not self._clock.may_be_due(self.cadence, step, trainer.world_size):
            return
        self._clock.sync(trainer.world_size, pl_module.device)
        cadence = self.cadence.state_dict()  # before `due` moves past this threshold
        if self.cadence.due(step, self.tokens):
            self._cadence_before = cadence
            self.snapshot(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clock.sync(trainer.world_size, pl_module.device)  # every rank ends here
        if trainer.is_global_zero:
            view = self.view()
            self.output_failures = call_reporters(
                self.reporters,
                "teardown",
                lambda r: r.teardown(trainer, view),
                self.output_failures,
            )

    def state_dict(self) -> dict[str, Any]:
        """The run state; during a snapshot, the state as it was before the snapshot began.

        A checkpoint written while a probe holds the model (a SLURM requeue handler,
        a user's hook) then pairs the live weights with the state that goes with them.
        """
        if self._state_before_snapshot is not None:
            return self._state_before_snapshot
        # Lightning builds a checkpoint on every rank, so every rank reaches this sum.
        self._clock.sync(self._trainer_world, self._device)
        return self._current_state()

    def _current_state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "history": [dict(r) for r in self.history],
            **self._clock.state_dict(self._trainer_world, self._device),
            "probe_failures": self.probe_failures,
            "output_failures": self.output_failures,
            "cadence": self.cadence.state_dict(),
            "init_stds": dict(self.init_stds) if self.init_stds is not None else None,
            "init_std_source": self.init_std_source,
            "policy": self.policy.state_dict(),
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self._clock.load_state_dict(state_dict)
        self.probe_failures = int(state_dict.get("probe_failures", 0))
        self.output_failures = int(state_dict.get("output_failures", 0))
        self.cadence.load_state_dict(state_dict.get("cadence", {}))
        stds = state_dict.get("init_stds")
        self.init_stds = dict(stds) if stds is not None else None
        self.init_std_source = state_dict.get("init_std_source", self.init_std_source)
        self.policy.load_state_dict(state_dict.get("policy", {}))
        self.stop_reason = state_dict.get("stop_reason")

    # ------------------------------------------------------------------ snapshot
    def snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Record:
        """Probe the live model now, append the record to :attr:`history` and report it.

        Called by the cadence; call it yourself for an extra snapshot (on every rank).
        """
        start = time.perf_counter()
        self._clock.sync(trainer.world_size, pl_module.device)
        record: Record = {keys.TOKENS: self.tokens, keys.STEP: trainer.global_step}

        diverged: list[Decision] = []

        def failed(what: str, exc: Exception) -> None:
            if isinstance(exc, TrainingDiverged):  # not a probe's fault: say what happened
                message = diverged_message(exc.loss, self.tokens, trainer.global_step)
                action = self.policy.action_for(keys.REFERENCE_LOSS)
                diverged.append(
                    Decision(keys.REFERENCE_LOSS, "diverged", action, self.tokens, message)
                )
                return
            self._probe_failed(what, exc, record)

        before = self._current_state()
        if self._cadence_before is not None:
            # A checkpoint written during this snapshot resumes to take it again.
            before["cadence"], self._cadence_before = self._cadence_before, None
        self._state_before_snapshot = before
        try:
            ctx = self._context(trainer, pl_module)
            with self._progress.track(trainer, f"Probing at {self.tokens:,} tokens") as tick:
                ctx.loss_fn = counted(ctx.loss_fn, tick)
                cooldown = None
                if self._cooldown is not None:
                    cooldown = partial(
                        self._cooldown.branch,
                        optimizer=trainer.optimizers[0],
                        gradient_clip_val=trainer.gradient_clip_val,
                        gradient_clip_algorithm=trainer.gradient_clip_algorithm,
                    )
                record.update(measure_snapshot(ctx, self.probes, failed, cooldown))
            record[keys.PROBE_FAILURES] = self.probe_failures
            try:
                decisions = self._judge(trainer, record)
            except Exception as exc:  # e.g. a repeated token count: the policy skips this one
                self.policy.load_state_dict(before["policy"])
                failed(_JUDGING, exc)
                record[keys.PROBE_FAILURES] = self.probe_failures
                decisions = []
        except BaseException:  # e.g. Ctrl-C in a probe: a checkpoint saved now retakes it
            self.cadence.load_state_dict({**before["cadence"], "retake": True})
            self.policy.load_state_dict(before["policy"])
            raise
        finally:
            self._state_before_snapshot = None
        record[keys.PROBE_SECONDS] = time.perf_counter() - start
        record[OUTPUT_FAILURES] = self.output_failures
        self.history.append(record)
        if trainer.is_global_zero:
            view = self.view()
            self.output_failures = call_reporters(
                self.reporters,
                "report",
                lambda r: r.report(trainer, view, record),
                self.output_failures,
            )
        self._act(trainer, [*diverged, *decisions])
        return record

    # ------------------------------------------------------------------ policy
    @property
    def best_path(self) -> str | None:
        """The kept snapshot at the bottom of the best signal's curve (a Lightning checkpoint)."""
        return self.policy.best["path"] if self.policy.best else None

    @property
    def best_tokens(self) -> float | None:
        return self.policy.best["tokens"] if self.policy.best else None

    def _judge(self, trainer: pl.Trainer, record: Record) -> list[Decision]:
        """Let the policy judge the record; add its fields; keep the best snapshot."""
        cooled = keys.COOLDOWN_TRAIN_LOSS in record
        path = os.path.join(self.dirpath, BEST_COOLED_FILE if cooled else BEST_FILE)
        judgement = self.policy.judge(record, best_path=path)
        record.update(judgement.additions)
        if judgement.best_moved:
            self._save_best(trainer, path, cooled, record)
        return judgement.decisions

    def _save_best(self, trainer: pl.Trainer, path: str, cooled: bool, record: Record) -> None:
        """Keep the weights ``record`` measured at ``path`` (see :func:`save_best`), with the
        monitor's state as judged, this record included."""
        if cooled and not self._kept_cooled:
            self._kept_cooled = True
            rank_zero_info(
                f"OvertrainingMonitor: keeping the best snapshot's cooled weights (the"
                f" cooldown branch the probes measured), not the live run's, as {path}."
            )
        assert self._backup is not None
        state = {**self._current_state(), "config": self.config()}
        state["history"] = [*state["history"], dict(record)]
        error = save_best(trainer, path, self._backup, cooled, self.state_key, state)
        if error is not None:  # only the file is missing: the judgement stands
            self.output_failures = best_not_written(
                self.policy.best, path, error, self.output_failures
            )

    def _act(self, trainer: pl.Trainer, decisions: list[Decision]) -> None:
        def alert(title: str, text: str, level: str) -> None:
            view = self.view()
            self.output_failures = call_reporters(
                self.reporters,
                "alert",
                lambda r: r.alert(trainer, view, title, text, level),
                self.output_failures,
            )

        reason = act(trainer, decisions, alert)
        if reason is not None:
            self.stop_reason = reason

    def _probe_failed(self, what: str, exc: Exception, record: Record) -> None:
        if self.on_probe_error == "raise":
            raise exc
        self.probe_failures += 1
        subject = what if what == _JUDGING else f"the {what} probe"
        rank_zero_warn(
            f"OvertrainingMonitor: {subject} failed at {record[keys.TOKENS]:,} tokens"
            f" (step {record[keys.STEP]}) and was skipped ({type(exc).__name__}: {exc})."
            f" Failures so far: {self.probe_failures}. Training goes on; pass"
            " on_probe_error='raise' to stop instead."
        )

    def _context(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeContext:
        assert self._backup is not None and self.init_stds is not None
        return ProbeContext(
            module=pl_module,
            backup=self._backup,
            sigmas=[self.init_stds.get(n, 0.0) for n in self._backup.names],
            batches=self._batches,
            weights=self._weights,
            loss_fn=self.loss_fn,
            reduce_sum=all_reduce_sum,
            forward_context=trainer.precision_plugin.forward_context,
            world_size=trainer.world_size,
            extras={
                **precision_extras(trainer.precision_plugin),
                # The training optimizer, read only (the sharpness probe's update direction).
                **({"optimizer": trainer.optimizers[0]} if trainer.optimizers else {}),
                # Its lr scheduler, read only (the schedule probe steps a copy of it).
                **(
                    {"lr_scheduler": trainer.lr_scheduler_configs[0].scheduler}
                    if trainer.lr_scheduler_configs
                    else {}
                ),
            },
        )
