"""The engine's contract, in one process: what every probe, built-in or user-written, relies on."""

import random

import numpy as np
import pytest
import torch
from conftest import quadratic_context
from test_noise import Quadratic
from torch import nn

from lightning_overtrain.engine.backup import ModelBackup, borrowed, presented
from lightning_overtrain.engine.contract import Probe
from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.probes.noise import NoiseProbe


def raise_failure(what, exc):
    raise exc


class Vandal(Probe):
    """Perturbs the weights in place, switches to train mode and grad, leaves grads: no cleanup."""

    name = "vandal"

    def run(self, ctx):
        with torch.no_grad():
            for param in ctx.backup.params:
                param.add_(1.0)
        for buffer in ctx.backup.buffers:
            buffer.mul_(2.0)
        ctx.module.train()
        torch.set_grad_enabled(True)
        ctx.module.loss().backward()
        return {"vandal/loss": float(ctx.module.loss().detach())}


class Looks(Probe):
    """Records what it is handed: the weights, buffers, mode, grad mode and grads."""

    name = "looks"

    def __init__(self) -> None:
        self.seen = None

    def run(self, ctx):
        self.seen = {
            "params": [p.detach().clone() for p in ctx.backup.params],
            "buffers": [b.clone() for b in ctx.backup.buffers],
            "training": ctx.module.training,
            "grad_enabled": torch.is_grad_enabled(),
            "grads": [p.grad for p in ctx.backup.params],
        }
        return {"looks/loss": float(ctx.module.loss())}


class RaisesHalfway(Vandal):
    name = "raises_halfway"

    def run(self, ctx):
        super().run(ctx)
        raise RuntimeError("halfway")


@pytest.mark.parametrize("vandal", [Vandal(), RaisesHalfway()], ids=["returns", "raises"])
def test_each_probe_starts_from_the_live_weights_whatever_the_one_before_did(vandal):
    model = Quadratic()
    live = [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]
    looks = Looks()
    failures = []
    record = measure_snapshot(
        quadratic_context(model), [vandal, looks], lambda what, exc: failures.append(what)
    )
    assert failures == (["raises_halfway"] if isinstance(vandal, RaisesHalfway) else [])
    seen = looks.seen
    assert all(torch.equal(a, b) for a, b in zip(seen["params"] + seen["buffers"], live))
    assert not seen["training"] and not seen["grad_enabled"]
    assert all(g is None for g in seen["grads"])
    assert record["looks/loss"] == pytest.approx(record["reference_loss"])
    assert all(torch.equal(a, b) for a, b in zip([*model.parameters(), *model.buffers()], live))


def test_the_noise_probe_after_a_vandal_measures_what_it_measures_alone():
    alone = measure_snapshot(quadratic_context(Quadratic()), [NoiseProbe(pairs=2)], raise_failure)
    after = measure_snapshot(
        quadratic_context(Quadratic()), [Vandal(), NoiseProbe(pairs=2)], raise_failure
    )
    assert {k: v for k, v in after.items() if not k.startswith("vandal/")} == alone


# ---------------------------------------------------------------------- borrowed()
def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))


class SaveFails(ModelBackup):
    def save(self) -> None:
        next(iter(self._param_copies)).fill_(float("nan"))  # a partial copy, then a fault
        raise RuntimeError("out of memory while saving the backup")


def test_a_backup_that_cannot_be_saved_loses_nothing():
    model = small_model()
    model.train()
    model[2].eval()
    model(torch.randn(16, 4)).sum().backward()
    grads = [p.grad for p in model.parameters()]
    values = [g.clone() for g in grads]
    weights = [t.clone() for t in model.state_dict().values()]
    random.seed(3)
    rng = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    with pytest.raises(RuntimeError, match="out of memory"), borrowed(model, SaveFails(model)):
        pytest.fail("the block must not run when the borrow could not be set up")
    for param, grad, value in zip(model.parameters(), grads, values):
        assert param.grad is grad and torch.equal(grad, value)
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    assert torch.is_grad_enabled()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), weights))
    assert random.getstate() == rng[0] and torch.equal(torch.get_rng_state(), rng[2])
    assert not model._state_dict_hooks  # nothing left redirecting the state dict


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: two names, one tensor


def test_while_lent_the_state_dict_shows_the_live_weights_and_buffers():
    model = TiedLM()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    assert "head.weight" in live and "norm.running_mean" in live
    backup = ModelBackup(model)
    with borrowed(model, backup):
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.add_(1)
        for state in (model.state_dict(), nn.ModuleDict({"lm": model}).state_dict()):
            for key, value in state.items():
                assert torch.equal(value, live[key.removeprefix("lm.")]), key
        # Inside a nested borrow (probes on a cooled branch) the outer, live copy is shown.
        with borrowed(model, ModelBackup(model)):
            assert torch.equal(model.state_dict()["embed.weight"], live["embed.weight"])
        assert not torch.equal(model.embed.weight, live["embed.weight"])  # the probe's own view
    assert not model._state_dict_hooks
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())


def test_presented_shows_a_saved_copy_without_touching_the_module():
    model = TiedLM()
    backup = ModelBackup(model)
    backup.save()
    saved = model.embed.weight.detach().clone()
    with torch.no_grad():
        model.embed.weight.mul_(3)
    current = model.embed.weight.detach().clone()
    with presented(model, backup):
        assert torch.equal(model.state_dict()["head.weight"], saved)
    assert torch.equal(model.embed.weight, current)
    assert torch.equal(model.state_dict()["embed.weight"], current)
