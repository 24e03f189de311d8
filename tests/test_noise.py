import math
import types

import numpy as np
import pytest
import torch
from conftest import SIGMAS, make_module, quadratic_context
from torch import nn

from lightning_overtrain import NoiseProbe, keys
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.history import read_history, write_history
from lightning_overtrain.probes.noise import noise_direction_seed, perturb_, summarize_noise
from lightning_overtrain.reporting.base import RunView
from lightning_overtrain.reporting.loggers import LoggerReporter


class Quadratic(nn.Module):
    """L(theta) = 0.5 (theta - theta*)^T H (theta - theta*) + 1 with theta = [a, b]: a quadratic."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(30, generator=gen, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(4, 5, generator=gen, dtype=torch.float64))
        self.gain = nn.Parameter(torch.ones(3, dtype=torch.float64))  # constant init: no noise
        n = 30 + 20
        root = torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
        self.register_buffer("hessian", root @ root.T + 0.5 * torch.eye(n, dtype=torch.float64))
        self.register_buffer("optimum", torch.randn(n, generator=gen, dtype=torch.float64))

    def loss(self) -> torch.Tensor:
        d = torch.cat([self.a, self.b.flatten()]) - self.optimum
        return 0.5 * d @ self.hessian @ d + 1.0 + 0.0 * self.gain.sum()


def run_probe(model: Quadratic, probe: NoiseProbe) -> dict[str, float]:
    def fail(what, exc):
        raise exc

    return measure_snapshot(quadratic_context(model), [probe], fail)


def expected_delta(model: Quadratic, gamma: float) -> float:
    """0.5 * gamma^2 * tr(Sigma H) with Sigma diagonal: sigma_t^2 on each tensor's entries."""
    diag = torch.diagonal(model.hessian)
    sigma2 = torch.cat([torch.full((30,), SIGMAS["a"] ** 2), torch.full((20,), SIGMAS["b"] ** 2)])
    return 0.5 * gamma**2 * float((sigma2.double() * diag).sum())


@pytest.mark.parametrize("gamma", [0.25, 1.0, 4.0])
def test_delta_matches_the_second_order_prediction_on_an_exact_quadratic(gamma):
    model = Quadratic()
    record = run_probe(model, NoiseProbe(gammas=(gamma,), pairs=64, seed=3))
    delta = record[f"noise/gamma={gamma:g}/delta"]
    stderr = record[f"noise/gamma={gamma:g}/delta_stderr"]
    expected = expected_delta(model, gamma)
    assert abs(delta - expected) < 3 * stderr
    assert stderr < 0.25 * expected  # the estimate is informative, not trivially wide


def test_common_random_numbers_give_the_same_directions_for_every_gamma_and_snapshot():
    model = Quadratic()
    probe = NoiseProbe(gammas=(0.5, 1.0), pairs=3, seed=11)
    first = run_probe(model, probe)
    # On a quadratic with antithetic pairs, delta is exactly gamma^2 * (the same quadratic form).
    ratio = first["noise/gamma=1/delta"] / first["noise/gamma=0.5/delta"]
    assert ratio == pytest.approx(4.0, rel=1e-5)
    assert run_probe(model, probe) == first


def test_different_seeds_draw_different_directions():
    model = Quadratic()
    one = run_probe(model, NoiseProbe(gammas=(1.0,), pairs=2, seed=1))
    two = run_probe(model, NoiseProbe(gammas=(1.0,), pairs=2, seed=2))
    assert one["noise/gamma=1/delta"] != two["noise/gamma=1/delta"]


def test_probe_hands_the_model_back_bit_identical():
    model = Quadratic()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_probe(model, NoiseProbe(pairs=2))
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_perturbation_is_antithetic_and_spares_constant_tensors():
    model = Quadratic()
    backup = ModelBackup(model)
    backup.save()
    saved, sigmas = backup.saved_params(), [SIGMAS[n] for n in backup.names]
    perturb_(backup.params, saved, sigmas, 0.5, seed=7)
    plus = [p.detach() - s for p, s in zip(backup.params, saved)]
    perturb_(backup.params, saved, sigmas, -0.5, seed=7)
    minus = [p.detach() - s for p, s in zip(backup.params, saved)]
    for name, up, down in zip(backup.names, plus, minus):
        torch.testing.assert_close(up, -down)
        assert (up.abs().sum() == 0) == (name == "gain")
    # The noise on `a` has std gamma * sigma_a.
    assert float(plus[backup.names.index("a")].std()) == pytest.approx(0.5 * 0.3, rel=0.35)


def test_perturbation_leaves_the_global_rng_alone():
    model = Quadratic()
    backup = ModelBackup(model)
    backup.save()
    state = torch.get_rng_state()
    perturb_(backup.params, backup.saved_params(), [0.1, 0.1, 0.0], 1.0, seed=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_direction_seeds_depend_on_seed_and_pair_only():
    seeds = {noise_direction_seed(s, k) for s in range(4) for k in range(4)}
    assert len(seeds) == 16
    assert noise_direction_seed(2, 3) == noise_direction_seed(2, 3)


def test_summary_statistics_follow_the_definitions():
    out = summarize_noise(2.0, plus=[2.5, 2.7, 2.2], minus=[2.3, 2.5, 2.2])
    pair_means = np.array([2.4, 2.6, 2.2])
    assert out["perturbed_loss"] == pytest.approx(pair_means.mean())
    assert out["delta"] == pytest.approx(pair_means.mean() - 2.0)
    assert out["relative_delta"] == pytest.approx((pair_means.mean() - 2.0) / 2.0)
    assert out["delta_stderr"] == pytest.approx(pair_means.std(ddof=1) / math.sqrt(3))
    assert out["relative_delta_stderr"] == pytest.approx(out["delta_stderr"] / 2.0)


def test_a_single_pair_has_no_standard_error():
    assert math.isnan(summarize_noise(1.0, [1.2], [1.1])["delta_stderr"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gammas": ()}, "`gammas` must be a non-empty sequence of numbers > 0"),
        ({"gammas": (0.5, 0.0)}, r"`gammas` must be .* got \(0.5, 0.0\)"),
        ({"gammas": (-1.0,)}, "`gammas` must be"),
        ({"gammas": ("big",)}, "`gammas` must be"),
        ({"gammas": (0.5, 0.5)}, "`gammas` has duplicates"),
        ({"pairs": 0}, "`pairs` must be an int >= 1, got 0"),
        ({"pairs": 2.0}, "`pairs` must be an int >= 1, got 2.0"),
        ({"seed": -1}, "`seed` must be an int >= 0, got -1"),
    ],
)
def test_bad_noise_settings_are_rejected_with_the_argument_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseProbe(**kwargs)


def test_a_model_without_any_init_std_is_rejected_before_training():
    model = Quadratic()
    ctx = quadratic_context(model)
    ctx.sigmas = [0.0 for _ in ctx.sigmas]
    with pytest.raises(ValueError, match="init_std"):
        NoiseProbe().validate(ctx)


def test_the_default_loss_switches_the_kv_cache_off_and_back_on():
    from lightning_overtrain.engine.losses import transformers_loss

    model = make_module()
    seen = []
    model.model.register_forward_pre_hook(lambda mod, args: seen.append(mod.config.use_cache))
    ids = torch.randint(0, 256, (2, 16))
    loss = transformers_loss(model, {"input_ids": ids})
    assert seen == [False] and model.model.config.use_cache is True
    assert loss == model.model(input_ids=ids, labels=ids).loss


def test_each_directions_value_is_recorded_in_direction_order_at_every_snapshot():
    model = Quadratic()
    probe = NoiseProbe(gammas=(1.0,), pairs=3, seed=5)
    record = run_probe(model, probe)
    samples = record[keys.samples_key("noise/gamma=1/perturbed_loss")]
    assert len(samples) == 3 and all(isinstance(v, float) for v in samples)
    assert np.mean(samples) == pytest.approx(record["noise/gamma=1/perturbed_loss"], rel=1e-12)
    assert np.std(samples, ddof=1) / math.sqrt(3) == pytest.approx(
        record["noise/gamma=1/perturbed_loss_stderr"], rel=1e-9
    )
    # The same directions at every snapshot: a later snapshot's samples move with it.
    with torch.no_grad():
        model.a.add_(0.1)
    later = run_probe(model, probe)[keys.samples_key("noise/gamma=1/perturbed_loss")]
    assert (
        later != samples
        and run_probe(model, probe)[keys.samples_key("noise/gamma=1/perturbed_loss")] == later
    )


def test_per_sample_lists_stay_out_of_csv_and_loggers_and_round_trip_in_jsonl(tmp_path):
    record = {"tokens": 1.0, "noise/gamma=1/perturbed_loss": 2.5}
    record[keys.samples_key("noise/gamma=1/perturbed_loss")] = [2.4, 2.6]
    jsonl, csv_path = write_history([record], str(tmp_path))
    assert read_history(jsonl) == [record]
    with open(csv_path) as f:
        header = f.readline().strip().split(",")
    assert header == ["tokens", "noise/gamma=1/perturbed_loss"]
    logged = []

    class Logger:
        def log_metrics(self, metrics, step):
            logged.append(metrics)

    trainer = types.SimpleNamespace(loggers=[Logger()], global_step=3)
    LoggerReporter().report(trainer, RunView(dirpath=str(tmp_path)), record)
    assert logged == [{"overtrain/tokens": 1.0, "overtrain/noise/gamma=1/perturbed_loss": 2.5}]
