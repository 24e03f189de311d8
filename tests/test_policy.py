"""Warn or stop at the inflection, keep the best snapshot: the policy alone and in a Trainer."""

import json
import math

import pytest
import torch
from conftest import (
    LossRecorder,
    history_text,
    make_module,
    make_trainer,
    reference_batches,
    train_loader,
)

from lightning_overtrain import InflectionPolicy, OvertrainingMonitor, Probe, Reporter
from lightning_overtrain import keys as metric_keys
from lightning_overtrain.inflection.signals import decomposed_terms
from lightning_overtrain.inflection.verdicts import tokens_text
from lightning_overtrain.keys import key_pattern
from lightning_overtrain.reporting.files import FileReporter
from lightning_overtrain.testing.synthetic import make_curve

SIGNAL = "noise/gamma=1/perturbed_loss"


def records(curve, signal=SIGNAL):
    for t, v, se in zip(curve.tokens, curve.values, curve.stderrs):
        yield {"tokens": float(t), "step": 0, signal: float(v), f"{signal}_stderr": float(se)}


def declared_policy(**kwargs):
    """A policy that knows the built-in signals of these records, as the monitor declares them."""
    policy = InflectionPolicy(**kwargs)
    signals = metric_keys.noise_signals((0.5, 1.0)) + metric_keys.finetune_signals((1e-4, 1e-3))
    policy.declare(signals)
    return policy


def run_policy(policy, recs):
    out = []
    for record in recs:
        judgement = policy.judge(record)
        out.append((judgement.additions, judgement.decisions))
    return out


def test_a_u_shaped_signal_triggers_once_after_its_bottom():
    curve = make_curve("u_shape", n_points=24, seed=1, noise=0.002)
    results = run_policy(declared_policy(), records(curve))
    fired = [(i, d) for i, (_, ds) in enumerate(results) for d in ds]
    assert len(fired) == 1
    index, decision = fired[0]
    assert decision.trigger == "crossed" and decision.action == "warn" and decision.signal == SIGNAL
    assert curve.tokens[index] > curve.true_bottom_tokens
    crossed = [a[f"inflection/{SIGNAL}/crossed"] for a, _ in results]
    assert crossed[index] == 1.0 and crossed[index - 1] == 0.0 and all(crossed[index:])
    assert "turned upward" in decision.message


@pytest.mark.parametrize("seed", range(20))
def test_a_falling_noisy_signal_never_triggers(seed):
    curve = make_curve("monotone", n_points=24, seed=seed, noise=0.02)
    assert not any(ds for _, ds in run_policy(declared_policy(), records(curve)))


def test_default_signals_do_not_match_per_layer_keys():
    pattern = key_pattern("noise/gamma=*/perturbed_loss")
    assert pattern.match("noise/gamma=0.5/perturbed_loss")
    assert not pattern.match("noise/gamma=1/layer=h.0/perturbed_loss")
    assert not pattern.match("noise/gamma=1/perturbed_loss_stderr")


def test_thresholds_fire_once_with_their_own_action():
    policy = InflectionPolicy(
        thresholds={"noise/gamma=*/relative_delta": 0.05},
        actions={"noise/gamma=1/relative_delta": "stop"},
    )
    values = [0.01, 0.06, 0.07]
    fired = [
        d
        for v in values
        for d in policy.judge({"tokens": 1.0 + v, "noise/gamma=1/relative_delta": v}).decisions
    ]
    assert [(d.trigger, d.action, d.signal) for d in fired] == [
        ("threshold", "stop", "noise/gamma=1/relative_delta")
    ]
    assert "0.06 exceeds its threshold 0.05" in fired[0].message


def test_a_forecast_margin_warns_before_the_curve_has_crossed():
    curve = make_curve("u_shape", n_points=24, seed=2, noise=0.0)
    results = run_policy(declared_policy(forecast_margin=1.0), records(curve))
    kinds = [(i, d.trigger) for i, (_, ds) in enumerate(results) for d in ds]
    first = {trigger: i for i, trigger in reversed(kinds)}
    assert first["forecast"] < first["crossed"]


@pytest.mark.parametrize("high", [math.inf, 3e7])
def test_a_forecast_margin_ignores_a_forecast_whose_interval_is_unbounded(monkeypatch, high):
    # Noise on a curve that never turns up can fit a "rising" term; its interval then
    # stays open above ("never" still plausible), and acting on it would be a false alarm.
    from lightning_overtrain.inflection import detector
    from lightning_overtrain.inflection.forecast import Forecast

    monkeypatch.setattr(detector, "fit_forecast", lambda *a, **k: Forecast(2e7, 1e7, high))
    curve = make_curve("monotone", n_points=12, seed=0, noise=0.01)
    results = run_policy(declared_policy(forecast_margin=1e6), records(curve))
    triggers = [d.trigger for _, ds in results for d in ds]
    assert triggers == ([] if high == math.inf else ["forecast"])


def test_the_state_round_trips_to_the_same_decisions():
    curve = make_curve("u_shape", n_points=24, seed=3, noise=0.01)
    recs = list(records(curve))
    whole = run_policy(declared_policy(), recs)
    first = declared_policy()
    run_policy(first, recs[:12])
    second = declared_policy()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = run_policy(second, recs[12:])
    assert [[d.message for d in ds] for _, ds in rest] == [
        [d.message for d in ds] for _, ds in whole[12:]
    ]
    # Exactly the same numbers (JSON text compares NaN and inf too).
    assert json.dumps([a for a, _ in rest]) == json.dumps([a for a, _ in whole[12:]])


def test_auto_best_signal_prefers_fine_tune_then_the_largest_gamma():
    noise_only = {"tokens": 1.0, "noise/gamma=0.5/perturbed_loss": 2.0, SIGNAL: 3.0}
    policy = declared_policy()
    judgement = policy.judge(noise_only)
    assert judgement.best_moved and judgement.best is policy.best
    assert (policy.best["signal"], policy.best["value"]) == (SIGNAL, 3.0)
    assert judgement.additions["best/value"] == 3.0
    both = {
        **noise_only,
        "finetune/lr=0.0001/reference_loss_after": 2.5,
        "finetune/lr=0.001/reference_loss_after": 2.7,
    }
    policy = declared_policy()
    policy.judge(both)
    assert (policy.best["signal"], policy.best["value"]) == (
        "finetune/lr=0.001/reference_loss_after",
        2.7,
    )
    policy = declared_policy()
    policy.best = {"signal": SIGNAL, "value": 3.0, "tokens": 1.0}
    assert not policy.judge({"tokens": 2.0, SIGNAL: 3.1}).best_moved
    assert policy.best["tokens"] == 1.0
    judgement = policy.judge({"tokens": 3.0, "step": 7, SIGNAL: 2.9}, best_path="b.ckpt")
    assert judgement.best_moved
    assert policy.best == {
        "signal": SIGNAL,
        "value": 2.9,
        "tokens": 3.0,
        "step": 7,
        "path": "b.ckpt",
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"action": "explode"}, "`action` must be 'warn' or 'stop', got 'explode'"),
        ({"actions": {SIGNAL: "halt"}}, r"`actions\['noise/gamma=1/perturbed_loss'\]` must be"),
        ({"signals": SIGNAL}, "`signals` must be a list of record keys or globs"),
        ({"patience": 0}, "patience"),
        ({"min_rise": -1.0}, "min_rise"),
        ({"forecast_margin": -0.5}, "`forecast_margin` must be a number >= 0 or None, got -0.5"),
        ({"thresholds": {"x": "high"}}, r"`thresholds\['x'\]` must be a number, got 'high'"),
        ({"best_signal": ""}, "`best_signal` must be a record key, 'auto' or None"),
    ],
)
def test_bad_policy_settings_are_rejected_with_the_argument_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        InflectionPolicy(**kwargs)


# ----------------------------------------------------------------------------- in a Trainer
U_CURVE = [3.0, 2.6, 2.3, 2.1, 2.0, 2.05, 2.2, 2.4, 2.7, 3.0, 3.3, 3.6]  # bottom at step 5


class ScriptedProbe(Probe):
    """A probe whose signal follows a script indexed by the step: a U with its bottom at step 5."""

    name = "scripted"

    def __init__(self) -> None:
        self.step = 0

    def run(self, ctx):
        value = U_CURVE[self.step - 1]
        return {"scripted/loss": value, "scripted/loss_stderr": 0.01}


class StepTracker(LossRecorder):
    """Feeds the step to the scripted probe and keeps the weights after every step."""

    def __init__(self, probe: ScriptedProbe) -> None:
        super().__init__()
        self.probe, self.weights = probe, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.probe.step = trainer.global_step + 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.weights[trainer.global_step] = {
            k: v.clone() for k, v in pl_module.state_dict().items()
        }


class Alerts(Reporter):
    def __init__(self) -> None:
        self.alerts = []

    def alert(self, trainer, monitor, title, text, level):
        self.alerts.append((trainer.global_step, level, title))


def scripted_run(tmp_path, code_text, action, max_steps=None, ckpt_path=None, policy=None):
    probe = ScriptedProbe()
    alerts = Alerts()
    policy = policy or InflectionPolicy(
        signals=["scripted/loss"], action=action, best_signal="scripted/loss"
    )
    monitor = OvertrainingMonitor(
        reference_batches(code_text, n=1),
        every_n_steps=1,
        probes=[probe],
        policy=policy,
        dirpath=tmp_path / "mon",
        reporters=[FileReporter(), alerts],
    )
    tracker = StepTracker(probe)
    trainer = make_trainer(tmp_path, [monitor, tracker], max_steps=max_steps or len(U_CURVE))
    trainer.fit(make_module(), train_loader(code_text), ckpt_path=ckpt_path)
    return monitor, trainer, tracker, alerts


def test_stop_policy_stops_at_the_crossing_and_says_why(tmp_path, code_text):
    with pytest.warns(UserWarning, match="scripted/loss has turned upward"):
        monitor, trainer, _, alerts = scripted_run(tmp_path, code_text, "stop")
    stopped_at = trainer.global_step
    assert 7 <= stopped_at < len(U_CURVE)
    assert monitor.history[-1]["inflection/scripted/loss/crossed"] == 1.0
    assert all(r["inflection/scripted/loss/crossed"] == 0.0 for r in monitor.history[:-1])
    assert "scripted/loss has turned upward" in monitor.stop_reason
    assert alerts.alerts == [(stopped_at, "stop", "Overtraining crossed: scripted/loss")]
    logged = [
        json.loads(line) for line in (tmp_path / "mon" / "alerts.jsonl").read_text().splitlines()
    ]
    assert logged[0]["level"] == "stop" and logged[0]["step"] == stopped_at


def test_the_best_snapshot_is_kept_at_the_bottom_and_loads_back(tmp_path, code_text):
    monitor, _, tracker, _ = scripted_run(tmp_path, code_text, "warn")
    assert monitor.best_tokens == monitor.history[4]["tokens"] and monitor.policy.best["step"] == 5
    assert monitor.history[-1]["best/tokens"] == monitor.best_tokens
    loaded = type(make_module()).load_from_checkpoint(monitor.best_path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, tracker.weights[5][key]), key


def test_warn_policy_warns_once_and_training_goes_on(tmp_path, code_text):
    with pytest.warns(UserWarning, match="OvertrainingMonitor \\(warn\\)") as caught:
        monitor, trainer, _, alerts = scripted_run(tmp_path, code_text, "warn")
    assert trainer.global_step == len(U_CURVE) and monitor.stop_reason is None
    assert len([w for w in caught if "turned upward" in str(w.message)]) == 1
    assert [level for _, level, _ in alerts.alerts] == ["warn"]


def test_a_resumed_run_makes_the_same_decisions(tmp_path, code_text):
    full, full_trainer, _, _ = scripted_run(tmp_path / "full", code_text, "stop")
    _, trainer, _, _ = scripted_run(tmp_path / "first", code_text, "stop", max_steps=6)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed, resumed_trainer, _, _ = scripted_run(
        tmp_path / "resumed", code_text, "stop", ckpt_path=tmp_path / "half.ckpt"
    )
    assert resumed_trainer.global_step == full_trainer.global_step
    assert resumed.stop_reason == full.stop_reason
    # A mid-epoch resume restarts the (non-resumable) DataLoader, so the weights and the
    # reference loss differ after step 6; the scripted signal and its verdicts don't.
    skip = ("probe_seconds", "reference_loss")
    assert history_text(resumed.history, skip) == history_text(full.history, skip)
    assert resumed.policy.best["step"] == full.policy.best["step"] == 5


def test_policy_must_be_an_inflection_policy():
    with pytest.raises(ValueError, match="`policy` must be an InflectionPolicy or None"):
        OvertrainingMonitor(
            [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}], every_n_steps=1, policy="stop"
        )


def test_policy_verdicts_are_finite_or_nan_numbers(tmp_path, code_text):
    monitor, *_ = scripted_run(tmp_path, code_text, "warn")
    keys = [k for k in monitor.history[-1] if k.startswith("inflection/")]
    assert len(keys) == len(metric_keys.INFLECTION_FIELDS) == 9
    assert all(isinstance(monitor.history[-1][k], float) for k in keys)
    assert not math.isnan(monitor.history[-1]["inflection/scripted/loss/bottom_tokens"])


def test_the_forecast_fits_the_reference_loss_and_delta_separately():
    record = {
        "tokens": 1.0,
        "reference_loss": 2.0,
        SIGNAL: 2.3,
        "noise/gamma=1/delta": 0.3,
        "noise/gamma=1/delta_stderr": 0.01,
        "finetune/lr=0.001/reference_loss_after": 2.5,
        "finetune/lr=0.001/forgetting": 0.5,
    }
    built_in = [*metric_keys.noise_signals([1.0]), *metric_keys.finetune_signals([1e-3])]
    declared = {s.key: s for s in built_in}
    assert decomposed_terms(record, declared[SIGNAL]) == {
        "base": 2.0,
        "sensitivity": 0.3,
        "sensitivity_stderr": 0.01,
    }
    assert decomposed_terms(record, declared["finetune/lr=0.001/reference_loss_after"]) == {
        "base": 2.0,
        "sensitivity": 0.5,
        "sensitivity_stderr": None,
    }
    assert decomposed_terms(record, declared["finetune/lr=0.001/downstream_loss_after"]) == {}
    curve = make_curve("u_shape", n_points=24, seed=4, noise=0.05, noise_unit="delta")
    policy = declared_policy()
    for t, b, d, se in zip(curve.tokens, curve.base, curve.sensitivity, curve.sensitivity_stderrs):
        rec = {"tokens": float(t), "reference_loss": float(b), SIGNAL: float(b + d)}
        rec.update({"noise/gamma=1/delta": float(d), "noise/gamma=1/delta_stderr": float(se)})
        policy.judge(rec)
    assert policy.detectors[SIGNAL].state_dict()["sensitivities"][-1] == pytest.approx(
        curve.sensitivity[-1]
    )
    forecast = policy.detectors[SIGNAL].state.forecast_tokens
    assert forecast == pytest.approx(curve.true_bottom_tokens, rel=0.5)


def crn_records(seed=0, k=4, n=16):
    """A U seen through k noise directions: a wide spread across directions, little noise."""
    gen = torch.Generator().manual_seed(seed)
    tokens = [1e6 * 10 ** (i / 4) for i in range(n)]
    t = torch.tensor(tokens, dtype=torch.float64) / 1e6
    scales = torch.exp(0.3 * torch.randn(k, 1, generator=gen, dtype=torch.float64))
    samples = 2.0 + t**-0.4 + scales * 0.3 * (t / t[8]) ** 0.6
    samples = samples + 0.002 * torch.randn(k, n, generator=gen, dtype=torch.float64)
    for i, tok in enumerate(tokens):
        column = samples[:, i]
        yield {
            "tokens": tok,
            "step": i,
            SIGNAL: float(column.mean()),
            f"{SIGNAL}_stderr": float(column.std() / k**0.5),
            metric_keys.samples_key(SIGNAL): [float(v) for v in column],
        }


def first_crossed(policy, recs):
    for i, record in enumerate(recs):
        if any(d.trigger == "crossed" for d in policy.judge(record).decisions):
            return i
    return None


def test_the_declared_signals_samples_judge_the_rise_paired():
    recs = list(crn_records())
    paired = first_crossed(declared_policy(), recs)
    unpaired = first_crossed(
        declared_policy(),
        [{k: v for k, v in r.items() if not k.endswith("_samples")} for r in recs],
    )
    assert paired is not None and (unpaired is None or paired < unpaired)
    bottom = min(range(len(recs)), key=lambda i: recs[i][SIGNAL])
    assert bottom < paired <= bottom + 3


def test_a_policy_with_samples_resumes_bit_exactly_from_its_state():
    recs = list(crn_records(seed=1))
    whole = run_policy(declared_policy(), recs)
    first = declared_policy()
    run_policy(first, recs[:9])
    second = declared_policy()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert second.state_dict() == first.state_dict()
    assert (
        second.state_dict()["detectors"][SIGNAL]["samples"][0]
        == recs[0][metric_keys.samples_key(SIGNAL)]
    )
    rest = run_policy(second, recs[9:])
    assert json.dumps([a for a, _ in rest]) == json.dumps([a for a, _ in whole[9:]])
    assert [[d.message for d in ds] for _, ds in rest] == [
        [d.message for d in ds] for _, ds in whole[9:]
    ]


def test_only_declared_or_named_signals_are_judged():
    record = {"tokens": 1.0, SIGNAL: 2.0, "mine/loss": 3.0}
    assert not InflectionPolicy().judge(record).verdicts  # nothing declared, nothing named
    assert set(declared_policy().judge(record).verdicts) == {SIGNAL}
    assert set(InflectionPolicy(signals=["mine/*"]).judge(record).verdicts) == {"mine/loss"}


def test_the_crossing_warning_names_the_bottom_and_the_kept_snapshot():
    policy = declared_policy(best_signal=SIGNAL)
    recs = list(crn_records())
    messages = [
        d.message for r in recs for d in policy.judge(r, best_path="run/best.ckpt").decisions
    ]
    (message,) = messages
    bottom = policy.best
    assert f"has turned upward: bottom at {tokens_text(bottom['tokens'])} tokens" in message
    assert f"Kept: the snapshot at {tokens_text(bottom['tokens'])} tokens (step" in message
    assert message.endswith(f"the bottom of {SIGNAL} so far, in best.ckpt.")
    assert "\n" not in message
