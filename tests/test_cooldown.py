"""The cooldown branch: anneal a copy of the run, probe it, hand the live run back untouched."""

import copy
import math

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
from torch import nn
from torch.utils.data import DataLoader

from lightning_overtrain import FineTuneProbe, NoiseProbe, OvertrainingMonitor
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.contract import ProbeContext, ProbeFailure
from lightning_overtrain.engine.losses import transformers_loss
from lightning_overtrain.probes.cooldown import CooldownBranch, copy_optimizer
from lightning_overtrain.testing.demo import ByteWindows


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)


def regression_loss(module, batch):
    return ((module.linear(batch[:, :4]).squeeze(-1) - batch[:, 4]) ** 2).mean()


def regression_setup():
    torch.manual_seed(0)
    model = Regression()
    batches = [torch.randn(6, 5) for _ in range(3)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.8, 0.9))
    for batch in batches:  # the training optimizer has state and a step count
        optimizer.zero_grad()
        regression_loss(model, batch).backward()
        optimizer.step()
    backup = ModelBackup(model)
    ctx = ProbeContext(model, backup, [0.0, 0.0], [batches[0]], [6], regression_loss)
    return model, optimizer, batches, ctx


def test_the_branch_steps_a_copy_of_the_optimizer_with_lr_decayed_linearly_to_zero():
    model, optimizer, batches, ctx = regression_setup()
    # The reference: the same steps taken by hand on deep copies of model and optimizer.
    ref_model, ref_optimizer = copy.deepcopy((model, optimizer))
    for i in range(5):
        ref_optimizer.param_groups[0]["lr"] = 0.05 * (5 - i) / 5
        ref_optimizer.zero_grad()
        regression_loss(ref_model, batches[i % 3]).backward()
        ref_optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    objects = {id(p): dict(s) for p, s in optimizer.state.items()}
    branch = CooldownBranch(model, batches, steps=5, tokens_fn=lambda b: b.shape[0])
    with branch.branch(ctx, optimizer) as metrics:
        for name, value in model.named_parameters():
            assert torch.allclose(value, ref_model.state_dict()[name], atol=1e-7), name
        assert not torch.equal(model.linear.weight, before["linear.weight"])
        # A checkpoint written now holds the live run, not the branch.
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())
    assert metrics["cooldown/train_loss"] > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert optimizer.param_groups[0]["lr"] == 0.05
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            assert value is objects[id(param)][key] and torch.equal(value, state[id(param)][key])


def test_a_non_finite_branch_fails_on_every_rank_and_hands_back_the_weights():
    model, optimizer, _, ctx = regression_setup()
    before = [p.detach().clone() for p in model.parameters()]
    bad = [torch.full((6, 5), float("nan"))]
    branch = CooldownBranch(model, bad, steps=2, tokens_fn=lambda b: b.shape[0])
    with (
        pytest.raises(ProbeFailure, match="cooldown branch failed at step 1 of 2: non-finite"),
        branch.branch(ctx, optimizer),
    ):
        pass
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class NeedsAName(torch.optim.SGD):
    def __init__(self, params, name, lr=0.1):
        super().__init__(params, lr=lr)
        self.name = name


def test_an_optimizer_that_cannot_be_rebuilt_is_refused_with_the_fix():
    model = Regression()
    with pytest.raises(ValueError, match=r"cannot build a copy of the training optimizer"):
        copy_optimizer(NeedsAName(model.parameters(), "mine"))


def test_cooldown_steps_must_be_positive():
    with pytest.raises(ValueError, match=r"`cooldown_steps` must be an int >= 1, got 0"):
        CooldownBranch(Regression(), [torch.zeros(2, 5)], steps=0)


# ---------------------------------------------------------------------- in a Trainer
def prose_batches(prose_text, n, start=0):
    data = ByteWindows(prose_text[start : start + CONTEXT * 8 * n], CONTEXT)
    return list(DataLoader(data, batch_size=8))


def monitor(code_text, prose_text, dirpath, **kwargs):
    settings = dict(
        every_n_steps=3,
        probes=[
            NoiseProbe(gammas=(1.0,), pairs=2, per_layer=True),
            FineTuneProbe(prose_batches(prose_text, 2), prose_batches(prose_text, 1), steps=2),
        ],
        cooldown_steps=2,
        cooldown_data=DataLoader(ByteWindows(code_text[-20_000:], CONTEXT), batch_size=8),
        dirpath=dirpath,
    )
    settings.update(kwargs)
    return OvertrainingMonitor(reference_batches(code_text, n=2), **settings)


def fit(tmp_path, text, callbacks, dropout=0.0, loader=None, model=None, ckpt_path=None, **kw):
    model = model or make_module()
    model.model.transformer.drop.p = dropout  # > 0: every step draws from the global RNG
    recorder = LossRecorder()
    settings = dict(max_steps=8, gradient_clip_val=0.5)
    settings.update(kw)
    trainer = make_trainer(tmp_path, [*callbacks, recorder], **settings)
    trainer.fit(model, loader or train_loader(text[:8192], shuffle=True), ckpt_path=ckpt_path)
    return model, trainer, recorder.losses


def test_training_is_bit_identical_with_cooldown_and_fine_tune_probes_on(
    tmp_path, code_text, prose_text
):
    plain_model, plain_trainer, plain_losses = fit(tmp_path / "plain", code_text, [], dropout=0.1)
    mon = monitor(code_text, prose_text, tmp_path / "m")
    model, trainer, losses = fit(tmp_path / "mon", code_text, [mon], dropout=0.1)
    assert losses == plain_losses
    for (name, value), plain in zip(model.state_dict().items(), plain_model.state_dict().values()):
        assert torch.equal(value, plain), name
    state, plain_state = (
        trainer.optimizers[0].state_dict(),
        plain_trainer.optimizers[0].state_dict(),
    )
    assert state["param_groups"] == plain_state["param_groups"]
    for key, fields in state["state"].items():
        for field, value in fields.items():
            assert torch.equal(value, plain_state["state"][key][field]), (key, field)
    assert len(mon.history) == 2 and mon.probe_failures == 0
    for record in mon.history:
        # Early in training, annealing on more pretraining text lowers the loss.
        assert record["reference_loss"] < record["cooldown/raw_reference_loss"]
        assert math.isfinite(record["finetune/lr=0.001/forgetting"])
        assert "noise/gamma=1/layer=h.1/delta" in record


def nan_when_training(module, batch):
    loss = transformers_loss(module, batch)
    return loss * float("nan") if module.training else loss


def test_a_failing_cooldown_is_logged_and_skipped_with_the_raw_loss_kept(
    tmp_path, code_text, prose_text
):
    _, _, plain_losses = fit(tmp_path / "plain", code_text, [])
    mon = monitor(code_text, prose_text, tmp_path / "m", loss_fn=nan_when_training)
    with pytest.warns(UserWarning, match="the cooldown probe failed.*cooldown branch failed"):
        _, _, losses = fit(tmp_path / "mon", code_text, [mon])
    assert losses == plain_losses
    assert [r["probe_failures"] for r in mon.history] == [1, 2]
    for record in mon.history:
        assert math.isfinite(record["cooldown/raw_reference_loss"])
        assert "reference_loss" not in record and "noise/gamma=1/delta" not in record


def test_a_resumed_run_with_a_cooldown_continues_the_same_history(tmp_path, code_text, prose_text):
    text = code_text[: CONTEXT * 8 * 4]  # 4 steps an epoch: resume at an epoch boundary

    def run(name, max_epochs, model=None, ckpt_path=None):
        mon = monitor(code_text, prose_text, tmp_path / name, every_n_steps=2)
        loader = train_loader(text)
        _, trainer, losses = fit(
            tmp_path / name,
            text,
            [mon],
            loader=loader,
            model=model,
            ckpt_path=ckpt_path,
            max_steps=-1,
            max_epochs=max_epochs,
        )
        return mon, trainer, losses

    full, _, full_losses = run("full", 2)
    _, trainer, first_losses = run("first", 1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed, _, resumed_losses = run("resumed", 2, make_module(seed=7), tmp_path / "half.ckpt")
    assert first_losses + resumed_losses == full_losses

    assert len(full.history) == 4
    assert history_text(resumed.history) == history_text(full.history)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cooldown_steps=-1), r"`cooldown_steps` must be an int >= 0, got -1"),
        (dict(cooldown_data=None), r"`cooldown_steps=2` and `cooldown_data` go together"),
        (dict(cooldown_steps=0), r"`cooldown_steps=0` and `cooldown_data` go together"),
    ],
)
def test_bad_cooldown_arguments_are_refused(kwargs, match, code_text, prose_text, tmp_path):
    with pytest.raises(ValueError, match=match):
        monitor(code_text, prose_text, tmp_path, **kwargs)


@pytest.mark.parametrize(
    "data, match",
    [
        (lambda: [], r"`cooldown_data` yielded no batches"),
        ([{"input_ids": torch.full((2, CONTEXT), 999)}], r"first batch of `cooldown_data`"),
    ],
)
def test_cooldown_data_that_cannot_work_fails_before_training(
    data, match, code_text, prose_text, tmp_path
):
    mon = monitor(code_text, prose_text, tmp_path / "m", cooldown_data=data)
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, code_text, [mon])
