"""The W&B reporter against a mocked ``wandb`` module: the calls it makes, and how it fails."""

import math
import sys
import types
from types import SimpleNamespace

import pytest
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy

import lightning_overtrain.reporting.wandb as module
from lightning_overtrain import OvertrainingMonitor
from lightning_overtrain.reporting.base import RunView
from lightning_overtrain.reporting.console import ConsoleReporter
from lightning_overtrain.reporting.loggers import LoggerReporter
from lightning_overtrain.reporting.png import PlotReporter
from lightning_overtrain.reporting.wandb import WandbReporter

TOKENS = "overtrain/tokens"


class FakeRun:
    """Records every call, in order, as ``(name, args...)``."""

    def __init__(self, fail_on=()):
        self.calls = []
        self.fail_on = set(fail_on)
        self.config = SimpleNamespace(update=lambda d, **kw: self._call("config", d))

    def _call(self, name, *args):
        if name in self.fail_on:
            raise ConnectionError(f"{name} is down")
        self.calls.append((name, *args))

    def define_metric(self, name, **kwargs):
        self._call("define_metric", name, kwargs)

    def log(self, row):
        self._call("log", row)

    def alert(self, **kwargs):
        self._call("alert", kwargs)

    def named(self, name):
        return [c[1:] for c in self.calls if c[0] == name]


class FakeTable:
    def __init__(self, columns, data):
        self.columns, self.data = columns, data


class FakeImage:
    def __init__(self, image):
        self.size = image.size


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = types.ModuleType("wandb")
    fake.Table, fake.Image, fake.run = FakeTable, FakeImage, None
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


@pytest.fixture
def run(monkeypatch, fake_wandb):
    run = FakeRun()
    monkeypatch.setattr(WandbLogger, "experiment", property(lambda self: run))
    return run


def trainer(*loggers, step=12):
    return SimpleNamespace(loggers=list(loggers), global_step=step, is_global_zero=True)


def monitor(history=(), signals=()):
    """A stand-in for the monitor's :class:`RunView`, with the same fields, that a test
    can move on snapshot by snapshot."""
    fields = RunView(
        dirpath="unused",
        history=list(history),
        tokens=history[-1]["tokens"] if history else 0,
        config={"cadence": "every 2 steps", "probes": {"noise": {"pairs": 2}}},
        signals=tuple(signals),
    )
    return SimpleNamespace(**vars(fields))


def record(i, **extra):
    r = {"tokens": 512 * (i + 1), "step": 2 * (i + 1), "reference_loss": 5.0 - 0.1 * i}
    r["noise/gamma=1/delta"] = 0.01 * (i + 1)
    r["noise/gamma=1/perturbed_loss"] = r["reference_loss"] + r["noise/gamma=1/delta"]
    r.update(extra)
    return r


def snapshot(reporter, mon, tr, rec):
    mon.history.append(rec)
    mon.tokens = rec["tokens"]
    reporter.report(tr, mon, rec)


def test_setup_puts_every_prefixed_metric_on_the_tokens_axis_and_settings_in_config(run):
    reporter, mon = WandbReporter(), monitor()
    reporter.setup(trainer(WandbLogger(project="t")), mon)
    assert reporter.run is run
    assert run.named("define_metric")[:2] == [
        (TOKENS, {}),  # the axis itself has no step metric
        ("overtrain/*", {"step_metric": TOKENS, "step_sync": True}),
    ]
    ((config,),) = run.named("config")
    assert config["overtrain"]["cadence"] == "every 2 steps"
    assert config["overtrain"]["wandb"]["alert_interval_s"] == 600.0


def test_each_key_is_defined_by_name_once_before_it_is_logged(run):
    reporter, mon, tr = WandbReporter(images=False), monitor(), trainer(WandbLogger(project="t"))
    reporter.setup(tr, mon)
    snapshot(reporter, mon, tr, record(0))
    snapshot(reporter, mon, tr, record(1, **{"noise/gamma=2/delta": 0.5}))
    defined = [name for name, _ in run.named("define_metric")]
    assert len(defined) == len(set(defined))
    for key in [*record(0), "noise/gamma=2/delta"]:
        if key != "tokens":
            assert (f"overtrain/{key}", {"step_metric": TOKENS, "step_sync": True}) in run.named(
                "define_metric"
            )
    first_log = run.calls.index(next(c for c in run.calls if c[0] == "log"))
    second_log = [i for i, c in enumerate(run.calls) if c[0] == "log"][1]
    late = [
        i
        for i, c in enumerate(run.calls)
        if c[:2] == ("define_metric", "overtrain/noise/gamma=2/delta")
    ]
    assert late and first_log < late[0] < second_log


def test_definitions_come_before_the_lightning_logger_logs_the_numbers(run, tmp_path):
    logger = WandbLogger(project="t")
    reporters = [WandbReporter(images=False, table=False), LoggerReporter()]
    mon, tr = monitor(), trainer(logger)
    for r in reporters:
        r.setup(tr, mon)
    rec = record(0)
    mon.history.append(rec)
    for r in reporters:
        r.report(tr, mon, rec)
    ((row,),) = run.named("log")  # the numbers, logged by WandbLogger.log_metrics
    assert row[TOKENS] == 512 and row["overtrain/noise/gamma=1/delta"] == 0.01
    logged_at = run.calls.index(("log", row))
    defined_at = {c[1]: i for i, c in enumerate(run.calls) if c[0] == "define_metric"}
    assert all(defined_at[k] < logged_at for k in row if k.startswith("overtrain/") and k != TOKENS)


def test_table_has_one_row_per_snapshot_and_every_number(run):
    reporter, mon, tr = WandbReporter(images=False), monitor(), trainer(WandbLogger(project="t"))
    reporter.setup(tr, mon)
    snapshot(reporter, mon, tr, record(0, **{"noise/gamma=1/delta_stderr": math.nan}))
    snapshot(reporter, mon, tr, record(1, **{"finetune/lr=0.001/forgetting": 0.7}))
    rows = run.named("log")
    assert [r[0][TOKENS] for r in rows] == [512, 1024]
    table = rows[1][0]["overtrain/snapshots"]
    assert table.columns == [
        *record(0, **{"noise/gamma=1/delta_stderr": 0}),
        "finetune/lr=0.001/forgetting",
    ]
    assert len(table.data) == 2
    first = dict(zip(table.columns, table.data[0]))
    assert first["noise/gamma=1/delta_stderr"] is None  # NaN: an empty cell
    assert first["finetune/lr=0.001/forgetting"] is None  # not measured then
    assert dict(zip(table.columns, table.data[1]))["finetune/lr=0.001/forgetting"] == 0.7
    assert len(rows[0][0]["overtrain/snapshots"].data) == 1


def test_plots_are_logged_as_images_with_the_tokens(run):
    reporter, mon, tr = WandbReporter(table=False), monitor(), trainer(WandbLogger(project="t"))
    reporter.setup(tr, mon)
    snapshot(reporter, mon, tr, record(0, **{"finetune/lr=0.001/forgetting": 0.7}))
    ((row,),) = run.named("log")
    assert set(row) == {TOKENS, "overtrain/plots/noise", "overtrain/plots/finetune"}
    assert row[TOKENS] == 512
    assert row["overtrain/plots/noise"].size == (920, 360)
    defined = [name for name, _ in run.named("define_metric")]
    assert "overtrain/plots/noise" in defined


def test_alert_levels_title_and_text(run):
    reporter, mon, tr = WandbReporter(), monitor([record(3)]), trainer(WandbLogger(project="t"))
    reporter.setup(tr, mon)
    reporter.alert(
        tr,
        mon,
        "Overtraining: perturbed loss turned up at gamma=1 " * 3,
        "delta 0.31 > 0.2",
        "warn",
    )
    reporter.alert(tr, mon, "Overtraining: stopped", "delta 0.52 > 0.5", "stop")
    warn, stop = (c[0] for c in run.named("alert"))
    assert warn["level"] == "WARN" and stop["level"] == "ERROR"
    assert len(warn["title"]) <= 63 and warn["title"].endswith("…")
    assert stop["title"] == "Overtraining: stopped"
    assert stop["text"].startswith("delta 0.52 > 0.5")
    assert "2,048 tokens, step 12" in stop["text"]
    assert warn["wait_duration"] == 600.0


def test_alerts_are_rate_limited_per_title_and_level(run, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(module, "monotonic", lambda: clock[0])
    reporter, mon, tr = (
        WandbReporter(alert_interval_s=60),
        monitor([record(0)]),
        trainer(WandbLogger(project="t")),
    )
    reporter.setup(tr, mon)
    reporter.alert(tr, mon, "Overtraining", "first", "warn")
    clock[0] += 30
    reporter.alert(tr, mon, "Overtraining", "held back", "warn")
    reporter.alert(tr, mon, "Overtraining", "held back too", "warn")
    reporter.alert(tr, mon, "Overtraining", "a stop is not a repeat of a warning", "stop")
    clock[0] += 31
    reporter.alert(tr, mon, "Overtraining", "later", "warn")
    texts = [c[0]["text"] for c in run.named("alert")]
    assert [t.split("\n")[0] for t in texts] == [
        "first",
        "a stop is not a repeat of a warning",
        "later",
    ]
    assert "2 similar alert(s) held back" in texts[2]


def test_wandb_missing_is_a_warning_and_nothing_else(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    reporter, mon, tr = WandbReporter(), monitor(), trainer()
    with pytest.warns(UserWarning, match="wandb is not installed"):
        reporter.setup(tr, mon)
    snapshot(reporter, mon, tr, record(0))
    reporter.alert(tr, mon, "t", "x", "stop")
    assert reporter.run is None


def test_wandb_failing_to_start_is_a_warning(monkeypatch, fake_wandb):
    def refuse(self):
        raise PermissionError("api key not configured (no-tty)")

    monkeypatch.setattr(WandbLogger, "experiment", property(refuse))
    reporter, mon, tr = WandbReporter(), monitor(), trainer(WandbLogger(project="t"))
    with pytest.warns(UserWarning, match="starting the W&B run failed .*api key"):
        reporter.setup(tr, mon)
    snapshot(reporter, mon, tr, record(0))
    assert reporter.run is None


def test_a_failing_log_warns_once_and_turns_the_reporter_off(monkeypatch, fake_wandb):
    run = FakeRun(fail_on={"log"})
    monkeypatch.setattr(WandbLogger, "experiment", property(lambda self: run))
    reporter, mon, tr = WandbReporter(images=False), monitor(), trainer(WandbLogger(project="t"))
    reporter.setup(tr, mon)
    with pytest.warns(UserWarning, match="logging the snapshot to W&B failed .*log is down"):
        snapshot(reporter, mon, tr, record(0))
    defined = len(run.named("define_metric"))
    snapshot(reporter, mon, tr, record(1))  # off: no more calls, no more warnings
    assert reporter.run is None and len(run.named("define_metric")) == defined


def test_without_a_wandb_logger_it_uses_the_active_run_or_warns(fake_wandb, tmp_path):
    reporter, mon = WandbReporter(), monitor()
    with pytest.warns(UserWarning, match="no W&B run .*Add a `WandbLogger`"):
        reporter.setup(trainer(CSVLogger(tmp_path)), mon)
    fake_wandb.run = FakeRun()
    reporter.setup(trainer(CSVLogger(tmp_path)), mon)
    assert reporter.run is fake_wandb.run


def test_the_monitor_adds_the_wandb_reporter_first_only_with_a_wandb_logger(tmp_path):
    monitor = OvertrainingMonitor(reference_data=[{"input_ids": [[1, 2]]}], every_n_steps=1)
    tr = SimpleNamespace(
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path),
        loggers=[],
        strategy=SingleDeviceStrategy("cpu"),
        precision_plugin=Precision(),
    )
    monitor.setup(tr, None, "fit")
    assert [type(r) for r in monitor.reporters][-2:] == [PlotReporter, ConsoleReporter]
    assert not any(isinstance(r, WandbReporter) for r in monitor.reporters)
    tr.loggers = [CSVLogger(tmp_path), WandbLogger(project="t")]
    monitor.setup(tr, None, "fit")
    assert [type(r).__name__ for r in monitor.reporters] == [
        "WandbReporter",
        "LoggerReporter",
        "FileReporter",
        "PlotReporter",
        "ConsoleReporter",
    ]


@pytest.mark.parametrize(
    "bad, match", [(dict(dpi=0), "`dpi`"), (dict(alert_interval_s=-1), "`alert_interval_s`")]
)
def test_rejects_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        WandbReporter(**bad)
