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
from contextlib import nullcontext
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_overtrain import keys
from lightning_overtrain.callbacks.cadence import Cadence
from lightning_overtrain.callbacks.strategies import (
    check_precision,
    check_strategy,
    precision_extras,
)
from lightning_overtrain.checks import check_int
from lightning_overtrain.engine.backup import ModelBackup, presented
from lightning_overtrain.engine.collectives import all_reduce_sum, world_size
from lightning_overtrain.engine.contract import Probe, ProbeContext, declared_signals
from lightning_overtrain.engine.data import (
    ReferenceData,
    TokenBudget,
    check_batches_argument,
    fingerprint_batches,
    split_for_rank,
    take_batches,
    take_reference_set,
)
from lightning_overtrain.engine.init_std import (
    SOURCE_CONFIG,
    SOURCE_USER,
    SOURCE_WEIGHTS,
    InitStd,
    check_init_std,
    config_initializer_range,
    init_std_from_value,
    init_std_from_weights,
)
from lightning_overtrain.engine.losses import LossFn, check_loss, transformers_loss
from lightning_overtrain.engine.sharding import any_sharded
from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.engine.tokens import TokenCounter, TokensFn, count_tokens
from lightning_overtrain.history import Record
from lightning_overtrain.inflection.policy import Decision, InflectionPolicy
from lightning_overtrain.keys import Signal
from lightning_overtrain.probes.cooldown import CooldownBranch
from lightning_overtrain.probes.noise import NoiseProbe
from lightning_overtrain.reporting.base import Reporter, RunView
from lightning_overtrain.reporting.console import ConsoleReporter
from lightning_overtrain.reporting.files import FileReporter
from lightning_overtrain.reporting.loggers import LoggerReporter
from lightning_overtrain.reporting.png import PlotReporter, matplotlib_available
from lightning_overtrain.reporting.progress import SnapshotProgress, counted
from lightning_overtrain.reporting.wandb import WandbReporter

_ON_PROBE_ERROR = ("warn", "raise")
_JUDGING = "judging the snapshot (detector and policy)"
BEST_FILE = "best.ckpt"
#: With a cooldown the probes measure the cooled branch: the kept snapshot holds its weights.
BEST_COOLED_FILE = "best-cooled.ckpt"


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
        check_batches_argument(
            reference_data, "reference_data", "held-out pretraining batches, e.g. val_dataloader"
        )
        self.cadence = Cadence(every_n_steps, every_n_tokens, points_per_decade, start_tokens)
        self.probes: list[Probe] = [NoiseProbe()] if probes is None else list(probes)
        bad = [p for p in self.probes if not isinstance(p, Probe)]
        names = [getattr(p, "name", None) for p in self.probes]
        if not self.probes or bad or len(set(names)) != len(names):
            raise ValueError(
                f"`probes` must be a non-empty list of Probe objects with distinct names,"
                f" got {list(probes) if probes is not None else probes!r}."
                " Pass e.g. probes=[NoiseProbe(gammas=(0.25, 0.5, 1.0))]."
            )
        if reference_batches is not None and reference_tokens is not None:
            raise ValueError(
                f"Pass `reference_batches` or `reference_tokens`, not both, got"
                f" reference_batches={reference_batches!r} and"
                f" reference_tokens={reference_tokens!r}. Drop one, e.g. keep only"
                " reference_tokens=8192 to size the reference set in tokens."
            )
        if reference_batches is not None:
            reference_batches = check_int(
                "reference_batches",
                reference_batches,
                1,
                "Pass how many held-out batches to keep (about 8k tokens is enough), or None.",
            )
        if reference_tokens is not None:
            reference_tokens = check_int(
                "reference_tokens",
                reference_tokens,
                1,
                "Pass the reference set's size in tokens, e.g. reference_tokens=8192, or None.",
            )
        for name, fn in (("loss_fn", loss_fn), ("tokens_fn", tokens_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"`{name}` must be callable or None, got {fn!r}.")
        token_offset = check_int(
            "token_offset", token_offset, 0, "Pass the tokens seen before this run, or 0."
        )
        check_init_std(init_std)
        if on_probe_error not in _ON_PROBE_ERROR:
            raise ValueError(
                f"`on_probe_error` must be one of {_ON_PROBE_ERROR}, got {on_probe_error!r}."
            )
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"`prefix` must be a non-empty string without spaces, got {prefix!r}.")
        if reporters is not None and not all(isinstance(r, Reporter) for r in reporters):
            raise ValueError(f"`reporters` must be Reporter objects, got {list(reporters)!r}.")
        cooldown_steps = check_int(
            "cooldown_steps",
            cooldown_steps,
            0,
            "Pass 0 for no cooldown, or the branch's length, e.g. 20% of the steps between"
            " snapshots.",
        )
        if bool(cooldown_steps) != (cooldown_data is not None):
            raise ValueError(
                f"`cooldown_steps={cooldown_steps}` and `cooldown_data` go together, got"
                f" cooldown_data={type(cooldown_data).__name__}. Pass both (pretraining batches"
                " for the branch and its length) or neither."
            )

        if backup_device not in (None, "cpu"):
            raise ValueError(
                f"`backup_device` must be None (beside the weights) or 'cpu' (host memory),"
                f" got {backup_device!r}."
            )
        if policy is not None and not isinstance(policy, InflectionPolicy):
            raise ValueError(
                f"`policy` must be an InflectionPolicy or None, got {policy!r}."
                " Pass e.g. policy=InflectionPolicy(action='stop')."
            )

        self.reference_batches = reference_batches
        self.loss_fn: LossFn = loss_fn or transformers_loss
        self.tokens_fn: TokensFn = tokens_fn or count_tokens
        # A token budget wraps the data, so the set is taken like any other reference_data.
        self.reference_data: ReferenceData = (
            reference_data
            if reference_tokens is None
            else TokenBudget(reference_data, reference_tokens, self.tokens_fn)
        )
        self.token_offset = token_offset
        self.init_std = init_std
        self.on_probe_error = on_probe_error
        self.prefix = prefix
        self._dirpath = os.fspath(dirpath) if dirpath is not None else None
        self._user_reporters = list(reporters) if reporters is not None else None
        self.cooldown_steps = cooldown_steps
        self.cooldown_data = cooldown_data
        self.backup_device = backup_device
        self.reporters: list[Reporter] = []
        self.signals: list[Signal] = [keys.reference_signal()]

        # Run state: all of it goes through state_dict().
        self.history: list[Record] = []
        self._counter = TokenCounter(self.tokens_fn)
        self.probe_failures = 0
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
        self._trainer_world, self._device = 1, torch.device("cpu")

    # ------------------------------------------------------------------ properties
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @property
    def counted_tokens(self) -> int:
        """Tokens of every optimizer step up to the last exact count (all ranks)."""
        return self._counter.counted

    @counted_tokens.setter
    def counted_tokens(self, value: int) -> None:
        self._counter.counted = value

    @property
    def tokens(self) -> int:
        """``T``: tokens seen by the whole run (all ranks, all accumulation steps).

        Counted exactly at every snapshot, checkpoint and the end of training; in
        between, the count waits on the device (no host sync on ordinary steps).
        """
        return self.token_offset + self.counted_tokens

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
        if self._user_reporters is not None:
            self.reporters = list(self._user_reporters)
        else:
            # W&B first: it names the metrics' x-axis before the loggers log them.
            wandb = any(isinstance(lg, WandbLogger) for lg in trainer.loggers)
            self.reporters = [
                *([WandbReporter()] if wandb else []),
                LoggerReporter(),
                FileReporter(),
                *([PlotReporter()] if matplotlib_available() else []),
                # Last: its closing line lists the files the others wrote.
                ConsoleReporter(),
            ]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_reference_set(trainer, pl_module)
        self._backup = ModelBackup(pl_module, device=self.backup_device)
        self._resolve_init_std(trainer, pl_module)
        if self._batches:  # a rank without reference batches has nothing to check
            check_loss(pl_module, self._backup, self._batches[0], self.loss_fn, "reference_data")
        ctx = self._context(trainer, pl_module)
        if self.cooldown_steps:
            self._cooldown = self._make_cooldown(trainer, pl_module, ctx)
        for probe in self.probes:
            probe.validate(ctx)
        self.signals = declared_signals(self.probes)
        self.policy.declare(self.signals)
        if trainer.is_global_zero:
            view = self.view()
            for reporter in self.reporters:
                reporter.setup(trainer, view)
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
        self._counter.add(batch)
        step = trainer.global_step
        if step == self._last_step:
            return  # inside a gradient-accumulation window: no optimizer step yet
        self._last_step = step
        self._counter.end_step()
        if self.cadence.every_n_steps is not None:
            if not self.cadence.due(step, self.tokens):
                return
        else:
            bound = self.token_offset + self._counter.upper_bound(trainer.world_size)
            if bound < self.cadence.threshold(self.cadence.next_index):
                return
        self._sync_tokens(trainer.world_size, pl_module.device)
        if self.cadence.due(step, self.tokens):
            self.snapshot(trainer, pl_module)

    def _sync_tokens(self, world: int, device: torch.device) -> None:
        """The exact token count, on every rank at the same step (one collective)."""
        if not self._counter.pending_steps:
            return  # the same on every rank: either all sum or none does
        self._counter.sync(all_reduce_sum, world, device)
        if self._counter.outgrown:
            rank_zero_warn(
                "OvertrainingMonitor: a rank's batch held more tokens than any it had before, so"
                " the exact count came late and a snapshot may land a few steps after its"
                " threshold. Keep batch shapes fixed (pad to the context length) to avoid it."
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_tokens(trainer.world_size, pl_module.device)  # every rank ends here
        if trainer.is_global_zero:
            view = self.view()
            for reporter in self.reporters:
                reporter.teardown(trainer, view)

    def state_dict(self) -> dict[str, Any]:
        """The run state; during a snapshot, the state as it was before the snapshot began.

        A checkpoint written while a probe holds the model (a SLURM requeue handler,
        a user's hook) then pairs the live weights with the state that goes with them.
        """
        if self._state_before_snapshot is not None:
            return self._state_before_snapshot
        # Lightning builds a checkpoint on every rank, so every rank reaches this sum.
        self._sync_tokens(self._trainer_world, self._device)
        return self._current_state()

    def _current_state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "history": [dict(r) for r in self.history],
            "counted_tokens": self.counted_tokens,
            # T with the token_offset: what `lightning-overtrain probe` reads from a checkpoint.
            "tokens": self.tokens,
            "pending_tokens": self._counter.window_tokens(),
            "probe_failures": self.probe_failures,
            "cadence": self.cadence.state_dict(),
            "init_stds": dict(self.init_stds) if self.init_stds is not None else None,
            "init_std_source": self.init_std_source,
            "policy": self.policy.state_dict(),
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self._counter = TokenCounter(self.tokens_fn)
        self._counter.counted = int(state_dict.get("counted_tokens", 0))
        self._counter.set_window(int(state_dict.get("pending_tokens", 0)))
        self.probe_failures = int(state_dict.get("probe_failures", 0))
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
        self._sync_tokens(trainer.world_size, pl_module.device)
        record: Record = {keys.TOKENS: self.tokens, keys.STEP: trainer.global_step}

        def failed(what: str, exc: Exception) -> None:
            self._probe_failed(what, exc, record)

        before = self._current_state()
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
        finally:
            self._state_before_snapshot = None
        record[keys.PROBE_SECONDS] = time.perf_counter() - start
        self.history.append(record)
        if trainer.is_global_zero:
            view = self.view()
            for reporter in self.reporters:
                reporter.report(trainer, view, record)
        self._act(trainer, decisions)
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
        if judgement.best_moved:
            self._save_best(trainer, path, cooled)
        record.update(judgement.additions)
        return judgement.decisions

    def _save_best(self, trainer: pl.Trainer, path: str, cooled: bool) -> None:
        """Keep the weights the current record measured as the best snapshot, at ``path``.

        Without a cooldown they are the live weights: ``<dirpath>/best.ckpt``. With one,
        the probes measured the cooled branch, whose weights are still in the backup
        (the probes borrowed them last): ``<dirpath>/best-cooled.ckpt``, so nobody
        mistakes it for the raw run. Weights only (no optimizer state), plus the
        monitor's state (its ``tokens``, what ``lightning-overtrain probe`` reads) and
        settings, under the monitor's state key as in a full checkpoint.
        """
        if cooled and not self._kept_cooled:
            self._kept_cooled = True
            rank_zero_info(
                f"OvertrainingMonitor: keeping the best snapshot's cooled weights (the"
                f" cooldown branch the probes measured), not the live run's, as {path}."
            )
        assert self._backup is not None
        with presented(trainer.lightning_module, self._backup) if cooled else nullcontext():
            # Every rank builds it (a collective under sharded strategies); rank 0 writes.
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=True)
        state = {
            **self.state_dict(),
            "config": self.config(),
            "weights": "cooled" if cooled else "live",
        }
        checkpoint["callbacks"] = {self.state_key: state}
        trainer.strategy.save_checkpoint(checkpoint, path)
        trainer.strategy.barrier("OvertrainingMonitor._save_best")

    def _act(self, trainer: pl.Trainer, decisions: list[Decision]) -> None:
        """Warn and alert on rank zero; stop only if every rank agrees someone must."""
        for decision in decisions:
            title = f"Overtraining {decision.trigger}: {decision.signal}"
            rank_zero_warn(f"OvertrainingMonitor ({decision.action}): {decision.message}")
            if trainer.is_global_zero:
                view = self.view()
                for reporter in self.reporters:
                    reporter.alert(trainer, view, title, decision.message, decision.action)
        stops = [d for d in decisions if d.action == "stop"]
        # Called at every snapshot on every rank, so the collective always pairs up.
        if trainer.strategy.reduce_boolean_decision(bool(stops), all=False):
            self.stop_reason = (
                " ".join(d.message for d in stops) or "Another rank's policy decided to stop."
            )
            trainer.should_stop = True
            rank_zero_info(f"OvertrainingMonitor stopped training: {self.stop_reason}")

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
            extras=precision_extras(trainer.precision_plugin),
        )

    # ------------------------------------------------------------------ set-up checks
    def _take_reference_set(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches, weights = take_reference_set(
            self.reference_data, self.reference_batches, self.tokens_fn
        )
        rank, size = trainer.global_rank, trainer.world_size
        self.reference_tokens = sum(weights)
        self.reference_fingerprint = fingerprint_batches(batches)  # what a resume compares
        # Sharded (FSDP2): every forward pass is a collective, so every rank runs as many.
        even = any_sharded(pl_module.parameters())
        local, self._weights = split_for_rank(batches, weights, rank, size, even)
        self._batches = [move_data_to_device(b, pl_module.device) for b in local]

    def _make_cooldown(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ProbeContext
    ) -> CooldownBranch:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"`cooldown_steps` needs exactly one training optimizer to copy, found"
                f" {len(trainer.optimizers)}. Set cooldown_steps=0 for this model."
            )
        assert self.cooldown_data is not None
        batches = take_batches(
            self.cooldown_data,
            self.cooldown_steps,
            "cooldown_data",
            "Pass pretraining batches for the cooldown branch (a non-empty DataLoader or list).",
            seed=0,  # a shuffling DataLoader: the same batches on every rank
        )
        branch = CooldownBranch(
            pl_module,
            batches,
            self.cooldown_steps,
            tokens_fn=self.tokens_fn,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            backup_device=self.backup_device,
        )
        branch.validate(ctx, trainer.optimizers[0])
        return branch

    def _resolve_init_std(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.init_stds is not None:
            return  # restored from a checkpoint: the same noise scale as before
        if self.init_std is not None:
            self.init_stds, self.init_std_source = (
                init_std_from_value(pl_module, self.init_std),
                SOURCE_USER,
            )
        elif trainer.ckpt_path is None and trainer.global_step == 0:
            self.init_stds, self.init_std_source = init_std_from_weights(pl_module), SOURCE_WEIGHTS
        else:
            std = config_initializer_range(pl_module)
            if std is None:
                raise ValueError(
                    f"OvertrainingMonitor joined the run after step 0 (checkpoint"
                    f" {trainer.ckpt_path!r}) and cannot see the initial weights, and the model"
                    " has no transformers config with `initializer_range`. Pass `init_std`, the"
                    " std the weights were initialized with (e.g. init_std=0.02)."
                )
            self.init_stds = init_std_from_value(pl_module, std)
            self.init_std_source = SOURCE_CONFIG
            rank_zero_info(f"OvertrainingMonitor: init std {std} from the model's config.")
