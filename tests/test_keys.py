"""One key grammar: probes declare their signals, and everything downstream follows them."""

import dataclasses
import json
import math
import sys
import types

import pytest
import torch
from conftest import make_module, make_trainer, reference_batches, train_loader
from test_wandb_reporter import FakeRun, FakeTable, trainer

from lightning_overtrain import keys
from lightning_overtrain.callbacks.monitor import OvertrainingMonitor
from lightning_overtrain.cli import report as report_module
from lightning_overtrain.engine.contract import Probe, declared_signals
from lightning_overtrain.inflection.policy import InflectionPolicy
from lightning_overtrain.keys import Signal
from lightning_overtrain.probes.finetune import FineTuneProbe
from lightning_overtrain.reporting.base import Reporter, RunView
from lightning_overtrain.reporting.files import FileReporter
from lightning_overtrain.reporting.wandb import WandbReporter

U_CURVE = [3.0, 2.6, 2.3, 2.1, 2.0, 2.05, 2.2, 2.4, 2.7, 3.0, 3.3, 3.6]  # bottom at index 4
BATCH = [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}]


class MyProbe(Probe):
    """A user's probe with one U-shaped signal of its own naming."""

    name = "mine"

    def __init__(self) -> None:
        self.step = 0

    def signals(self):
        return [Signal("mine/loss", u_shaped=True, label="my loss")]

    def run(self, ctx):
        self.step += 1
        return {"mine/loss": U_CURVE[self.step - 1], "mine/loss_stderr": 0.01}


def probes():
    finetune = dict(steps=1, lrs=(1e-4, 1e-3))
    return [
        FineTuneProbe(BATCH, BATCH, **finetune),
        FineTuneProbe(BATCH, BATCH, name="code_ft", **finetune),
        MyProbe(),
    ]


def u_history():
    """Records with every declared key of :func:`probes` on a U in tokens."""
    history = []
    for i, u in enumerate(U_CURVE):
        record = {"tokens": 1e6 * 2**i, "step": i + 1, "reference_loss": 3.0 - 0.05 * i}
        for probe in ("finetune", "code_ft"):
            for lr in (1e-4, 1e-3):
                for quantity in ("reference_loss_after", "downstream_loss_after"):
                    record[keys.finetune_key(lr, quantity, probe)] = u + lr
                record[keys.finetune_key(lr, "forgetting", probe)] = u - record["reference_loss"]
            for quantity in ("reference_loss_after", "downstream_loss_after"):
                record[keys.finetune_tuned_key(quantity, probe)] = u + 1e-4  # the lr that won
            record[keys.finetune_tuned_key("lr", probe)] = 1e-4
        record["mine/loss"], record["mine/loss_stderr"] = u, 0.01
        history.append(record)
    return history


U_SHAPED = [
    *(
        keys.finetune_key(lr, quantity, probe)
        for probe in ("finetune", "code_ft")
        for quantity in ("reference_loss_after", "downstream_loss_after")
        for lr in (1e-4, 1e-3)
    ),
    *(
        keys.finetune_tuned_key(quantity, probe)
        for probe in ("finetune", "code_ft")
        for quantity in ("reference_loss_after", "downstream_loss_after")
    ),
    "mine/loss",
]


# ----------------------------------------------------------------------------- lr keys
@pytest.mark.parametrize("spelling", [1e-3, 0.001, "1e-3", "0.001", "1E-3"])
def test_an_lr_key_has_one_spelling_whatever_the_user_types(spelling):
    assert keys.lr_key(spelling) == "lr=0.001"
    assert keys.finetune_key(spelling, "forgetting") == "finetune/lr=0.001/forgetting"
    assert keys.finetune_key(spelling, "forgetting", "code_ft") == "code_ft/lr=0.001/forgetting"


def test_lr_keys_parse_back_to_the_float():
    assert keys.parse_lr_key("lr=1e-05") == 1e-5
    assert keys.parse_lr_key("lr=1e-3") == 1e-3
    assert keys.parse_lr_key("gamma=1") is None
    assert keys.parse_finetune_key(keys.finetune_key(3e-4, "adaptation", "code_ft")) == (
        "code_ft",
        3e-4,
        "adaptation",
    )
    assert keys.parse_finetune_key("finetune/downstream_loss_before") is None


def test_a_bad_lr_spelling_is_named():
    with pytest.raises(ValueError, match="expected a number, got 'fast'"):
        keys.lr_key("fast")


def test_the_fine_tune_probe_writes_the_keys_it_declares():
    (probe,) = [p for p in probes() if p.name == "code_ft"]
    declared = {s.key for s in probe.signals()}
    assert keys.finetune_key(1e-3, "reference_loss_after", "code_ft") in declared
    assert {s.key for s in probe.signals() if s.u_shaped} == {
        k for k in U_SHAPED if k.startswith("code_ft/")
    }


def test_two_lrs_with_one_key_are_refused():
    with pytest.raises(ValueError, match="`lrs` must give distinct keys"):
        FineTuneProbe(BATCH, BATCH, lrs=(1e-3, 0.0010000001))


def test_signals_round_trip_through_json():
    signals = declared_signals(probes())
    back = [Signal.from_dict(d) for d in json.loads(json.dumps([s.to_dict() for s in signals]))]
    assert back == signals


def test_a_bad_declaration_is_named():
    with pytest.raises(ValueError, match="`base` and `sensitivity` go together"):
        Signal("mine/loss", base="reference_loss")

    class Wrong(Probe):
        name = "wrong"

        def signals(self):
            return ["wrong/loss"]

    with pytest.raises(ValueError, match=r"`Wrong.signals\(\)` must return Signal objects"):
        declared_signals([Wrong()])


# ----------------------------------------------------------------------------- declarations
def test_every_declared_u_shaped_signal_is_watched_by_the_default_policy():
    policy = InflectionPolicy()
    policy.declare(declared_signals(probes()))
    verdicts = [policy.judge(record).verdicts for record in u_history()]
    assert sorted(policy.detectors) == sorted(U_SHAPED)
    assert all(verdicts[-1][k].crossed for k in U_SHAPED)
    assert "code_ft/lr=0.001/forgetting" not in policy.detectors  # not U-shaped


def test_the_figures_draw_every_declared_signal():
    pytest.importorskip("matplotlib")
    from lightning_overtrain.reporting.figures import render_figures

    figures = render_figures(u_history(), declared_signals(probes()))
    assert {"noise", "finetune", "code_ft", "mine"} <= set(figures)
    code_ft = figures["code_ft"]
    assert code_ft._suptitle.get_text() == "Fine-tuning probe: code_ft"
    assert [ax.get_title() for ax in code_ft.axes] == [
        "forgetting (pretraining loss rise)",
        "pretraining loss after fine-tuning",
        "downstream loss after fine-tuning",
        "the lr tuned for the downstream loss",
    ]
    assert [line.get_label() for line in code_ft.axes[0].lines] == ["lr=0.0001", "lr=0.001"]
    assert "tuned lr" in [line.get_label() for line in code_ft.axes[2].lines]
    (mine,) = figures["mine"].axes
    assert [line.get_label() for line in mine.lines] == ["my loss"]


def test_the_figures_infer_any_fine_tune_probe_from_its_keys():
    pytest.importorskip("matplotlib")
    from lightning_overtrain.reporting.figures import render_figures

    assert {"finetune", "code_ft"} <= set(render_figures(u_history()))


def test_the_summary_table_shows_every_declared_summary_signal():
    table = report_module.summary_table(u_history(), declared_signals(probes()))
    header = table.splitlines()[0]
    for key in ("reference_loss", "code_ft/lr=0.001/forgetting", "finetune/lr=0.001/forgetting"):
        assert f" {key} " in header
    assert " mine/loss " in header
    assert "reference_loss_after" not in header  # declared, but not a summary column
    assert "| 3.6000 ± 0.0100 |" in table.splitlines()[-1]  # mine/loss and its stderr


def test_wandb_defines_every_declared_signal_on_the_tokens_axis_at_set_up(monkeypatch):
    fake = types.ModuleType("wandb")
    fake.Table, fake.run = FakeTable, FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    view = RunView(dirpath="unused", signals=tuple(declared_signals(probes())))
    reporter = WandbReporter(run=fake.run, images=False)
    reporter.setup(trainer(), view)
    defined = dict(fake.run.named("define_metric"))
    for key in [*U_SHAPED, "code_ft/lr=0.001/forgetting", "mine/loss_stderr"]:
        assert defined[f"overtrain/{key}"] == {"step_metric": "overtrain/tokens", "step_sync": True}
    assert not fake.run.named("log")  # defined before anything is logged


def test_auto_best_signal_picks_any_declared_u_shaped_signal():
    # Two fine-tune probes: the first declared wins a tie at the largest lr.
    policy = InflectionPolicy()
    policy.declare(declared_signals(probes()))
    policy.judge(u_history()[0])
    assert policy.best["signal"] == "finetune/lr=0.001/reference_loss_after"
    # A fine-tune probe under another name is eligible like the default one.
    policy = InflectionPolicy()
    policy.declare(declared_signals(probes()[1:]))
    policy.judge(u_history()[0])
    assert policy.best["signal"] == "code_ft/lr=0.001/reference_loss_after"
    # A user's probe alone: its own U-shaped signal.
    policy = InflectionPolicy()
    policy.declare(declared_signals([MyProbe()]))
    for record in u_history():
        policy.judge({k: record[k] for k in ("tokens", "step", "mine/loss", "mine/loss_stderr")})
    assert (policy.best["signal"], policy.best["value"], policy.best["step"]) == (
        "mine/loss",
        2.0,
        5,
    )


class Views(Reporter):
    """Keeps what the monitor hands its reporters."""

    def __init__(self) -> None:
        self.views = []

    def setup(self, trainer, view):
        self.views.append(view)

    def report(self, trainer, view, record):
        self.views.append(view)


def test_a_user_probe_is_watched_kept_and_reported_by_a_live_run(tmp_path, code_text):
    views = Views()
    monitor = OvertrainingMonitor(
        reference_batches(code_text, n=1),
        every_n_steps=1,
        probes=[MyProbe()],
        dirpath=tmp_path / "mon",
        reporters=[FileReporter(), views],
    )
    trainer = make_trainer(tmp_path, [monitor], max_steps=len(U_CURVE))
    with pytest.warns(UserWarning, match="mine/loss has turned upward"):
        trainer.fit(make_module(), train_loader(code_text))
    assert monitor.history[-1]["inflection/mine/loss/crossed"] == 1.0
    assert (
        monitor.policy.best["signal"] == "mine/loss"
        and monitor.best_tokens == (monitor.history[4]["tokens"])
    )
    assert (tmp_path / "mon" / "best.ckpt").is_file()
    saved = json.loads((tmp_path / "mon" / "monitor.json").read_text())
    assert {"key": "mine/loss", "u_shaped": True}.items() <= saved["signals"][-1].items()
    settings = report_module._run_settings(str(tmp_path / "mon"))
    assert report_module._run_signals(settings) == monitor.signals
    assert " mine/loss " in report_module.summary_table(monitor.history, monitor.signals)
    # Reporters get a read-only view of the run, never the monitor.
    assert all(type(v) is RunView for v in views.views) and len(views.views) == 1 + len(U_CURVE)
    last = views.views[-1]
    assert last.history[-1] is monitor.history[-1] and last.tokens == monitor.tokens
    assert last.best_path == monitor.best_path and last.signals == tuple(monitor.signals)
    with pytest.raises(dataclasses.FrozenInstanceError):
        last.tokens = 0


def test_an_old_policy_config_still_loads():
    old = {
        "signals": ["noise/gamma=*/perturbed_loss"],
        "action": "warn",
        "actions": {},
        "patience": 3,
        "min_rise": 0.0,
        "noise_sigmas": 2.0,
        "forecast_margin": None,
        "thresholds": {},
        "best_signal": "auto",
    }
    policy = InflectionPolicy.from_config(old)
    assert (policy.detector_config.patience, policy.detector_config.noise_sigmas) == (3, 2.0)
    again = InflectionPolicy(**policy.config())
    assert again.detector_config == policy.detector_config and again.signals == policy.signals
    with pytest.raises(TypeError, match="patience"):  # detector settings: one way only
        InflectionPolicy(patience=2)
    assert not math.isnan(policy.detector_config.forecast_level)


def test_the_lr_tuned_per_snapshot_is_declared_watched_and_drawn_with_two_lrs_or_more():
    one, two = (FineTuneProbe(BATCH, BATCH, steps=1, lrs=lrs) for lrs in ((1e-3,), (1e-4, 1e-3)))
    tuned = {keys.finetune_tuned_key(q) for q in ("reference_loss_after", "downstream_loss_after")}
    assert not tuned & {s.key for s in one.signals()}  # one lr: its own curve already
    declared = {s.key: s for s in two.signals()}
    assert all(declared[k].u_shaped for k in tuned)
    assert not declared[keys.finetune_tuned_key("lr")].u_shaped
    policy = InflectionPolicy()
    policy.declare(declared_signals([two]))
    for record in u_history():
        policy.judge(record)
    assert tuned <= set(policy.detectors)


def test_the_sharpness_probe_declares_a_rising_curve_the_figures_draw():
    pytest.importorskip("matplotlib")
    from lightning_overtrain.probes.sharpness import SharpnessProbe
    from lightning_overtrain.reporting.figures import render_figures

    probe = SharpnessProbe(direction="gradient")
    declared = {s.key: s for s in probe.signals()}
    assert set(declared) == {"sharpness/critical_sharpness", "sharpness/critical_lr"}
    assert not any(s.u_shaped for s in declared.values())  # not watched for a bottom
    history = [
        {
            "tokens": 1e6 * 2**i,
            "step": i,
            "reference_loss": 3.0 - 0.1 * i,
            "sharpness/critical_sharpness": 10.0 + i,
            "sharpness/critical_lr": 2 / (10.0 + i),
        }
        for i in range(4)
    ]
    figures = render_figures(history, declared_signals([probe]))
    lines = [line for ax in figures["sharpness"].axes for line in ax.get_lines()]
    assert any(list(line.get_ydata()) == [10.0, 11.0, 12.0, 13.0] for line in lines)
