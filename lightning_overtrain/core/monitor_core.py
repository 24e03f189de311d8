"""``MonitorCore``: a monitored run's whole life, in no particular training framework.

Data flows one way: a front end's hooks -> token clock and cadence (when?) ->
snapshot (tokens, step, weights) -> probes -> one record -> history -> policy
(warn / stop / keep) -> reporters. The front end hands the core a
:class:`~lightning_overtrain.core.host.Host` (the model, the ranks' channel, the
precision context, the optimizers, how to save) and reads back :attr:`stop_requested`
and :meth:`state_dict`. The probes borrow the live module and hand it back
exactly; the only collectives are the ones every rank makes at the same points,
so one rank's fault never leaves the others waiting.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

from lightning_overtrain import keys
from lightning_overtrain.callbacks.arguments import check_arguments
from lightning_overtrain.callbacks.cadence import Cadence
from lightning_overtrain.core.fit_setup import ReferenceShard, make_cooldown, resolve_init_std
from lightning_overtrain.core.host import Host
from lightning_overtrain.core.keeping import default_state_key
from lightning_overtrain.core.log import info
from lightning_overtrain.core.snapshotting import SnapshotSteps
from lightning_overtrain.core.steps import TokenSteps
from lightning_overtrain.core.token_clock import TokenClock
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.collectives import Collectives
from lightning_overtrain.engine.contract import Probe, declared_signals
from lightning_overtrain.engine.data import ReferenceData, TokenBudget
from lightning_overtrain.engine.init_std import InitStd
from lightning_overtrain.engine.losses import LossFn, check_losses, transformers_loss
from lightning_overtrain.engine.tokens import TokensFn, count_tokens
from lightning_overtrain.history import Record
from lightning_overtrain.inflection.policy import InflectionPolicy
from lightning_overtrain.keys import Signal
from lightning_overtrain.probes.cooldown import CooldownBranch
from lightning_overtrain.reporting.base import Reporter, RunView
from lightning_overtrain.reporting.guard import call_reporters
from lightning_overtrain.reporting.progress import SnapshotProgress
from lightning_overtrain.reporting.rundir import choose_dirpath


class MonitorCore(TokenSteps, SnapshotSteps):
    """A monitored run's state and life; arguments as ``OvertrainingMonitor``'s.

    Front ends call, on every rank: :meth:`start` once before training,
    :meth:`after_batch` after every micro-batch (or :meth:`count` and
    :meth:`end_step`, or :meth:`set_tokens` where the framework counts tokens),
    :meth:`snapshot` when one is due, :meth:`end` when training ends, and
    :meth:`state_dict` / :meth:`load_state_dict` with checkpoints.

    Raises:
        ValueError: on bad arguments (naming the argument, the value and the fix).

    Example::

        core = MonitorCore(held_out_batches, every_n_steps=100, dirpath="overtrain")
        core.start(Host(module=model, optimizers=lambda: [optimizer]))
        ...  # after each optimizer step:
        core.count(batch)
        if core.end_step(step):
            core.snapshot(step)
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
        self.reference_batches = checked.reference_batches
        self.loss_fn: LossFn = loss_fn or transformers_loss
        self.tokens_fn: TokensFn = tokens_fn or count_tokens
        # A token budget wraps the data, so the set is taken like any other reference_data.
        self.reference_data: ReferenceData = (
            reference_data
            if checked.reference_tokens is None
            else TokenBudget(reference_data, checked.reference_tokens, self.tokens_fn)
        )
        self.token_offset = checked.token_offset
        self.init_std = init_std
        self.on_probe_error = on_probe_error
        self.prefix = prefix
        self.state_key = default_state_key(prefix)
        self._dirpath = os.fspath(dirpath) if dirpath is not None else None
        self.user_reporters = list(reporters) if reporters is not None else None
        self.cooldown_steps = checked.cooldown_steps
        self.cooldown_data = cooldown_data
        self.backup_device = backup_device
        self.reporters: list[Reporter] = []
        self.signals: list[Signal] = [keys.reference_signal()]

        # Run state: all of it goes through state_dict().
        self.history: list[Record] = []
        self.clock = TokenClock(self.tokens_fn, self.token_offset)
        self.probe_failures = 0
        self.output_failures = 0  # writes of the monitor's files that failed (warned)
        self.init_stds: dict[str, float] | None = None
        self.init_std_source: str | None = None
        self.policy = policy if policy is not None else InflectionPolicy()
        self.stop_reason: str | None = None
        self.stop_requested = False  # this run's policy said stop (not carried by checkpoints)
        self._kept_cooled = False  # said once that best-cooled.ckpt is the cooled branch

        # Per-run working state, rebuilt in start().
        self.host: Host | None = None
        self.collectives = Collectives()
        self.batches: list[Any] = []
        self.weights: list[int] = []
        self.reference_tokens = 0
        self.reference_fingerprint: str | None = None
        self.backup: ModelBackup | None = None
        self.cooldown: CooldownBranch | None = None
        self.last_step = 0
        self.progress = SnapshotProgress()
        self._state_before_snapshot: dict[str, Any] | None = None
        self._cadence_before: dict[str, Any] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def tokens(self) -> int:
        """``T``: tokens seen by the whole run (all ranks, all accumulation steps)."""
        return self.clock.tokens

    @property
    def counted_tokens(self) -> int:
        """Tokens of every optimizer step up to the last exact count (all ranks)."""
        return self.clock.counter.counted

    @property
    def dirpath(self) -> str:
        if self._dirpath is None:
            raise RuntimeError("`dirpath` is known once the monitor is attached to a training run.")
        return self._dirpath

    def set_default_dirpath(self, dirpath: str | os.PathLike[str]) -> None:
        """Where history files go unless the user chose (every rank must pass the same)."""
        if self._dirpath is None:
            self._dirpath = os.fspath(dirpath)

    def set_dirpath(self, dirpath: str | os.PathLike[str]) -> None:
        """Where this run's files go, as the front end decided (every rank the same)."""
        self._dirpath = os.fspath(dirpath)

    def use_reporters(self, defaults: Sequence[Reporter]) -> None:
        """The user's reporters if they named any, else the front end's ``defaults``."""
        users = self.user_reporters
        self.reporters = list(users) if users is not None else list(defaults)

    @property
    def best_path(self) -> str | None:
        """The kept snapshot at the bottom of the best signal's curve."""
        return self.policy.best["path"] if self.policy.best else None

    @property
    def best_tokens(self) -> float | None:
        return self.policy.best["tokens"] if self.policy.best else None

    def config(self) -> dict[str, Any]:
        """The monitor's settings, as written to ``monitor.json`` and the run's config."""
        return {
            "cadence": self.cadence.describe(),
            "probes": {p.name: p.config() for p in self.probes},
            "reference_batches": len(self.batches) * max(self.collectives.world_size, 1)
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

    # ------------------------------------------------------------------ life
    def start(
        self,
        host: Host,
        *,
        step: int = 0,
        resumed_from: str | None = None,
        quiet: bool = False,
        choose_directory: bool = True,
    ) -> None:
        """Take the reference shard, back up the model, check every input; before training.

        Args:
            host: the framework, as the front end sees it.
            step: the optimizer step training starts from.
            resumed_from: the checkpoint the run resumed from (None: a fresh run).
            quiet: skip the reporters' set-up (a front end calls it later itself).
            choose_directory: never write into a directory holding another run's history
                (take the next free ``<dirpath>_<n>``); False where the front end chose
                already (the Lightning callback decides on rank zero and broadcasts).

        Raises:
            ValueError: when the reference data, the loss or a probe does not work with the model.
        """
        self.host, self.collectives = host, host.collectives
        if choose_directory and self._dirpath is not None:
            # After the checkpoint's state is back: a resumed run keeps its directory.
            self._dirpath = choose_dirpath(self._dirpath, self.history, resumed_from is not None)
        self.clock.bind(host.collectives)
        module = host.module
        shard = ReferenceShard(
            self.reference_data,
            self.reference_batches,
            self.tokens_fn,
            self.collectives,
            module,
            host.device,
        )
        self.batches, self.weights = shard.batches, shard.weights
        self.reference_tokens, self.reference_fingerprint = shard.tokens, shard.fingerprint
        self.backup = ModelBackup(module, device=self.backup_device)
        if self.init_stds is None:  # else restored from a checkpoint: the same noise scale
            self.init_stds, self.init_std_source = resolve_init_std(
                module,
                self.init_std,
                resumed_from is None and step == 0,
                self.collectives,
                resumed_from,
            )
        # Every batch once (a bad token id in batch 5 is named now, not at every snapshot).
        check_losses(
            module,
            self.backup,
            self.batches,
            self.loss_fn,
            "reference_data",
            self.collectives.rank,
            self.collectives.world_size,
        )
        ctx = self.context()
        if self.cooldown_steps:
            self.cooldown = make_cooldown(
                module,
                host.optimizers(),
                self.collectives,
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
        self.last_step = step
        if not quiet:
            self.setup_reporters()

    def setup_reporters(self) -> None:
        """The reporters' set-up, on rank zero, and the monitor's opening line."""
        assert self.host is not None
        if self.collectives.is_global_zero:
            view, handle = self.view(), self.host.handle
            self.output_failures = call_reporters(
                self.reporters, "setup", lambda r: r.setup(handle, view), self.output_failures
            )
        info(
            self.collectives,
            f"OvertrainingMonitor: {len(self.probes)} probe(s),"
            f" snapshots {self.cadence.describe()},"
            f" reference set of {self.reference_tokens:,} tokens, init std from"
            f" {self.init_std_source}; history in {self.dirpath}",
        )

    def _device(self) -> Any:
        return self.host.device if self.host is not None else "cpu"

    def end(self) -> None:
        """Training ended: the exact count, and the reporters' closing (every rank calls it)."""
        self.clock.sync(self._device())
        if self.collectives.is_global_zero and self.host is not None:
            view, handle = self.view(), self.host.handle
            self.output_failures = call_reporters(
                self.reporters, "teardown", lambda r: r.teardown(handle, view), self.output_failures
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The run state; during a snapshot, the state as it was before the snapshot began.

        A checkpoint written while a probe holds the model (a SLURM requeue handler,
        a user's hook) then pairs the live weights with the state that goes with them.
        Every rank must call it (the count is summed over ranks).
        """
        if self._state_before_snapshot is not None:
            return self._state_before_snapshot
        self.clock.sync(self._device())
        return self.current_state()

    def current_state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "history": [dict(r) for r in self.history],
            **self.clock.state_dict(self._device()),
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
        self.clock.load_state_dict(state_dict)
        self.probe_failures = int(state_dict.get("probe_failures", 0))
        self.output_failures = int(state_dict.get("output_failures", 0))
        self.cadence.load_state_dict(state_dict.get("cadence", {}))
        stds = state_dict.get("init_stds")
        self.init_stds = dict(stds) if stds is not None else None
        self.init_std_source = state_dict.get("init_std_source", self.init_std_source)
        self.policy.load_state_dict(state_dict.get("policy", {}))
        self.stop_reason = state_dict.get("stop_reason")
