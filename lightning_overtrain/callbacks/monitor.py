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
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_overtrain import keys
from lightning_overtrain.callbacks.cadence import Cadence
from lightning_overtrain.checks import check_int
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.collectives import all_reduce_sum, world_size
from lightning_overtrain.engine.contract import Probe, ProbeContext
from lightning_overtrain.engine.data import (
    ReferenceData,
    check_batches_argument,
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
from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.engine.tokens import TokensFn, checked_token_count, count_tokens
from lightning_overtrain.history import Record
from lightning_overtrain.inflection.policy import Decision, InflectionPolicy
from lightning_overtrain.probes.cooldown import CooldownBranch
from lightning_overtrain.probes.noise import NoiseProbe
from lightning_overtrain.reporting.base import Reporter
from lightning_overtrain.reporting.files import FileReporter
from lightning_overtrain.reporting.loggers import LoggerReporter
from lightning_overtrain.reporting.png import PlotReporter, matplotlib_available
from lightning_overtrain.reporting.progress import SnapshotProgress, counted
from lightning_overtrain.reporting.wandb import WandbReporter

_ON_PROBE_ERROR = ("warn", "raise")


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
        start_tokens: ... starting at this token count.
        reference_batches: take at most this many batches from ``reference_data``.
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
            ``WandbLogger``; list it first), ``LoggerReporter``, ``FileReporter`` and
            ``PlotReporter`` (with matplotlib).
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
            :class:`~lightning_overtrain.inflection.policy.InflectionPolicy`). Default: watch the
            perturbed and post-fine-tune losses, warn (never stop) once one turns
            upward, and keep the snapshot at the bottom of the curve as
            ``<dirpath>/best.ckpt``. Stopping is opt-in: ``InflectionPolicy(action="stop")``.

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
        if reference_batches is not None:
            check_int(
                "reference_batches",
                reference_batches,
                1,
                "Pass how many held-out batches to keep (about 8k tokens is enough), or None.",
            )
        for name, fn in (("loss_fn", loss_fn), ("tokens_fn", tokens_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"`{name}` must be callable or None, got {fn!r}.")
        check_int("token_offset", token_offset, 0, "Pass the tokens seen before this run, or 0.")
        check_init_std(init_std)
        if on_probe_error not in _ON_PROBE_ERROR:
            raise ValueError(
                f"`on_probe_error` must be one of {_ON_PROBE_ERROR}, got {on_probe_error!r}."
            )
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"`prefix` must be a non-empty string without spaces, got {prefix!r}.")
        if reporters is not None and not all(isinstance(r, Reporter) for r in reporters):
            raise ValueError(f"`reporters` must be Reporter objects, got {list(reporters)!r}.")
        check_int(
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

        if policy is not None and not isinstance(policy, InflectionPolicy):
            raise ValueError(
                f"`policy` must be an InflectionPolicy or None, got {policy!r}."
                " Pass e.g. policy=InflectionPolicy(action='stop')."
            )

        self.reference_data = reference_data
        self.reference_batches = reference_batches
        self.loss_fn: LossFn = loss_fn or transformers_loss
        self.tokens_fn: TokensFn = tokens_fn or count_tokens
        self.token_offset = token_offset
        self.init_std = init_std
        self.on_probe_error = on_probe_error
        self.prefix = prefix
        self._dirpath = os.fspath(dirpath) if dirpath is not None else None
        self._user_reporters = list(reporters) if reporters is not None else None
        self.cooldown_steps = cooldown_steps
        self.cooldown_data = cooldown_data
        self.reporters: list[Reporter] = []

        # Run state: all of it goes through state_dict().
        self.history: list[Record] = []
        self.counted_tokens = 0
        self.probe_failures = 0
        self.init_stds: dict[str, float] | None = None
        self.init_std_source: str | None = None
        self.policy = policy if policy is not None else InflectionPolicy()
        self.stop_reason: str | None = None

        # Per-fit working state, rebuilt in on_fit_start.
        self._batches: list[Any] = []
        self._weights: list[int] = []
        self.reference_tokens = 0
        self._backup: ModelBackup | None = None
        self._cooldown: CooldownBranch | None = None
        self._pending_tokens = 0
        self._last_step = 0
        self._progress = SnapshotProgress()

    # ------------------------------------------------------------------ properties
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @property
    def tokens(self) -> int:
        """``T``: tokens seen by the whole run (all ranks, all accumulation steps)."""
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
            "loss_fn": getattr(self.loss_fn, "__name__", repr(self.loss_fn)),
            "token_offset": self.token_offset,
            "init_std_source": self.init_std_source,
            "on_probe_error": self.on_probe_error,
            "prefix": self.prefix,
            "cooldown_steps": self.cooldown_steps,
            "policy": self.policy.config(),
        }

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
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
            ]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_reference_set(trainer, pl_module)
        self._backup = ModelBackup(pl_module)
        self._resolve_init_std(trainer, pl_module)
        if self._batches:  # a rank without reference batches has nothing to check
            check_loss(pl_module, self._backup, self._batches[0], self.loss_fn, "reference_data")
        ctx = self._context(trainer, pl_module)
        if self.cooldown_steps:
            self._cooldown = self._make_cooldown(trainer, pl_module, ctx)
        for probe in self.probes:
            probe.validate(ctx)
        if trainer.is_global_zero:
            for reporter in self.reporters:
                reporter.setup(trainer, self)
        rank_zero_info(
            f"OvertrainingMonitor: {len(self.probes)} probe(s),"
            f" snapshots {self.cadence.describe()},"
            f" reference set of {self.reference_tokens:,} tokens, init std from"
            f" {self.init_std_source}; history in {self.dirpath}"
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._pending_tokens += checked_token_count(self.tokens_fn, batch)
        step = trainer.global_step
        if step == self._last_step:
            return  # inside a gradient-accumulation window: no optimizer step yet
        self._last_step = step
        pending = self._pending_tokens
        if trainer.world_size > 1:
            counts = torch.tensor([float(pending)], dtype=torch.float64, device=pl_module.device)
            pending = int(all_reduce_sum(counts).item())
        self.counted_tokens += pending
        self._pending_tokens = 0
        if self.cadence.due(step, self.tokens):
            self.snapshot(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for reporter in self.reporters:
                reporter.teardown(trainer, self)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "history": [dict(r) for r in self.history],
            "counted_tokens": self.counted_tokens,
            # T with the token_offset: what `lightning-overtrain probe` reads from a checkpoint.
            "tokens": self.tokens,
            "pending_tokens": self._pending_tokens,
            "probe_failures": self.probe_failures,
            "cadence": self.cadence.state_dict(),
            "init_stds": dict(self.init_stds) if self.init_stds is not None else None,
            "init_std_source": self.init_std_source,
            "policy": self.policy.state_dict(),
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self.counted_tokens = int(state_dict.get("counted_tokens", 0))
        self._pending_tokens = int(state_dict.get("pending_tokens", 0))
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
        record: Record = {keys.TOKENS: self.tokens, keys.STEP: trainer.global_step}

        def failed(what: str, exc: Exception) -> None:
            self._probe_failed(what, exc, record)

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
        decisions = self._judge(trainer, record)
        record[keys.PROBE_SECONDS] = time.perf_counter() - start
        self.history.append(record)
        if trainer.is_global_zero:
            for reporter in self.reporters:
                reporter.report(trainer, self, record)
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
        """Feed the record to the policy; add its verdicts; keep the best snapshot."""
        additions, decisions = self.policy.update(record)
        record.update(additions)
        candidate = self.policy.best_candidate(record)
        if candidate is not None:
            path = os.path.join(self.dirpath, "best.ckpt")
            # Every rank calls it (a collective under sharded strategies); rank 0 writes.
            trainer.save_checkpoint(path, weights_only=True)
            signal, value = candidate
            self.policy.best = {
                "signal": signal,
                "value": value,
                "tokens": record[keys.TOKENS],
                "step": record[keys.STEP],
                "path": path,
            }
        if self.policy.best is not None:
            record[keys.BEST_TOKENS] = self.policy.best["tokens"]
            record[keys.BEST_VALUE] = self.policy.best["value"]
        return decisions

    def _act(self, trainer: pl.Trainer, decisions: list[Decision]) -> None:
        """Warn and alert on rank zero; stop only if every rank agrees someone must."""
        for decision in decisions:
            title = f"Overtraining {decision.trigger}: {decision.signal}"
            rank_zero_warn(f"OvertrainingMonitor ({decision.action}): {decision.message}")
            if trainer.is_global_zero:
                for reporter in self.reporters:
                    reporter.alert(trainer, self, title, decision.message, decision.action)
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
        rank_zero_warn(
            f"OvertrainingMonitor: the {what} probe failed at {record[keys.TOKENS]:,} tokens"
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
            extras={"optimizer": trainer.optimizers[0]} if trainer.optimizers else {},
        )

    # ------------------------------------------------------------------ set-up checks
    def _take_reference_set(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches, weights = take_reference_set(
            self.reference_data, self.reference_batches, self.tokens_fn
        )
        rank, size = trainer.global_rank, trainer.world_size
        self.reference_tokens = sum(weights)
        self._batches = [move_data_to_device(b, pl_module.device) for b in batches[rank::size]]
        self._weights = weights[rank::size]

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
