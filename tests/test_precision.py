"""Precision: noise drawn in float32 and rounded once; probes follow the trainer's precision."""

from types import SimpleNamespace

import pytest
import torch
from conftest import SIGMAS, make_module, make_trainer, quadratic_context, reference_batches
from test_noise import Quadratic

from lightning_overtrain import FineTuneProbe, NoiseProbe, OvertrainingMonitor
from lightning_overtrain.callbacks.strategies import check_precision, precision_extras
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.data import shard_batches
from lightning_overtrain.engine.noise import normal_range, tensor_key
from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.engine.tokens import count_tokens
from lightning_overtrain.engine.train_loop import train_steps
from lightning_overtrain.probes.schedule import ScheduleProbe
from lightning_overtrain.probes.sharpness import SharpnessProbe


class BF16Quadratic(Quadratic):
    """The quadratic with bf16 parameters (as under bf16-true); the loss is taken in float64
    so that only the parameters' rounding is under test."""

    def __init__(self) -> None:
        super().__init__()
        for p in (self.a, self.b, self.gain):
            p.data = p.data.to(torch.bfloat16)

    def loss(self) -> torch.Tensor:
        d = torch.cat([self.a.double(), self.b.double().flatten()]) - self.optimum
        return 0.5 * d @ self.hessian @ d + 1.0 + 0.0 * self.gain.double().sum()


def test_noise_is_added_in_float32_and_rounded_to_bf16_once():
    model = BF16Quadratic()
    backup = ModelBackup(model)
    backup.save()
    from lightning_overtrain.probes.noise import _key, perturb_

    sigmas = [SIGMAS[n] for n in backup.names]
    for scale in (0.5, -0.5):
        perturb_(backup.params, backup.saved_params(), sigmas, scale, seed=9)
        z = normal_range(_key(9, 0), 0, 30, torch.device("cpu"))
        expected = (z * (scale * SIGMAS["a"]) + backup.saved_params()[0].float()).to(torch.bfloat16)
        assert torch.equal(model.a.detach(), expected)
    assert tensor_key(9, 0, 0) == _key(9, 0)


def test_delta_scales_as_gamma_squared_under_bf16_parameters():
    model = BF16Quadratic()
    gammas = (0.5, 1.0, 2.0)
    record = measure_snapshot(
        quadratic_context(model),
        [NoiseProbe(gammas=gammas, pairs=16, seed=3)],
        lambda what, exc: (_ for _ in ()).throw(exc),
    )
    per_gamma2 = [record[f"noise/gamma={g:g}/delta"] / g**2 for g in gammas]
    # Same directions at every gamma, exact quadratic: in float64 these agree to 1e-12.
    # In bf16 each perturbed parameter is rounded once (about 2^-9 of its value); the
    # rounding errors of a pair do not cancel and meet the gradient, a first-order
    # term that matters most at small gamma: within 3% here (1.7% measured at 0.5).
    assert max(per_gamma2) / min(per_gamma2) - 1 < 0.03, per_gamma2


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)


def loss_fn(module, batch):
    return ((module.layer(batch["x"]) - batch["y"]) ** 2).mean()


def fine_tuned(scaler) -> list[torch.Tensor]:
    model = Linear()
    gen = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(4, 4, generator=gen), "y": torch.randn(4, 1, generator=gen)}]
    data = shard_batches(batches, 0, 1, lambda b: 4, torch.device("cpu"), "data")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, optimizer, data, 3, loss_fn, scaler=scaler)
    return [p.detach().clone() for p in model.parameters()]


def test_a_gradient_scaler_scales_unscales_and_skips_overflowing_steps():
    plain = fine_tuned(None)
    # A power-of-two scale is exact in float32: the same steps as without a scaler.
    scaled = fine_tuned(torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled))
    # An overflowing scale makes inf gradients: the scaler skips those steps.
    start = [p.detach().clone() for p in Linear().parameters()]
    skipped = fine_tuned(torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=100))
    assert any(not torch.equal(a, b) for a, b in zip(start, skipped))  # later steps ran
    assert any(not torch.equal(a, b) for a, b in zip(plain, skipped))  # the first did not


def test_probes_get_a_scaler_of_their_own_that_starts_at_the_training_scale():
    training = torch.amp.GradScaler("cpu", init_scale=256.0)
    factory = precision_extras(SimpleNamespace(scaler=training))["grad_scaler"]
    mine = factory()
    assert mine is not training and mine.get_scale() == 256.0
    assert precision_extras(SimpleNamespace(scaler=None)) == {}


def test_an_unsupported_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="precision='transformer-engine'"):
        check_precision(SimpleNamespace(precision="transformer-engine"))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "16-mixed"])
def test_every_probe_runs_under_each_precision(tmp_path, code_text, prose_text, precision):
    from conftest import train_loader

    prose = reference_batches(prose_text, n=2, batch_size=2)
    monitor = OvertrainingMonitor(
        reference_batches(code_text, n=1, batch_size=2),
        every_n_steps=2,
        probes=[
            NoiseProbe(gammas=(1.0,), pairs=1),
            FineTuneProbe(
                train_data=prose[:1], eval_data=prose[1:], steps=1, lrs=(1e-3,), matched_loss=9.0
            ),
            SharpnessProbe("update"),
            SharpnessProbe("gradient", name="sharpness_grad", downstream_data=prose[:1]),
            ScheduleProbe(),
        ],
        cooldown_steps=1,
        cooldown_data=reference_batches(code_text, n=1, batch_size=2),
        on_probe_error="raise",
        dirpath=tmp_path / "mon",
    )
    trainer = make_trainer(tmp_path, [monitor], max_steps=2, precision=precision)
    trainer.fit(make_module(0, n_layer=1, n_embd=16), train_loader(code_text, batch_size=2))
    (record,) = monitor.history
    assert record["probe_failures"] == 0
    measured = (
        "reference_loss",
        "noise/gamma=1/delta",
        "finetune/lr=0.001/forgetting",
        "finetune/lr=0.001/matched_steps",
        "sharpness/critical_sharpness",
        "sharpness_grad/relative_alignment",
        "schedule/lr",
    )
    for key in measured:
        assert torch.isfinite(torch.tensor(record[key])), key
    assert count_tokens  # the default counter served the run


def test_after_step_sees_each_step_and_stopping_early_leaves_the_weights_of_that_step():
    def run(steps, stop_at=None):
        model = Linear()
        gen = torch.Generator().manual_seed(1)
        batches = [{"x": torch.randn(4, 4, generator=gen), "y": torch.randn(4, 1, generator=gen)}]
        data = shard_batches(batches, 0, 1, lambda b: 4, torch.device("cpu"), "data")
        seen = []

        def after_step(step):
            seen.append((step, model.layer.weight.detach().clone()))
            return step == stop_at

        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = train_steps(model, optimizer, data, steps, loss_fn, after_step=after_step)
        return model, seen, losses

    _, seen, losses = run(5)
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5] and len(losses) == 5
    stopped, seen_stopped, losses_stopped = run(5, stop_at=3)
    assert [s for s, _ in seen_stopped] == [1, 2, 3] and losses_stopped == losses[:3]
    # The weights after 3 steps, as the full run saw them at its step 3.
    assert torch.equal(stopped.layer.weight.detach(), seen[2][1])
