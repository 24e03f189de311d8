"""The critical-sharpness probe: lambda_c exact on a quadratic, invisible to training."""

import copy
import json
import math

import pytest
import torch
from conftest import (
    LossRecorder,
    make_module,
    make_trainer,
    quadratic_context,
    reference_batches,
    train_loader,
)
from test_ddp import run, untimed
from test_noise import Quadratic

from lightning_overtrain import OvertrainingMonitor
from lightning_overtrain.engine.contract import ProbeFailure
from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.probes.sharpness import SharpnessProbe, adam_update, critical_step


def raise_failure(what, exc):
    raise exc


def flat(model: Quadratic) -> torch.Tensor:
    return torch.cat([model.a.detach(), model.b.detach().flatten()])


def gradient(model: Quadratic) -> torch.Tensor:
    return model.hessian @ (flat(model) - model.optimum)


def probe_quadratic(model, probe, optimizer=None) -> dict[str, float]:
    ctx = quadratic_context(model)
    if optimizer is not None:
        ctx.extras["optimizer"] = optimizer
    probe.validate(ctx)
    return measure_snapshot(ctx, [probe], raise_failure)


def trained_adamw(model: Quadratic, steps: int = 5) -> torch.optim.AdamW:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        model.loss().backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


# ---------------------------------------------------------------------- the maths
def test_the_line_search_finds_the_threshold_within_its_bracket_in_few_evaluations():
    for threshold in (3e-5, 0.3, 70.0):
        for start in (1e-3, 1.0):
            eta, calls = critical_step(lambda e, t=threshold: e > t, start, refine=4)
            assert abs(math.log2(eta / threshold)) <= 2**-5 + 1e-12
            assert calls == math.ceil(abs(math.log2(threshold / start))) + 1 + 4


def test_the_line_search_gives_up_on_an_ascent_direction_and_on_a_flat_one():
    with pytest.raises(ProbeFailure, match="not a descent direction"):
        critical_step(lambda e: True, 1.0, max_steps=10)
    with pytest.raises(ProbeFailure, match="did not rise"):
        critical_step(lambda e: False, 1.0, max_steps=10)


def test_along_the_gradient_it_is_the_hessians_rayleigh_quotient_gHg_over_gg():
    model = Quadratic()
    g = gradient(model)
    expected = float(g @ model.hessian @ g / (g @ g))
    record = probe_quadratic(model, SharpnessProbe("gradient", refine=12))
    assert record["sharpness/critical_sharpness"] == pytest.approx(expected, rel=2e-4)
    assert record["sharpness/critical_lr"] == pytest.approx(2 / expected, rel=2e-4)
    assert record["sharpness/forward_passes"] <= 12 + 12
    assert expected <= float(torch.linalg.eigvalsh(model.hessian).max())


def test_along_adamws_update_it_is_dHd_over_gd_with_d_the_step_adamw_takes():
    model = Quadratic()
    optimizer = trained_adamw(model)
    g = gradient(model)
    # The step AdamW really takes from here at lr=1 is the direction, per unit lr.
    shadow_model, shadow = copy.deepcopy((model, optimizer))
    for group in shadow.param_groups:
        group["lr"] = 1.0
    shadow_model.loss().backward()
    shadow.step()
    d = flat(model) - flat(shadow_model)
    params = list(model.parameters())[:2]
    mine = adam_update(optimizer, params, [g[:30], g[30:].view(4, 5)])
    assert torch.allclose(torch.cat([m.flatten() for m in mine]), d, rtol=1e-10, atol=1e-12)
    expected = float(d @ model.hessian @ d / (g @ d))
    record = probe_quadratic(model, SharpnessProbe("update", refine=12), optimizer)
    assert record["sharpness/critical_sharpness"] == pytest.approx(expected, rel=2e-4)
    state = optimizer.state_dict()
    probe_quadratic(model, SharpnessProbe("update"), optimizer)
    assert json.dumps(optimizer.state_dict(), default=str) == json.dumps(state, default=str)


def test_the_probe_hands_back_weights_and_the_training_grads():
    model = Quadratic()
    model.loss().backward()
    grads = [p.grad for p in model.parameters()]
    values = [g.clone() for g in grads]
    weights = [p.detach().clone() for p in model.parameters()]
    probe_quadratic(model, SharpnessProbe("gradient"))
    for param, grad, value, weight in zip(model.parameters(), grads, values, weights):
        assert param.grad is grad and torch.equal(grad, value)
        assert torch.equal(param.detach(), weight)


# ---------------------------------------------------------------------- relative sharpness
class TwoQuadratics(Quadratic):
    """The quadratic as the pretraining loss, and a second one as the downstream loss."""

    def __init__(self, downstream_optimum: torch.Tensor, downstream_hessian: torch.Tensor):
        super().__init__()
        self.register_buffer("optimum2", downstream_optimum)
        self.register_buffer("hessian2", downstream_hessian)

    def downstream_loss(self) -> torch.Tensor:
        d = torch.cat([self.a, self.b.flatten()]) - self.optimum2
        return 0.5 * d @ self.hessian2 @ d + 0.0 * self.gain.sum()


def two_quadratics(side: float) -> TwoQuadratics:
    """Downstream optimum at ``theta + side * (theta - theta_ref*)``-ish, curvature its own."""
    base = Quadratic()
    gen = torch.Generator().manual_seed(1)
    root = torch.randn(50, 50, generator=gen, dtype=torch.float64) / math.sqrt(50)
    hessian2 = root @ root.T + torch.eye(50, dtype=torch.float64)
    theta = flat(base)
    optimum2 = (
        theta
        + side * (theta - base.optimum)
        + 0.1 * torch.randn(50, generator=gen, dtype=torch.float64)
    )
    return TwoQuadratics(optimum2, hessian2)


def relative_probe(**kwargs) -> SharpnessProbe:
    return SharpnessProbe(
        "gradient",
        refine=12,
        downstream_data=[{"input_ids": torch.zeros(1, 1, dtype=torch.long)}],
        downstream_loss_fn=lambda module, batch: module.downstream_loss(),
        **kwargs,
    )


@pytest.mark.parametrize("relative_direction", ["gradient", "adam"])
def test_relative_sharpness_is_dHd_over_gd_with_H_g_the_pretraining_and_d_the_fine_tunes(
    relative_direction,
):
    model = two_quadratics(side=-0.5)  # the downstream optimum lies partly the same way
    g = gradient(model)  # of the pretraining (reference) loss
    g2 = model.hessian2 @ (flat(model) - model.optimum2)  # of the downstream loss
    # "adam": a fresh AdamW's first step per unit lr, g / (|g| + eps) + weight_decay * theta.
    adam = g2 / (g2.abs() + 1e-8) + 0.01 * flat(model)
    d = g2 if relative_direction == "gradient" else adam
    expected = float(d @ model.hessian @ d / (g @ d))
    assert float(g @ d) > 0  # a descent direction for the pretraining loss too
    record = probe_quadratic(model, relative_probe(relative_direction=relative_direction))
    assert record["sharpness/relative_critical_sharpness"] == pytest.approx(expected, rel=2e-4)
    assert record["sharpness/relative_critical_lr"] == pytest.approx(2 / expected, rel=2e-4)
    # Over every parameter: AdamW's decoupled decay also moves the gain (which no loss sees).
    gain_step = 0.01 * model.gain.detach() if relative_direction == "adam" else 0 * model.gain
    cosine = float(g @ d / (g.norm() * torch.cat([d, gain_step.detach()]).norm()))
    assert record["sharpness/relative_alignment"] == pytest.approx(cosine, rel=1e-9)
    # The probe's own view along the pretraining gradient is measured as before.
    own = float(g @ model.hessian @ g / (g @ g))
    assert record["sharpness/critical_sharpness"] == pytest.approx(own, rel=2e-4)


def test_a_fine_tuning_direction_that_raises_the_pretraining_loss_at_once_has_no_critical_step():
    model = two_quadratics(side=1.0)  # the downstream optimum lies the other way
    g = gradient(model)
    g2 = model.hessian2 @ (flat(model) - model.optimum2)
    assert float(g @ g2) < 0
    record = probe_quadratic(model, relative_probe())
    assert record["sharpness/relative_alignment"] < 0
    assert "sharpness/relative_critical_sharpness" not in record
    assert math.isfinite(record["sharpness/critical_sharpness"])  # no failure, no gap there


def test_the_relative_view_is_declared_and_not_watched_by_the_default_policy():
    declared = {s.key: s for s in relative_probe().signals()}
    for key in ("relative_critical_sharpness", "relative_critical_lr", "relative_alignment"):
        signal = declared[f"sharpness/{key}"]
        assert not signal.u_shaped and signal.rank is None
    assert not any("relative" in s.key for s in SharpnessProbe().signals())


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(direction="hessian"), "`direction` must be one of"),
        (dict(initial_step=0.0), "`initial_step` must be a finite number > 0"),
        (dict(initial_step=math.nan), "`initial_step` must be a finite number > 0"),
        (dict(refine=-1), "refine"),
        (dict(max_steps=1), "max_steps"),
        (dict(name="a/b"), "`name` must be"),
        (dict(relative_direction="update"), "`relative_direction` must be one of"),
        (dict(downstream_data=[], downstream_batches=0), "downstream"),
        (dict(downstream_loss_fn="ce"), "`downstream_loss_fn` must be callable"),
    ],
)
def test_bad_arguments_are_refused_with_the_argument_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SharpnessProbe(**kwargs)


def test_update_direction_without_an_adam_optimizer_fails_before_training():
    model = Quadratic()
    ctx = quadratic_context(model)
    with pytest.raises(ValueError, match=r"needs the training optimizer in ctx.extras"):
        SharpnessProbe("update").validate(ctx)
    ctx.extras["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"Adam or AdamW.*got SGD.*direction='gradient'"):
        SharpnessProbe("update").validate(ctx)
    ctx.extras["optimizer"] = torch.optim.Adam(model.parameters(), amsgrad=True)
    with pytest.raises(ValueError, match="AMSGrad"):
        SharpnessProbe("update").validate(ctx)


# ---------------------------------------------------------------------- in training
def fit(tmp_path, code_text, probes):
    recorder = LossRecorder()
    callbacks = [recorder]
    monitor = None
    if probes is not None:
        monitor = OvertrainingMonitor(
            reference_batches(code_text, n=2),
            every_n_steps=3,
            probes=probes,
            dirpath=tmp_path / "m",
            cooldown_steps=0,
        )
        callbacks.append(monitor)
    model = make_module()
    trainer = make_trainer(tmp_path, callbacks, max_steps=7)
    trainer.fit(model, train_loader(code_text[:16384], shuffle=True))
    return model, recorder.losses, monitor


def test_training_is_bit_identical_with_the_probe_on(tmp_path, code_text):
    plain_model, plain_losses, _ = fit(tmp_path / "plain", code_text, None)
    probes = [SharpnessProbe("update"), SharpnessProbe("gradient", name="sharpness_grad")]
    model, losses, monitor = fit(tmp_path / "probed", code_text, probes)
    assert losses == plain_losses
    for (name, value), plain in zip(model.state_dict().items(), plain_model.state_dict().values()):
        assert torch.equal(value, plain), name
    assert [r["step"] for r in monitor.history] == [3, 6]
    for record in monitor.history:
        assert record["probe_failures"] == 0
        for name in ("sharpness", "sharpness_grad"):
            value = record[f"{name}/critical_sharpness"]
            assert math.isfinite(value) and value > 0
            assert record[f"{name}/critical_lr"] == pytest.approx(2 / value)


@pytest.mark.slow
def test_two_processes_measure_the_same_critical_sharpness_as_one(tmp_path):
    (single,) = run(tmp_path, 1, "--sharpness")
    rank0, rank1 = run(tmp_path, 2, "--sharpness")
    assert untimed(rank0["history"]) == untimed(rank1["history"])  # the same steps on every rank
    assert len(single["history"]) == len(rank0["history"]) == 2
    for one, two in zip(single["history"], rank0["history"]):
        for name in ("sharpness", "sharpness_grad"):
            key = f"{name}/critical_sharpness"
            assert two[key] == pytest.approx(one[key], rel=1e-3), key
