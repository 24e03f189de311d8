"""The fine-tune probe: forgetting and adaptation, measured without training noticing."""

import json
import math
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import (
    CONTEXT,
    LossRecorder,
    make_module,
    make_trainer,
    reference_batches,
    train_loader,
)
from torch.utils.data import DataLoader, DistributedSampler

from lightning_overtrain import FineTuneProbe, NoiseProbe, OvertrainingMonitor, ProbeContext
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.losses import transformers_loss
from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.probes.finetune import tuned_lr
from lightning_overtrain.testing.demo import ByteWindows

LRS = (3e-4, 1e-3)


def raise_failure(what, exc):
    raise exc


def prose_batches(prose_text, n, start=0):
    data = ByteWindows(prose_text[start : start + CONTEXT * 8 * n], CONTEXT)
    return list(DataLoader(data, batch_size=8))


def context(module, code_text) -> ProbeContext:
    backup = ModelBackup(module)
    batches = reference_batches(code_text, n=2)
    return ProbeContext(
        module=module,
        backup=backup,
        sigmas=[0.0] * len(backup.params),
        batches=batches,
        weights=[b["input_ids"].numel() for b in batches],
        loss_fn=transformers_loss,
    )


def probe_once(module, code_text, probe) -> dict[str, float]:
    ctx = context(module, code_text)
    probe.validate(ctx)
    return measure_snapshot(ctx, [probe], raise_failure)


@pytest.fixture(scope="module")
def code_model(code_text):
    """The tiny GPT-2 after 60 AdamW steps on Python code."""
    model = make_module()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    for step, batch in enumerate(train_loader(code_text, batch_size=16)):
        loss = transformers_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 60:
            break
    model.zero_grad(set_to_none=True)
    return model


def enable_dropout(module, p=0.1):
    module.model.transformer.drop.p = p  # GPT-2 builds it with the config's 0.0


def token_accuracy(module, batch):
    logits = module(input_ids=batch["input_ids"]).logits[:, :-1]
    return (logits.argmax(-1) == batch["input_ids"][:, 1:]).float().mean()


# ---------------------------------------------------------------------- the science
def test_fine_tuning_code_model_on_prose_forgets_code_and_learns_prose(
    code_model, code_text, prose_text
):
    probe = FineTuneProbe(
        prose_batches(prose_text, 10), prose_batches(prose_text, 4, start=60_000), steps=10, lrs=LRS
    )
    record = probe_once(code_model, code_text, probe)
    forgetting = [record[f"finetune/lr={lr:g}/forgetting"] for lr in LRS]
    assert 0 < forgetting[0] < forgetting[1]  # forgets code, more at the larger lr
    for lr in LRS:
        key = f"finetune/lr={lr:g}/"
        after = record[key + "reference_loss_after"]
        assert forgetting[LRS.index(lr)] == pytest.approx(after - record["reference_loss"])
        assert record[key + "adaptation"] > 0  # and learns prose
        assert record[key + "downstream_loss_after"] == pytest.approx(
            record["finetune/downstream_loss_before"] - record[key + "adaptation"]
        )


def test_the_tuned_lr_view_reports_the_best_downstream_loss_its_lr_and_the_forgetting_there(
    code_model, code_text, prose_text
):
    lrs = (1e-4, 1e-3, 3e-2)
    probe = FineTuneProbe(
        prose_batches(prose_text, 10), prose_batches(prose_text, 4, start=60_000), steps=10, lrs=lrs
    )
    record = probe_once(code_model, code_text, probe)
    after = {lr: record[f"finetune/lr={lr:g}/downstream_loss_after"] for lr in lrs}
    best = min(after, key=after.get)
    assert record["finetune/tuned/lr"] == best
    assert record["finetune/tuned/downstream_loss_after"] == min(after.values())
    assert (
        record["finetune/tuned/reference_loss_after"]
        == (record[f"finetune/lr={best:g}/reference_loss_after"])
    )


def test_tuned_lr_picks_the_lowest_downstream_loss_and_the_smaller_lr_on_a_tie():
    results = {
        1e-3: {"downstream_loss": 1.5, "reference_loss": 3.0},
        1e-4: {"downstream_loss": 1.5, "reference_loss": 2.0},
        1e-2: {"downstream_loss": 1.7, "reference_loss": 4.0},
    }
    assert tuned_lr(results) == {
        "downstream_loss_after": 1.5,
        "lr": 1e-4,
        "reference_loss_after": 2.0,
    }
    results[1e-2]["downstream_loss"] = 1.0
    assert tuned_lr(results)["lr"] == 1e-2
    with pytest.raises(ValueError, match="`results` is empty"):
        tuned_lr({})


def test_a_torchmetric_and_a_callable_metric_are_reported_before_and_after(
    code_model, code_text, prose_text
):
    from torchmetrics.text import Perplexity

    held_out = prose_batches(prose_text, 2, start=60_000)
    train = prose_batches(prose_text, 2)
    perplexity = probe_once(
        code_model,
        code_text,
        FineTuneProbe(train, held_out, steps=2, lrs=1e-3, metric=Perplexity(ignore_index=-100)),
    )
    # Perplexity over next tokens is exp(mean loss): the metric saw the same batches.
    for when, key in (("before", "finetune/"), ("after", "finetune/lr=0.001/")):
        loss = perplexity[f"{key}downstream_loss_{when}"]
        assert perplexity[f"{key}metric_{when}"] == pytest.approx(math.exp(loss), rel=1e-5)
    accuracy = probe_once(
        code_model,
        code_text,
        FineTuneProbe(train, held_out, steps=2, lrs=1e-3, metric=token_accuracy),
    )
    expected = np.mean([float(token_accuracy(code_model.eval(), b)) for b in held_out])
    assert accuracy["finetune/metric_before"] == pytest.approx(expected)
    assert accuracy["finetune/lr=0.001/metric_after"] != accuracy["finetune/metric_before"]


# ---------------------------------------------------------------------- borrowing
def test_the_probe_hands_back_weights_grads_modes_and_rng(code_model, code_text, prose_text):
    model = make_module()
    model.load_state_dict(code_model.state_dict())
    enable_dropout(model)
    model.train()
    model.model.transformer.h[1].eval()
    transformers_loss(model, prose_batches(prose_text, 1)[0]).backward()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: (p.grad, p.grad.clone()) for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    # Iterating a DataLoader draws from the global RNG: build everything first.
    probe = FineTuneProbe(prose_batches(prose_text, 3), prose_batches(prose_text, 1), steps=3)
    ctx = context(model, code_text)
    random.seed(3)
    rng = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    probe.validate(ctx)
    measure_snapshot(ctx, [probe], raise_failure)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    for name, param in model.named_parameters():
        assert param.grad is grads[name][0] and torch.equal(param.grad, grads[name][1])
    assert [m.training for m in model.modules()] == modes
    assert random.getstate() == rng[0]
    assert np.array_equal(np.random.get_state()[1], rng[1])
    assert torch.equal(torch.get_rng_state(), rng[2])


def test_every_snapshot_sees_the_same_data_order_optimizer_and_dropout(
    code_model, code_text, prose_text
):
    model = make_module()
    model.load_state_dict(code_model.state_dict())
    enable_dropout(model)
    shuffled = DataLoader(ByteWindows(prose_text[:20_000], CONTEXT), batch_size=8, shuffle=True)
    probe = FineTuneProbe(shuffled, prose_batches(prose_text, 1, start=60_000), steps=4, lrs=LRS)
    first = probe_once(model, code_text, probe)
    torch.manual_seed(1234)  # neither the global RNG nor the previous fine-tune may matter
    second = measure_snapshot(context(model, code_text), [probe], raise_failure)
    assert first == second


def test_a_shuffling_loader_gives_the_same_batches_whatever_the_global_rng(code_text, prose_text):
    """So every DDP rank, and a resumed run, fine-tune on the same global batches."""
    shuffled = DataLoader(ByteWindows(prose_text[:20_000], CONTEXT), batch_size=8, shuffle=True)
    taken = []
    for global_seed in (1, 2):
        probe = FineTuneProbe(shuffled, prose_batches(prose_text, 1), steps=3)
        torch.manual_seed(global_seed)
        probe.validate(context(make_module(), code_text))
        taken.append(torch.cat([b["input_ids"] for b in probe._train.local]))
    assert torch.equal(taken[0], taken[1])
    in_order = torch.cat([b["input_ids"] for b in prose_batches(prose_text, 3)])
    assert not torch.equal(taken[0], in_order)  # it did shuffle


def test_dropout_during_the_fine_tune_follows_the_probe_seed(code_model, code_text, prose_text):
    model = make_module()
    model.load_state_dict(code_model.state_dict())
    enable_dropout(model, p=0.5)
    train, held_out = prose_batches(prose_text, 2), prose_batches(prose_text, 1, start=60_000)
    key = "finetune/lr=0.001/forgetting"
    results = [
        probe_once(model, code_text, FineTuneProbe(train, held_out, steps=2, lrs=1e-3, seed=s))[key]
        for s in (0, 0, 1)
    ]
    assert results[0] == results[1] != results[2]


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), r"`steps` must be an int >= 1, got 0"),
        (dict(steps=-3), r"`steps` must be an int >= 1, got -3"),
        (dict(steps=2.5), r"`steps` must be an int >= 1, got 2.5"),
        (dict(lrs=0.0), r"`lrs` must be one or more learning rates > 0, got \(0.0,\)"),
        (dict(lrs=(1e-3, -1e-4)), r"`lrs` must be one or more learning rates > 0"),
        (dict(lrs=(float("nan"),)), r"`lrs` must be one or more learning rates > 0"),
        (dict(lrs=()), r"`lrs` must be one or more"),
        (dict(lrs=(1e-3, 1e-3)), r"`lrs` has duplicates"),
        (dict(train_data=[]), r"`train_data` is empty"),
        (dict(eval_data="text.txt"), r"`eval_data` must be a DataLoader, a list of batches"),
        (dict(metric=3), r"`metric` must be a torchmetrics Metric or a callable"),
        (dict(optimizer="adamw"), r"`optimizer` must be callable or None"),
        (dict(eval_batches=0), r"`eval_batches` must be an int >= 1 or None, got 0"),
        (dict(name="fine tune"), r"`name` must be a non-empty string without '/' or spaces"),
    ],
)
def test_bad_arguments_are_refused_with_the_argument_named(kwargs, match):
    batch = {"input_ids": torch.zeros(2, CONTEXT, dtype=torch.long)}
    settings = {"train_data": [batch], "eval_data": [batch], **kwargs}
    with pytest.raises(ValueError, match=match):
        FineTuneProbe(**settings)


def ids(rows=2, value=1, length=CONTEXT):
    return {"input_ids": torch.full((rows, length), value, dtype=torch.long)}


def failing_metric(module, batch):
    raise KeyError("labels")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(train_data=lambda: iter([])), r"`train_data` yielded no batches"),
        (dict(eval_data=lambda: DataLoader([], batch_size=2)), r"`eval_data` yielded no batches"),
        (
            dict(eval_data=[(torch.ones(2, CONTEXT, dtype=torch.long),)]),
            r"`train_data` and `eval_data` batches differ",
        ),
        (
            dict(eval_data=[{"input_ids": torch.ones(2, CONTEXT, dtype=torch.long), "x": 1}]),
            r"`train_data` and `eval_data` batches differ",
        ),
        (dict(train_data=[ids(value=300)]), r"failed on the first batch of `train_data`"),
        (
            dict(
                train_data=[{**ids(), "attention_mask": torch.ones(3, CONTEXT)}],
                eval_data=[{**ids(), "attention_mask": torch.ones(2, CONTEXT)}],
            ),
            r"`train_data\[0\]` must hold tensors that share their first dimension",
        ),
        (dict(metric=failing_metric), r"`metric` failed on the first `eval_data` batch: KeyError"),
        (dict(optimizer=lambda params, lr: None), r"must return a torch.optim.Optimizer"),
        (dict(eval_data=[{"input_ids": torch.ones(0, CONTEXT, dtype=torch.long)}]), r"0 tokens"),
    ],
)
def test_downstream_data_that_cannot_work_fails_before_training(kwargs, match, code_text):
    settings = {"train_data": [ids()], "eval_data": [ids()], "steps": 2, **kwargs}
    probe = FineTuneProbe(**settings)
    with pytest.raises(ValueError, match=match):
        probe.validate(context(make_module(), code_text))


# ---------------------------------------------------------------------- in a Trainer
class ExplodesAboveLr(torch.optim.SGD):
    """SGD that writes NaN into the weights when its lr is above 1e-2."""

    def step(self, closure=None):
        super().step(closure)
        if self.param_groups[0]["lr"] > 1e-2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))


def explodes_above_lr(params, lr):
    return ExplodesAboveLr(params, lr=lr)


def fit(tmp_path, code_text, callbacks, max_steps=8):
    model = make_module()
    enable_dropout(model)  # every step draws from the global RNG: a leak would show
    recorder = LossRecorder()
    trainer = make_trainer(tmp_path, [*callbacks, recorder], max_steps=max_steps)
    trainer.fit(model, train_loader(code_text[:8192], shuffle=True))
    return model, trainer, recorder.losses


def test_training_is_bit_identical_and_a_nan_lr_is_logged_and_skipped(
    tmp_path, code_text, prose_text
):
    plain_model, _, plain_losses = fit(tmp_path / "plain", code_text, [])
    prose = prose_batches(prose_text, 3)
    probe = FineTuneProbe(
        DataLoader(ByteWindows(prose_text[:8192], CONTEXT), batch_size=8, shuffle=True),
        prose[:1],
        steps=3,
        lrs=(1e-3, 1.0),
        optimizer=explodes_above_lr,
    )
    monitor = OvertrainingMonitor(
        reference_batches(code_text, n=2), every_n_steps=3, probes=[probe], dirpath=tmp_path / "m"
    )
    failure = r"finetune probe failed.*lr=1: the fine-tune at lr=1 failed at step 2 of 3: non-fin"
    with pytest.warns(UserWarning, match=failure):
        model, _, losses = fit(tmp_path / "mon", code_text, [monitor])
    assert losses == plain_losses
    for (name, value), plain in zip(model.state_dict().items(), plain_model.state_dict().values()):
        assert torch.equal(value, plain), name
    assert [r["probe_failures"] for r in monitor.history] == [1, 2]
    for record in monitor.history:
        assert "finetune/lr=1/forgetting" not in record
        assert math.isfinite(record["finetune/lr=0.001/forgetting"])  # the other lr is kept
        assert record["finetune/tuned/lr"] == 1e-3  # tuned over the lrs that ran


# ---------------------------------------------------------------------- DDP
class RankData(pl.LightningDataModule):
    """The same global batches of 16 for any number of ranks."""

    def __init__(self, text: bytes, devices: int) -> None:
        super().__init__()
        self.text, self.devices = text, devices

    def train_dataloader(self):
        data = ByteWindows(self.text, CONTEXT)
        rank = self.trainer.global_rank
        sampler = DistributedSampler(data, num_replicas=self.devices, rank=rank, shuffle=False)
        return DataLoader(data, batch_size=16 // self.devices, sampler=sampler)


class SaveHistory(pl.Callback):
    def __init__(self, monitor: OvertrainingMonitor, out) -> None:
        self.monitor, self.out = monitor, out

    def on_train_end(self, trainer, pl_module):
        path = self.out / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"history": self.monitor.history}))


def fails_on_rank_one(module, batch):
    if module.training and torch.distributed.is_initialized() and torch.distributed.get_rank():
        raise RuntimeError("only rank 1 fails")
    return transformers_loss(module, batch)


def fit_on(devices, tmp_path, code_text, prose_text):
    from torchmetrics.text import Perplexity

    out = tmp_path / f"devices{devices}"
    out.mkdir()
    prose = prose_batches(prose_text, 6)
    # Odd sizes on purpose: 3 reference and 3 held-out batches, cooldown batches of 7 rows.
    cooldown = DataLoader(ByteWindows(code_text[-CONTEXT * 14 :], CONTEXT), batch_size=7)
    monitor = OvertrainingMonitor(
        reference_batches(code_text, n=3),
        every_n_steps=2,
        probes=[
            NoiseProbe(gammas=(1.0,), pairs=2, per_layer=True),
            FineTuneProbe(
                prose[:3], prose[3:], steps=3, lrs=1e-3, metric=Perplexity(ignore_index=-100)
            ),
            FineTuneProbe(prose[:2], prose[3:], steps=2, loss_fn=fails_on_rank_one, name="flaky"),
        ],
        cooldown_steps=2,
        cooldown_data=cooldown,
        dirpath=out,
    )
    trainer = make_trainer(
        out,
        [monitor, SaveHistory(monitor, out)],
        max_steps=4,
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        use_distributed_sampler=False,
    )
    trainer.fit(make_module(), datamodule=RankData(code_text[: 16 * CONTEXT * 4], devices))
    return [json.loads((out / f"rank{r}.json").read_text())["history"] for r in range(devices)]


@pytest.mark.slow
def test_two_processes_fine_tune_and_cool_down_like_one_and_survive_a_one_rank_failure(
    tmp_path, code_text, prose_text
):
    (single,) = fit_on(1, tmp_path, code_text, prose_text)
    rank0, rank1 = fit_on(2, tmp_path, code_text, prose_text)
    assert len(single) == len(rank0) == 2
    keys = [
        k
        for k in single[0]
        if k.startswith(("finetune/", "cooldown/", "reference_loss", "noise/gamma=1/layer="))
    ]
    assert {"finetune/lr=0.001/metric_after", "cooldown/train_loss"} <= set(keys)
    for one, two, other in zip(single, rank0, rank1):
        for key in keys:
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key
            assert other[key] == two[key], key
        # The probe that failed on rank 1 only was skipped on both ranks, without a hang.
        assert "flaky/lr=0.001/forgetting" in one and "flaky/lr=0.001/forgetting" not in two
    assert [r["probe_failures"] for r in rank0] == [r["probe_failures"] for r in rank1] == [1, 2]


# ---------------------------------------------------------------------- matched loss
def fixed_budget(code_model, code_text, prose_text, steps, **kwargs):
    probe = FineTuneProbe(
        prose_batches(prose_text, 10),
        prose_batches(prose_text, 2, start=60_000),
        steps=steps,
        lrs=(1e-3,),
        **kwargs,
    )
    return probe_once(code_model, code_text, probe)


def test_matched_forgetting_is_read_at_the_first_step_that_reaches_the_target(
    code_model, code_text, prose_text
):
    key = "finetune/lr=0.001/"
    trajectory = [fixed_budget(code_model, code_text, prose_text, k) for k in range(1, 7)]
    downstream = [r[key + "downstream_loss_after"] for r in trajectory]
    assert downstream == sorted(downstream, reverse=True)  # the fine-tune learns, step by step
    target = (downstream[2] + downstream[3]) / 2  # reached at step 4, not before
    weights = [p.detach().clone() for p in code_model.parameters()]
    record = fixed_budget(code_model, code_text, prose_text, 2, matched_loss=target)
    assert record[key + "matched_reached"] == 1.0
    assert record[key + "matched_steps"] == 4.0  # past the 2-step budget, within 4 x 2
    # The very trajectory a 4-step fine-tune follows: the same forgetting, bit for bit.
    assert record[key + "matched_forgetting"] == trajectory[3][key + "forgetting"]
    # The fixed-budget numbers are those of the 2-step fine-tune without the matched view.
    for name, value in trajectory[1].items():
        assert record[name] == value, name
    assert all(torch.equal(p, w) for p, w in zip(code_model.parameters(), weights))


def test_a_target_out_of_reach_within_the_cap_is_reported_not_reached(
    code_model, code_text, prose_text
):
    record = fixed_budget(
        code_model, code_text, prose_text, 2, matched_loss=0.01, matched_max_steps=3
    )
    assert record["finetune/lr=0.001/matched_reached"] == 0.0
    assert "finetune/lr=0.001/matched_forgetting" not in record
    assert "finetune/lr=0.001/matched_steps" not in record
    assert math.isfinite(record["finetune/lr=0.001/forgetting"])  # the fixed view still ran


def test_a_snapshot_already_at_the_target_needs_no_steps_and_forgets_nothing(
    code_model, code_text, prose_text
):
    record = fixed_budget(code_model, code_text, prose_text, 2, matched_loss=50.0)
    assert record["finetune/lr=0.001/matched_steps"] == 0.0
    assert record["finetune/lr=0.001/matched_forgetting"] == 0.0


def test_the_matched_view_is_declared_per_lr_and_watched_by_no_default_policy(prose_text):
    batches = prose_batches(prose_text, 2)
    probe = FineTuneProbe(batches, batches, steps=2, lrs=LRS, matched_loss=2.0)
    declared = {s.key: s for s in probe.signals()}
    for lr in LRS:
        for quantity in ("matched_forgetting", "matched_steps"):
            signal = declared[f"finetune/lr={lr:g}/{quantity}"]
            assert not signal.u_shaped and signal.rank is None
    plain = FineTuneProbe(batches, batches, steps=2, lrs=LRS)
    assert not any("matched" in s.key for s in plain.signals())
    assert probe.config()["matched_max_steps"] == 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(matched_loss=-1.0), "`matched_loss`"),
        (dict(matched_loss="low"), "`matched_loss`"),
        (dict(matched_loss=2.0, matched_max_steps=0), "`matched_max_steps`"),
    ],
)
def test_bad_matched_arguments_are_refused_by_name(prose_text, kwargs, match):
    batches = prose_batches(prose_text, 1)
    with pytest.raises(ValueError, match=match):
        FineTuneProbe(batches, batches, steps=2, **kwargs)
