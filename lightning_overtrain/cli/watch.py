"""``lightning-overtrain watch DIR``: probe a live run's checkpoints from another process.

The same engine, options and files as ``probe`` (each checkpoint measured by
:func:`~lightning_overtrain.cli.probe.probe_checkpoint`, the history re-judged by
the policy in token order), run in a loop over a directory the training job is
still writing. What it remembers across its own restarts lives in ``--out``:
the history (a checkpoint whose tokens are in it is never probed again) and
``watch.json`` (the decisions already acted on, the W&B run id). What it tells
the run goes through ``DIR/overtrain_stop.json``; what the run tells it, through
``DIR/overtrain_run.json`` (see :mod:`lightning_overtrain.callbacks.remote`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from typing import Any

from lightning_overtrain import keys
from lightning_overtrain.callbacks.remote import (
    RUN_FILE,
    STOP_FILE,
    read_json,
    write_json_atomic,
)
from lightning_overtrain.cli.exit_codes import EXIT_FAILURES, EXIT_INTERRUPTED, EXIT_OK
from lightning_overtrain.cli.follow import Follower, Signature
from lightning_overtrain.cli.loading import SeriesInitStd, import_object, load_model, order_series
from lightning_overtrain.cli.probe import probe_checkpoint
from lightning_overtrain.cli.report import render_report
from lightning_overtrain.cli.resume import resume_history, write_settings
from lightning_overtrain.cli.series import (
    TRANSFORMERS,
    Checkpoint,
    CheckpointError,
    SeriesError,
    find_checkpoints,
    read_metadata,
)
from lightning_overtrain.cli.setup import (
    build_setup,
    device_of,
    module_class_from,
    set_threads,
    tokens_rule,
)
from lightning_overtrain.cli.watch_wandb import WandbLog
from lightning_overtrain.engine.contract import declared_signals
from lightning_overtrain.history import Record, write_history
from lightning_overtrain.inflection.policy import Decision, InflectionPolicy

STATE_FILE = "watch.json"


def watch_command(args: argparse.Namespace) -> int:
    """``lightning-overtrain watch DIR``: see ``lightning-overtrain watch --help``."""
    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        raise SeriesError(f"DIR {args.dir!r} is not a directory: pass the run's checkpoint dir.")
    if args.idle_timeout is not None and args.idle_timeout < 0:
        raise SeriesError(f"--idle-timeout must be >= 0 seconds, got {args.idle_timeout}.")
    watcher = Watcher(args)
    try:
        return watcher.run()
    except KeyboardInterrupt:
        print("interrupted: every record so far is in --out; run it again to resume")
        return EXIT_INTERRUPTED


def policy_from_args(args: argparse.Namespace) -> InflectionPolicy:
    """The policy of ``--action`` and ``--threshold KEY=LIMIT``.

    Raises:
        SeriesError: on a threshold that is not ``KEY=LIMIT`` with a number.
    """
    thresholds = {}
    for item in args.threshold:
        key, sep, limit = item.rpartition("=")
        try:
            thresholds[key] = float(limit)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise SeriesError(
                f"--threshold {item!r}: write it as KEY=LIMIT, e.g. reference_loss=4.5 or"
                " noise/gamma=1/relative_delta=0.05."
            )
    return InflectionPolicy(action=args.action, thresholds=thresholds)


class Watcher:
    """The loop of ``watch``: poll, probe what is complete in token order, judge, report, act."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        policy_from_args(args)  # bad thresholds fail before anything is loaded
        self.rule = tokens_rule(args)
        self.device = device_of(args)
        self.threads = set_threads(args, self.device)
        # Built as `probe` builds it, from what is there now (a saved tokenizer, say); the
        # loader and the init std are set again from the first checkpoints that come.
        present, _ = find_checkpoints([args.dir], confined=True)
        self.setup = build_setup(args, present)
        self.setup.load = self._load
        self.signals = declared_signals(self.setup.probes)
        self.settings = self.setup.settings
        self.settings.update(
            source="lightning-overtrain watch",
            watching=os.path.abspath(args.dir),
            policy=policy_from_args(args).config(),
        )
        self.history = resume_history(args.out, self.settings)  # other settings: refused
        os.makedirs(args.out, exist_ok=True)
        self.state: dict[str, Any] = read_json(os.path.join(args.out, STATE_FILE)) or {}
        self.state.setdefault("decisions", [])
        self.state.setdefault("paths", {})  # tokens -> the path probed at them
        self.wandb = WandbLog(args, self.state, self.settings) if args.wandb_project else None
        self._save_state()
        self.init: SeriesInitStd | None = None
        self.module_class: Any = None
        self.auto_class: Any = None
        self.checked = False  # the loss and the probes are checked on the first checkpoint
        self.handled: dict[str, Signature] = {}  # path -> the files' state when last tried
        # Kept across restarts and tried again (a fault may have been a half-written file);
        # a file that is gone since is left to the user's earlier report.
        failures = self.state.get("failures", {})
        self.failures = {p: r for p, r in failures.items() if os.path.exists(p)}
        self.state["failures"] = self.failures
        self.backwards: list[str] = []
        self.deleted: list[str] = []
        self.reported: set[str] = set()  # skipped entries already said
        self.incomplete: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        args, follower = self.args, Follower(self.args.dir)
        done = self._done_tokens()
        if self.threads:
            print(self.threads, flush=True)
        waiting = not os.path.isdir(args.dir)
        if waiting:
            print(f"waiting for {args.dir} to be created (by the run)", flush=True)
        print(
            f"watching {args.dir} every {args.poll:g} s on {self.device}: {len(done)} checkpoint(s)"
            f" already probed, reference set of {sum(self.setup.weights):,} tokens",
            flush=True,
        )
        last_activity = time.monotonic()
        while True:
            poll = follower.poll()
            if waiting and os.path.isdir(args.dir):
                waiting = False
                print(f"{args.dir} exists now: following it", flush=True)
            for path, reason in poll.skipped:
                if path not in self.reported:
                    self.reported.add(path)
                    print(f"skipping {path}: {reason}", file=sys.stderr, flush=True)
            self.incomplete = poll.incomplete
            for path in poll.vanished:
                if path not in self.handled:
                    self.deleted.append(path)
                    print(
                        f"{path} was deleted before it could be probed (ModelCheckpoint's"
                        " save_top_k?): it is missing from the curves",
                        flush=True,
                    )
                self.handled.pop(path, None)
            todo = [(c, s) for c, s in poll.ready if self.handled.get(os.path.abspath(c.path)) != s]
            if todo:
                self._process(todo)
            if poll.changed or todo:
                last_activity = time.monotonic()
            settled = not poll.changed and not todo
            status = (read_json(os.path.join(args.dir, RUN_FILE)) or {}).get("status")
            if settled and status in ("finished", "failed"):
                print(f"the run has {status}; every checkpoint written is handled", flush=True)
                break
            if args.idle_timeout is not None and time.monotonic() - last_activity >= max(
                args.idle_timeout, args.poll
            ):
                print(f"no new checkpoint for {args.idle_timeout:g} s: stopping", flush=True)
                break
            time.sleep(args.poll)
        return self._finish()

    def _done_tokens(self) -> set[int]:
        return {int(r[keys.TOKENS]) for r in self.history}

    def _process(self, ready: list[tuple[Checkpoint, Signature]]) -> None:
        """Probe the complete, not yet probed checkpoints of one poll, in token order."""
        readable = []
        for ckpt, sig in ready:
            path = os.path.abspath(ckpt.path)
            self.handled[path] = sig
            try:
                read_metadata(ckpt, self.args.unsafe_load)
                readable.append(ckpt)
            except CheckpointError as exc:
                self._failed(ckpt.path, str(exc))
        ordered, unknown, duplicates = order_series(readable, self.rule)
        for path, reason in unknown:
            self._failed(path, reason)
        for dropped, kept in duplicates:
            print(f"skipping {dropped.path}: same tokens ({dropped.tokens:,}) as {kept.path}")
        if self.init is None and ordered:
            self.init = self.setup.init = SeriesInitStd(self.args.init_std, ordered, self._load)
        for ckpt in ordered:
            self._probe(ckpt)

    def _probe(self, ckpt: Checkpoint) -> None:
        assert ckpt.tokens is not None
        done = self._done_tokens()
        if ckpt.tokens == 0:
            return  # no place on a log axis: a step-0 checkpoint only gives the init std
        if ckpt.tokens in done:
            known = self.state["paths"].get(str(ckpt.tokens))
            if known != os.path.abspath(ckpt.path):
                print(f"skipping {ckpt.path}: its {ckpt.tokens:,} tokens are already probed")
            return
        if done and ckpt.tokens < max(done):
            message = (
                f"{ckpt.path}: {ckpt.tokens:,} tokens, fewer than the {max(done):,} already"
                " probed: the token count went backwards (a run resumed from an earlier"
                " checkpoint, or a tokens rule that does not fit?). Probed and placed in"
                " token order; check the curves"
            )
            print(f"warning: {message}", file=sys.stderr, flush=True)
            self.backwards.append(message)
        try:
            record = probe_checkpoint(self.setup, ckpt, _NoBar(), check=not self.checked)
        except CheckpointError as exc:
            if not os.path.exists(ckpt.path):  # a retention policy removed it meanwhile
                self.deleted.append(ckpt.path)
                print(f"{ckpt.path} was deleted while it was being read: skipped", flush=True)
                return
            self._failed(ckpt.path, str(exc))
            return
        except SeriesError:
            raise  # the set-up itself is wrong (exit 2): the user must act
        except Exception as exc:  # a fault once the set-up is known good: reported, not fatal
            if not self.checked:
                raise
            self._failed(ckpt.path, f"{type(exc).__name__}: {exc}")
            return
        if not self.checked:
            print(f"init std from {self.setup.init.source}", flush=True)
            self.settings["init_std_source"] = self.setup.init.source
            write_settings(self.args.out, self.settings)
            self.checked = True
        self.failures.pop(os.path.abspath(ckpt.path), None)
        record[keys.PROBE_FAILURES] = len(self.failures)  # checkpoints that fail to probe, now
        self.history = sorted([*self.history, record], key=lambda r: r[keys.TOKENS])
        self.history, decisions = self._judge(self.history)
        write_history(self.history, self.args.out)
        judged = next(r for r in self.history if r[keys.TOKENS] == ckpt.tokens)
        loss = judged.get(keys.REFERENCE_LOSS, float("nan"))
        print(
            f"probed {ckpt.path}: {ckpt.tokens:,} tokens (step {ckpt.step}), reference_loss"
            f" {loss:.4f}, {record[keys.PROBE_SECONDS]:.1f} s; {len(self.history)} in the history",
            flush=True,
        )
        for decision in decisions:  # before the state names the checkpoint: the run waits on it
            self._act(decision)
        self.state["paths"][str(ckpt.tokens)] = os.path.abspath(ckpt.path)
        self._save_state()
        if self.wandb is not None:
            self.wandb.log(judged)

    def _load(self, ckpt: Checkpoint) -> Any:
        """``setup.load``, resolving each class when the first checkpoint needing it comes."""
        if self.module_class is None and ckpt.kind != TRANSFORMERS:
            self.module_class = module_class_from(self.args, [ckpt])
        if self.auto_class is None and ckpt.kind == TRANSFORMERS:
            self.auto_class = import_object(self.args.auto_class, "--auto-class")
        return load_model(
            ckpt,
            self.module_class,
            self.auto_class,
            self.device,
            self.args.unsafe_load,
            self.args.dcp_key,
        )

    def _failed(self, path: str, reason: str) -> None:
        self.failures[os.path.abspath(path)] = reason
        self._save_state()
        print(
            f"cannot probe {path}: {reason} (tried again if its files change)",
            file=sys.stderr,
            flush=True,
        )

    # ------------------------------------------------------------------ judge and act
    def _judge(self, history: list[Record]) -> tuple[list[Record], list[Decision]]:
        """The history judged by a fresh policy (as ``report`` does), and decisions new here."""
        policy = policy_from_args(self.args)
        policy.declare(self.signals)
        fired: list[Decision] = []
        with contextlib.redirect_stdout(io.StringIO()):  # the full report is printed at the end
            judged = render_report(history, self.args.out, policy, self.signals, fired)
        new = []
        for decision in fired:
            key = f"{decision.trigger}:{decision.signal}"
            if key not in self.state["decisions"]:
                self.state["decisions"].append(key)
                new.append(decision)
        return judged, new

    def _act(self, decision: Decision) -> None:
        line = {"tokens": decision.tokens, "level": decision.action, "signal": decision.signal}
        line.update(trigger=decision.trigger, text=decision.message, time=time.time())
        with open(os.path.join(self.args.out, "alerts.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"{decision.action.upper()}: {decision.message}", file=sys.stderr, flush=True)
        if self.wandb is not None:
            self.wandb.alert(decision)
        if decision.action != "stop":
            return
        write_json_atomic(
            os.path.join(self.args.dir, STOP_FILE), {"reason": decision.message, **line}
        )
        if not os.path.isfile(os.path.join(self.args.dir, RUN_FILE)):
            print(
                f"the run has no WatcherStop callback writing {RUN_FILE} in {self.args.dir}, so"
                " this decision only warns. Add WatcherStop(dirpath=<its checkpoint directory>)"
                " to the Trainer's callbacks to let the watcher stop it.",
                file=sys.stderr,
                flush=True,
            )

    # ------------------------------------------------------------------ end
    def _save_state(self) -> None:
        write_json_atomic(os.path.join(self.args.out, STATE_FILE), self.state)

    def _finish(self) -> int:
        if self.history:
            policy = policy_from_args(self.args)
            policy.declare(self.signals)
            render_report(self.history, self.args.out, policy, self.signals)
            best = policy.best
            path = best and self.state["paths"].get(str(int(best["tokens"])))
            if best and path:
                print(f"the checkpoint at the bottom of {best['signal']} (to fine-tune): {path}")
        if self.wandb is not None:
            self.wandb.finish()
        problems = [f"  {p}: {r}" for p, r in self.failures.items()] + self.backwards
        problems += [f"  {p}: {r} when the watcher stopped" for p, r in self.incomplete]
        if self.deleted:
            print(f"{len(self.deleted)} checkpoint(s) deleted before they could be probed")
        if problems:
            print(f"\n{len(problems)} problem(s) to look at:", file=sys.stderr)
            print("\n".join(problems), file=sys.stderr)
            return EXIT_FAILURES
        return EXIT_OK


class _NoBar:
    """The progress bar ``probe_checkpoint`` announces to: ``watch`` prints a line instead."""

    def set_postfix_str(self, text: str) -> None:
        pass
