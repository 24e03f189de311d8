"""One snapshot, start to end: measure, judge, keep the best, report, act on the decisions.

The half of :class:`~lightning_overtrain.core.monitor_core.MonitorCore` that runs
when a snapshot is due; the other half is the run's life (start, token clock,
cadence, state). Split in two files to keep each one readable top to bottom.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Any

from lightning_overtrain import keys
from lightning_overtrain.callbacks.cadence import Cadence
from lightning_overtrain.core.acting import act
from lightning_overtrain.core.host import Host
from lightning_overtrain.core.keeping import (
    BEST_COOLED_FILE,
    BEST_FILE,
    best_not_written,
    save_weights,
)
from lightning_overtrain.core.log import info, warn
from lightning_overtrain.core.token_clock import TokenClock
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.collectives import Collectives
from lightning_overtrain.engine.contract import Probe, ProbeContext
from lightning_overtrain.engine.divergence import TrainingDiverged, diverged_message
from lightning_overtrain.engine.losses import LossFn
from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.history import Record
from lightning_overtrain.inflection.policy import Decision, InflectionPolicy
from lightning_overtrain.probes.cooldown import CooldownBranch
from lightning_overtrain.reporting.base import Reporter
from lightning_overtrain.reporting.guard import OUTPUT_FAILURES, call_reporters
from lightning_overtrain.reporting.progress import SnapshotProgress, counted

_JUDGING = "judging the snapshot (detector and policy)"


class SnapshotSteps:
    """Taking a snapshot, for :class:`~lightning_overtrain.core.monitor_core.MonitorCore`."""

    # What the run's half holds (set in MonitorCore.__init__ and start()); it also
    # gives tokens, dirpath, config(), view(), current_state() and _device().
    host: Host | None
    collectives: Collectives
    clock: TokenClock
    probes: list[Probe]
    cadence: Cadence
    policy: InflectionPolicy
    history: list[Record]
    reporters: list[Reporter]
    progress: SnapshotProgress
    backup: ModelBackup | None
    cooldown: CooldownBranch | None
    init_stds: dict[str, float] | None
    batches: list[Any]
    weights: list[int]
    loss_fn: LossFn
    on_probe_error: str
    probe_failures: int
    output_failures: int
    stop_reason: str | None
    stop_requested: bool
    state_key: str
    _kept_cooled: bool
    _state_before_snapshot: dict[str, Any] | None
    _cadence_before: dict[str, Any] | None

    def snapshot(self, step: int) -> Record:
        """Probe the live model now, append the record to :attr:`history` and report it.

        Every rank calls it at the same step. Sets :attr:`stop_requested` when the
        ranks agree to stop.
        """
        assert self.host is not None, "start() comes before the first snapshot"
        began = time.perf_counter()
        self.clock.sync(self._device())
        record: Record = {keys.TOKENS: self.tokens, keys.STEP: step}

        diverged: list[Decision] = []

        def failed(what: str, exc: Exception) -> None:
            if isinstance(exc, TrainingDiverged):  # not a probe's fault: say what happened
                message = diverged_message(exc.loss, self.tokens, step)
                action = self.policy.action_for(keys.REFERENCE_LOSS)
                diverged.append(
                    Decision(keys.REFERENCE_LOSS, "diverged", action, self.tokens, message)
                )
                return
            self._probe_failed(what, exc, record)

        before = self.current_state()
        if self._cadence_before is not None:
            # A checkpoint written during this snapshot resumes to take it again, under a
            # step cadence too (the resumed run's first step is not a multiple of n).
            before["cadence"] = {**self._cadence_before, "retake": True}
            self._cadence_before = None
        self._state_before_snapshot = before
        try:
            ctx = self.context()
            progress = self.progress.track(self.host.handle, f"Probing at {self.tokens:,} tokens")
            with progress as tick:
                ctx.loss_fn = counted(ctx.loss_fn, tick)
                cooldown = None
                if self.cooldown is not None:
                    cooldown = partial(
                        self.cooldown.branch,
                        optimizer=self.host.optimizers()[0],
                        gradient_clip_val=self.host.gradient_clip_val,
                        gradient_clip_algorithm=self.host.gradient_clip_algorithm,
                    )
                record.update(measure_snapshot(ctx, self.probes, failed, cooldown))
            record[keys.PROBE_FAILURES] = self.probe_failures
            try:
                decisions = self._judge(record)
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
        record[keys.PROBE_SECONDS] = time.perf_counter() - began
        record[OUTPUT_FAILURES] = self.output_failures
        self.history.append(record)
        if self.collectives.is_global_zero:
            view, handle = self.view(), self.host.handle
            self.output_failures = call_reporters(
                self.reporters, "report", lambda r: r.report(handle, view, record),
                self.output_failures,
            )  # fmt: skip
        self._act([*diverged, *decisions])
        return record

    def _judge(self, record: Record) -> list[Decision]:
        """Let the policy judge the record; add its fields; keep the best snapshot."""
        cooled = keys.COOLDOWN_TRAIN_LOSS in record
        path = os.path.join(self.dirpath, BEST_COOLED_FILE if cooled else BEST_FILE)
        judgement = self.policy.judge(record, best_path=path)
        record.update(judgement.additions)
        if judgement.best_moved:
            self._save_best(path, cooled, record)
        return judgement.decisions

    def _save_best(self, path: str, cooled: bool, record: Record) -> None:
        """Keep the weights ``record`` measured at ``path``, with the monitor's state as judged."""
        assert self.host is not None and self.backup is not None
        if cooled and not self._kept_cooled:
            self._kept_cooled = True
            info(
                self.collectives,
                f"OvertrainingMonitor: keeping the best snapshot's cooled weights (the"
                f" cooldown branch the probes measured), not the live run's, as {path}.",
            )
        state = {**self.current_state(), "config": self.config()}
        state["history"] = [*state["history"], dict(record)]
        if self.host.save_best is not None:
            error = self.host.save_best(path, self.backup, cooled, self.state_key, state)
        else:
            error = save_weights(
                self.host.module, self.collectives, path, self.backup, cooled, self.state_key, state
            )
        if error is not None:  # only the file is missing: the judgement stands
            self.output_failures = best_not_written(
                self.policy.best, path, error, self.output_failures
            )

    def _act(self, decisions: list[Decision]) -> None:
        def alert(title: str, text: str, level: str) -> None:
            assert self.host is not None
            view, handle = self.view(), self.host.handle
            self.output_failures = call_reporters(
                self.reporters, "alert", lambda r: r.alert(handle, view, title, text, level),
                self.output_failures,
            )  # fmt: skip

        reason = act(self.collectives, decisions, alert)
        if reason is not None:
            self.stop_reason, self.stop_requested = reason, True

    def _probe_failed(self, what: str, exc: Exception, record: Record) -> None:
        if self.on_probe_error == "raise":
            raise exc
        self.probe_failures += 1
        subject = what if what == _JUDGING else f"the {what} probe"
        warn(
            self.collectives,
            f"OvertrainingMonitor: {subject} failed at {record[keys.TOKENS]:,} tokens"
            f" (step {record[keys.STEP]}) and was skipped ({type(exc).__name__}: {exc})."
            f" Failures so far: {self.probe_failures}. Training goes on; pass"
            " on_probe_error='raise' to stop instead.",
        )

    def context(self) -> ProbeContext:
        """The probes' context: the borrowed model, the shard, the ranks' channel."""
        assert self.host is not None and self.backup is not None and self.init_stds is not None
        optimizers = self.host.optimizers()
        return ProbeContext(
            module=self.host.module,
            backup=self.backup,
            sigmas=[self.init_stds.get(n, 0.0) for n in self.backup.names],
            batches=self.batches,
            weights=self.weights,
            loss_fn=self.loss_fn,
            reduce_sum=self.collectives.reduce_sum,
            forward_context=self.host.forward_context,
            world_size=self.collectives.world_size,
            rank=self.collectives.rank,
            extras={
                **self.host.extras,
                # The training optimizer, read only (the sharpness probe's update direction).
                **({"optimizer": optimizers[0]} if optimizers else {}),
            },
        )
