"""The monitor inside a real Trainer: invisible, resumable, strict on input, tolerant of faults."""

import json
import math
import random
import warnings

import numpy as np
import pytest
import torch
from conftest import (
    CONTEXT,
    LossRecorder,
    history_text,
    make_module,
    make_trainer,
    reference_batches,
    train_loader,
)
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_overtrain import NoiseProbe, OvertrainingMonitor, Probe, keys
from lightning_overtrain.history import read_history
from lightning_overtrain.testing.demo import ByteWindows


def monitor(text: bytes, tmp_path, **kwargs) -> OvertrainingMonitor:
    settings = dict(
        every_n_steps=3, probes=[NoiseProbe(gammas=(0.5, 1.0), pairs=2)], dirpath=tmp_path / "mon"
    )
    settings.update(kwargs)
    settings.setdefault("reference_data", reference_batches(text))
    return OvertrainingMonitor(**settings)


def fit(tmp_path, text, callbacks, max_steps=9, seed=0, loader=None, **trainer_kwargs):
    model = make_module(seed)
    recorder = LossRecorder()
    trainer = make_trainer(tmp_path, [*callbacks, recorder], max_steps=max_steps, **trainer_kwargs)
    trainer.fit(model, loader if loader is not None else train_loader(text, shuffle=True))
    return model, trainer, recorder.losses


class DrawsRandomNumbers(Probe):
    """A user probe that uses the global RNGs (as dropout in train mode would)."""

    name = "random"

    def run(self, ctx):
        return {"random/draw": float(torch.rand(())) + random.random() + float(np.random.rand())}


def test_training_is_bit_identical_with_the_monitor_on(tmp_path, code_text):
    plain_model, plain_trainer, plain_losses = fit(tmp_path / "a", code_text, [])
    plain_rng = torch.get_rng_state()
    # A shuffling reference DataLoader would draw from the global RNG if not isolated.
    shuffled_reference = DataLoader(
        ByteWindows(code_text[-8192:], CONTEXT), batch_size=8, shuffle=True
    )
    probes = [NoiseProbe(gammas=(0.5, 1.0), pairs=2), DrawsRandomNumbers()]
    mon = monitor(
        code_text, tmp_path, reference_data=shuffled_reference, reference_batches=4, probes=probes
    )
    model, trainer, losses = fit(tmp_path / "b", code_text, [mon])
    assert len(mon.history) == 3 and all("random/draw" in r for r in mon.history)
    assert losses == plain_losses
    assert torch.equal(torch.get_rng_state(), plain_rng)
    for (name, p), q in zip(model.named_parameters(), plain_model.parameters()):
        assert torch.equal(p, q), name
    opt, plain_opt = trainer.optimizers[0].state_dict(), plain_trainer.optimizers[0].state_dict()
    for key, state in opt["state"].items():
        for field, value in state.items():
            assert torch.equal(value, plain_opt["state"][key][field]), (key, field)


def test_snapshot_restores_train_mode_grad_mode_and_grads(tmp_path, code_text):
    mon = monitor(code_text, tmp_path, every_n_steps=1000)
    model, trainer, _ = fit(tmp_path, code_text, [mon], max_steps=2)
    model.train()
    model.model.transformer.h[0].eval()
    loss = model.model(**next(iter(train_loader(code_text))), labels=None).logits.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    with torch.enable_grad():
        mon.snapshot(trainer, model)
        assert torch.is_grad_enabled()
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())


def test_history_is_written_logged_and_carries_tokens(tmp_path, code_text):
    mon = OvertrainingMonitor(
        reference_batches(code_text), every_n_steps=3, probes=[NoiseProbe(gammas=(1.0,), pairs=2)]
    )
    logger = CSVLogger(tmp_path, name="csv")
    fit(tmp_path, code_text, [mon], logger=logger)
    assert mon.dirpath == f"{logger.log_dir}/overtrain"
    records = read_history(f"{mon.dirpath}/history.jsonl")
    assert [r["step"] for r in records] == [3, 6, 9]
    assert [r["tokens"] for r in records] == [3 * 8 * CONTEXT, 6 * 8 * CONTEXT, 9 * 8 * CONTEXT]

    # JSON has no NaN or inf: the file writes null, read back as NaN.
    def finite(history):
        return [
            {k: v if isinstance(v, list) or math.isfinite(v) else None for k, v in r.items()}
            for r in history
        ]

    assert finite(records) == finite(mon.history)
    run_dir = tmp_path / "csv" / "version_0"
    header = (run_dir / "overtrain" / "history.csv").read_text().splitlines()[0].split(",")
    assert "noise/gamma=1/delta" in header and "reference_loss" in header
    config = json.loads((run_dir / "overtrain" / "monitor.json").read_text())
    assert config["probes"]["noise"] == {"gammas": [1.0], "pairs": 2, "seed": 0}
    assert config["init_std_source"] == "weights at step 0"
    logger.save()
    metrics = (run_dir / "metrics.csv").read_text().splitlines()
    columns = metrics[0].split(",")
    rows = [dict(zip(columns, line.split(","))) for line in metrics[1:]]
    logged = [r for r in rows if r.get("overtrain/noise/gamma=1/delta")]
    assert [float(r["overtrain/tokens"]) for r in logged] == [r["tokens"] for r in records]


def test_reference_loss_falls_and_sensitivity_is_measured(tmp_path, code_text):
    mon = monitor(code_text, tmp_path, every_n_steps=10)
    fit(tmp_path, code_text, [mon], max_steps=30)
    losses = [r["reference_loss"] for r in mon.history]
    assert losses[0] > losses[1] > losses[2]
    for record in mon.history:
        assert record["noise/gamma=1/delta_stderr"] > 0
        assert record["noise/gamma=1/perturbed_loss"] == pytest.approx(
            record["reference_loss"] + record["noise/gamma=1/delta"]
        )


def test_tokens_count_every_micro_batch_and_the_offset(tmp_path, code_text):
    mon = monitor(code_text, tmp_path, every_n_steps=2, token_offset=1_000_000)
    fit(tmp_path, code_text, [mon], max_steps=4, accumulate_grad_batches=3)
    per_step = 3 * 8 * CONTEXT
    assert [(r["step"], r["tokens"]) for r in mon.history] == [
        (2, 1_000_000 + 2 * per_step),
        (4, 1_000_000 + 4 * per_step),
    ]


def test_log_spaced_cadence_snapshots_at_token_thresholds(tmp_path, code_text):
    mon = monitor(code_text, tmp_path, every_n_steps=None, points_per_decade=2, start_tokens=1000)
    fit(tmp_path, code_text, [mon], max_steps=40)  # 256 tokens a step, up to 10,240 tokens
    # Thresholds 1000, 3162, 10000: first reached at steps 4 (1024), 13 (3328), 40 (10240).
    assert [r["step"] for r in mon.history] == [4, 13, 40]


def test_a_resumed_run_continues_the_same_history(tmp_path, code_text):
    text = code_text[: CONTEXT * 8 * 5]  # 5 steps an epoch, so resuming at an epoch boundary

    def loader():
        return train_loader(text)

    full = monitor(code_text, tmp_path / "full", every_n_steps=2)
    _, _, full_losses = fit(
        tmp_path / "full", text, [full], max_steps=-1, max_epochs=2, loader=loader()
    )

    first = monitor(code_text, tmp_path / "first", every_n_steps=2)
    _, trainer, first_losses = fit(
        tmp_path / "first", text, [first], max_steps=-1, max_epochs=1, loader=loader()
    )
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    assert first.state_key in torch.load(ckpt, weights_only=False)["callbacks"]

    resumed = monitor(code_text, tmp_path / "resumed", every_n_steps=2)
    model = make_module(seed=123)  # different init: everything must come from the checkpoint
    recorder = LossRecorder()
    trainer = make_trainer(tmp_path / "resumed", [resumed, recorder], max_steps=-1, max_epochs=2)
    trainer.fit(model, loader(), ckpt_path=ckpt)
    assert first_losses + recorder.losses == full_losses
    assert history_text(resumed.history) == history_text(full.history)
    assert resumed.init_std_source == "weights at step 0"
    assert resumed.init_stds == full.init_stds
    assert read_history(f"{resumed.dirpath}/history.jsonl")[0]["step"] == 2


def test_two_monitors_coexist_with_their_own_state(tmp_path, code_text):
    a = monitor(code_text, tmp_path, every_n_steps=2, prefix="fast", dirpath=tmp_path / "a")
    b = monitor(code_text, tmp_path, every_n_steps=3, prefix="slow", dirpath=tmp_path / "b")
    _, trainer, _ = fit(tmp_path, code_text, [a, b], max_steps=6)
    assert a.state_key != b.state_key
    trainer.save_checkpoint(tmp_path / "both.ckpt")
    states = torch.load(tmp_path / "both.ckpt", weights_only=False)["callbacks"]
    assert len(states[a.state_key]["history"]) == 3 and len(states[b.state_key]["history"]) == 2


def test_joining_a_run_late_takes_the_init_std_from_the_model_config(tmp_path, code_text):
    _, trainer, _ = fit(tmp_path / "pre", code_text, [], max_steps=3)
    trainer.save_checkpoint(tmp_path / "pre.ckpt")
    mon = monitor(code_text, tmp_path, every_n_steps=2)
    model = make_module()
    make_trainer(tmp_path, [mon], max_steps=5).fit(
        model, train_loader(code_text), ckpt_path=tmp_path / "pre.ckpt"
    )
    assert mon.init_std_source == "config.initializer_range"
    assert mon.init_stds["model.transformer.wte.weight"] == 0.02
    assert mon.init_stds["model.transformer.ln_f.weight"] == 0.0
    assert [r["step"] for r in mon.history] == [4]


def test_joining_late_without_any_init_std_says_what_to_pass(tmp_path, code_text, monkeypatch):
    _, trainer, _ = fit(tmp_path / "pre", code_text, [], max_steps=2)
    trainer.save_checkpoint(tmp_path / "pre.ckpt")
    model = make_module()
    # A model with no transformers config to read `initializer_range` from.
    monkeypatch.setattr(
        "lightning_overtrain.core.fit_setup.config_initializer_range", lambda m: None
    )
    mon = monitor(code_text, tmp_path)
    with pytest.raises(ValueError, match="Pass `init_std`"):
        make_trainer(tmp_path, [mon], max_steps=4).fit(
            model, train_loader(code_text), ckpt_path=tmp_path / "pre.ckpt"
        )


def test_user_init_std_wins_and_is_reported(tmp_path, code_text):
    mon = monitor(code_text, tmp_path, init_std=lambda name, param: None)
    with pytest.raises(
        ValueError, match=r"`init_std` returned None for 'model\.transformer\.wte\.weight'"
    ):
        fit(tmp_path, code_text, [mon], max_steps=1)
    mon = monitor(code_text, tmp_path, init_std=0.01)
    fit(tmp_path, code_text, [mon], max_steps=3)
    assert mon.init_std_source == "init_std argument"
    assert mon.init_stds["model.transformer.h.0.mlp.c_fc.weight"] == 0.01


class Exploding(Probe):
    name = "exploding"

    def run(self, ctx):
        raise RuntimeError("boom")


def test_a_failing_probe_is_counted_and_skipped_while_training_goes_on(tmp_path, code_text):
    mon = monitor(
        code_text, tmp_path, probes=[Exploding(), NoiseProbe(gammas=(1.0, 1e30), pairs=2)]
    )
    plain = fit(tmp_path / "plain", code_text, [])[2]
    with pytest.warns(UserWarning, match="exploding probe failed") as caught:
        losses = fit(tmp_path, code_text, [mon])[2]
    assert losses == plain
    assert any(
        "noise probe failed" in str(w.message) and "non-finite" in str(w.message) for w in caught
    )
    assert [r["probe_failures"] for r in mon.history] == [2, 4, 6]
    # The non-finite gamma drops only its own numbers: gamma=1's are kept.
    assert all("noise/gamma=1/delta" in r and "reference_loss" in r for r in mon.history)
    assert not any(keys.noise_key(1e30, "delta") in r for r in mon.history)


def test_on_probe_error_raise_stops_training_with_the_probe_error(tmp_path, code_text):
    mon = monitor(code_text, tmp_path, probes=[Exploding()], on_probe_error="raise")
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, code_text, [mon])


def test_a_reference_batch_the_loss_cannot_use_fails_before_training(tmp_path, code_text):
    ids = torch.zeros(2, CONTEXT, dtype=torch.long)
    bad = [(ids, ids)]  # a tuple batch: the default `module(**batch).loss` cannot use it
    mon = OvertrainingMonitor(bad, every_n_steps=2)
    recorder = LossRecorder()
    with pytest.raises(
        ValueError, match=r"`loss_fn` .* failed on the first batch of `reference_data`.*lambda"
    ):
        make_trainer(tmp_path, [mon, recorder], max_steps=2).fit(
            make_module(), train_loader(code_text)
        )
    assert recorder.losses == []


def test_a_custom_loss_fn_and_tokens_fn_are_used(tmp_path, code_text):
    calls = []

    def loss_fn(module, batch):
        calls.append(1)
        return module.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    mon = monitor(code_text, tmp_path, loss_fn=loss_fn, tokens_fn=lambda batch: 1)
    fit(tmp_path, code_text, [mon], max_steps=3)
    assert mon.history[0]["tokens"] == 3 and mon.reference_tokens == 4
    # the start-up check reads each of the 4 batches once, then 4 x (reference + 8 perturbed)
    assert len(calls) == 4 + 4 * (1 + 2 * 2 * 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reference_data": None}, "`reference_data` must be a DataLoader"),
        ({"reference_data": []}, "`reference_data` is empty"),
        ({"reference_data": "data.txt"}, "`reference_data` must be a DataLoader"),
        ({"every_n_steps": None}, "exactly one snapshot cadence, got none"),
        ({"every_n_tokens": 10}, "exactly one snapshot cadence"),
        ({"probes": []}, "`probes` must be a non-empty list"),
        ({"probes": [NoiseProbe(), NoiseProbe()]}, "distinct names"),
        ({"probes": ["noise"]}, "`probes` must be a non-empty list of Probe objects"),
        ({"reference_batches": 0}, "`reference_batches` must be an int >= 1, got 0"),
        ({"loss_fn": "mse"}, "`loss_fn` must be callable"),
        ({"tokens_fn": 3}, "`tokens_fn` must be callable"),
        ({"token_offset": -1}, "`token_offset` must be an int >= 0, got -1"),
        ({"init_std": -0.02}, "`init_std` must be a positive float"),
        ({"init_std": "0.02"}, "`init_std` must be a positive float"),
        ({"on_probe_error": "ignore"}, "`on_probe_error` must be one of"),
        ({"prefix": "over train"}, "`prefix` must be a non-empty string"),
        ({"reporters": [print]}, "`reporters` must be Reporter objects"),
    ],
)
def test_bad_arguments_are_rejected_with_the_argument_named(kwargs, match):
    settings = {
        "reference_data": [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}],
        "every_n_steps": 5,
    }
    settings.update(kwargs)
    with pytest.raises(ValueError, match=match):
        OvertrainingMonitor(**settings)


def test_reference_data_without_tokens_fails_before_training(tmp_path, code_text):
    empty_loader = DataLoader(ByteWindows(code_text[:CONTEXT], CONTEXT), batch_size=1)
    mon = OvertrainingMonitor(empty_loader, every_n_steps=2, tokens_fn=lambda b: 0)
    with pytest.raises(ValueError, match="holds 0 tokens"):
        make_trainer(tmp_path, [mon], max_steps=1).fit(make_module(), train_loader(code_text))


def test_no_nan_or_warning_on_a_clean_run(tmp_path, code_text):
    mon = monitor(code_text, tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="OvertrainingMonitor")
        fit(tmp_path, code_text, [mon], max_steps=6)
    measured = [v for r in mon.history for k, v in r.items() if not k.startswith("inflection/")]
    assert all(math.isfinite(v) for v in measured if not isinstance(v, list))
    samples = [v for r in mon.history for k, v in r.items() if isinstance(v, list)]
    assert samples and all(math.isfinite(x) for v in samples for x in v)
