"""Checkpoints written while a probe holds the model hold the live run; kept snapshots are
what was measured, and say so (tokens, settings) to the CLI."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
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
from torch.utils.data import DataLoader

from lightning_overtrain.callbacks.monitor import OvertrainingMonitor
from lightning_overtrain.cli.series import (
    LIGHTNING,
    Checkpoint,
    read_metadata,
    tokens_from_checkpoint,
)
from lightning_overtrain.engine.contract import Probe
from lightning_overtrain.engine.losses import transformers_loss
from lightning_overtrain.probes.finetune import FineTuneProbe
from lightning_overtrain.probes.noise import NoiseProbe
from lightning_overtrain.testing.demo import ByteWindows

N_REF = 2  # reference batches: the loss is called this many times per evaluation
COOLDOWN = 2


def noise_monitor(code_text: bytes, tmp_path, **kwargs) -> OvertrainingMonitor:
    """A monitor with one noise probe, snapshotting every 3 steps."""
    return OvertrainingMonitor(
        reference_batches(code_text, n=N_REF),
        every_n_steps=3,
        probes=[NoiseProbe(gammas=(1.0,), pairs=2)],
        dirpath=tmp_path / "mon",
        **kwargs,
    )


def live_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers as they are now, by state-dict name."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers()]
    return {name: t.detach().clone() for name, t in named}


class CheckpointInside:
    """A loss function that, once armed, writes checkpoints at its ``at``-th call.

    The call is inside whatever holds the model then (a probe's perturbed evaluation,
    a fine-tune step, the cooldown branch): what a SLURM requeue handler would write.
    """

    def __init__(self, dirpath, at: int) -> None:
        self.dirpath, self.at = dirpath, at
        self.trainer: pl.Trainer | None = None
        self.calls: int | None = None  # None: not armed
        self.held: dict[str, torch.Tensor] = {}

    def __call__(self, module, batch):
        if self.calls is not None:
            if self.calls == self.at:
                self.held = live_tensors(module)
                self.trainer.save_checkpoint(os.path.join(self.dirpath, "inside.ckpt"))
                self.trainer.save_checkpoint(
                    os.path.join(self.dirpath, "inside-weights.ckpt"), weights_only=True
                )
            self.calls += 1
        return transformers_loss(module, batch)


class SnapshotAt(pl.Callback):
    """At one step, remember the live weights and the monitor's state, then snapshot."""

    def __init__(self, monitor: OvertrainingMonitor, saver: CheckpointInside, step: int) -> None:
        self.monitor, self.saver, self.step = monitor, saver, step
        self.live: dict[str, torch.Tensor] = {}
        self.state_before: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        self.live = live_tensors(pl_module)
        self.state_before = json.loads(json.dumps(self.monitor.state_dict()))
        self.saver.trainer, self.saver.calls = trainer, 0
        self.monitor.snapshot(trainer, pl_module)
        self.saver.calls = None


def prose_batches(prose_text, n):
    return list(DataLoader(ByteWindows(prose_text[: CONTEXT * 8 * n], CONTEXT), batch_size=8))


def fit_with_checkpoint_inside(tmp_path, code_text, at, *, probes, **monitor_kwargs):
    saver = CheckpointInside(tmp_path, at)
    monitor = OvertrainingMonitor(
        reference_batches(code_text, n=N_REF),
        every_n_steps=3,  # one snapshot before, so the monitor's state is not empty
        probes=probes(saver),
        loss_fn=saver,
        dirpath=tmp_path / "mon",
        **monitor_kwargs,
    )
    driver = SnapshotAt(monitor, saver, step=5)
    recorder = LossRecorder()
    trainer = make_trainer(tmp_path, [monitor, driver, recorder], max_steps=5)
    trainer.fit(make_module(), train_loader(code_text, shuffle=True))
    assert saver.held, "the checkpoint was never written"
    assert any(not torch.equal(saver.held[k], v) for k, v in driver.live.items()), (
        "the model was not borrowed when the checkpoint was written"
    )
    assert monitor.probe_failures == 0 and len(monitor.history) == 2
    return monitor, driver, recorder.losses


def assert_holds_the_live_run(tmp_path, monitor, driver) -> None:
    for name in ("inside.ckpt", "inside-weights.ckpt"):
        saved = torch.load(tmp_path / name, weights_only=False)
        assert saved["state_dict"].keys() == driver.live.keys()
        for key, value in saved["state_dict"].items():
            assert torch.equal(value, driver.live[key]), (name, key)
    state = torch.load(tmp_path / "inside.ckpt", weights_only=False)["callbacks"]
    assert json.loads(json.dumps(state[monitor.state_key])) == driver.state_before
    assert len(driver.state_before["history"]) == 1  # the snapshot in progress is not in it


def noise_probes(saver):
    return [NoiseProbe(gammas=(1.0,), pairs=2)]


def test_a_checkpoint_during_the_noise_probe_holds_the_live_weights_and_state(tmp_path, code_text):
    plain = LossRecorder()
    make_trainer(tmp_path / "plain", [plain], max_steps=5).fit(
        make_module(), train_loader(code_text, shuffle=True)
    )
    # Calls 0..N_REF-1: the reference loss; call N_REF: the first perturbed evaluation.
    monitor, driver, losses = fit_with_checkpoint_inside(
        tmp_path, code_text, N_REF, probes=noise_probes
    )
    assert_holds_the_live_run(tmp_path, monitor, driver)
    assert losses == plain.losses


def test_a_checkpoint_during_a_fine_tune_holds_the_live_weights_and_state(
    tmp_path, code_text, prose_text
):
    def probes(saver):
        # The same loss: N_REF calls for the reference loss, 1 for the evaluation before,
        # then the fine-tune's steps; the second one runs on fine-tuned weights.
        finetune = FineTuneProbe(
            prose_batches(prose_text, 2), prose_batches(prose_text, 1), steps=2, loss_fn=saver
        )
        return [finetune]

    monitor, driver, _ = fit_with_checkpoint_inside(tmp_path, code_text, N_REF + 2, probes=probes)
    assert_holds_the_live_run(tmp_path, monitor, driver)


@pytest.mark.parametrize(
    "at",
    [N_REF + 1, 2 * N_REF + COOLDOWN],
    ids=["during the branch's training", "during a probe of the cooled weights"],
)
def test_a_checkpoint_during_the_cooldown_holds_the_live_weights_not_the_branch(
    tmp_path, code_text, at
):
    # Calls: N_REF raw reference loss, COOLDOWN branch steps (the second on annealed weights),
    # N_REF reference loss of the cooled weights, then the probe's perturbed evaluations.
    monitor, driver, _ = fit_with_checkpoint_inside(
        tmp_path,
        code_text,
        at,
        probes=noise_probes,
        cooldown_steps=COOLDOWN,
        cooldown_data=DataLoader(ByteWindows(code_text[-20_000:], CONTEXT), batch_size=8),
    )
    assert_holds_the_live_run(tmp_path, monitor, driver)


# ---------------------------------------------------------------------- the kept snapshot
class KeepsWhatItMeasures(Probe):
    """Remembers the weights the probes measured at each snapshot, by tokens."""

    name = "keeps"

    def __init__(self) -> None:
        self.measured: dict[int, dict[str, torch.Tensor]] = {}
        self.tokens = 0

    def run(self, ctx):
        self.measured[len(self.measured)] = live_tensors(ctx.module)
        return {}


def test_with_a_cooldown_the_kept_snapshot_is_the_cooled_weights_that_were_measured(
    tmp_path, code_text
):
    keeps = KeepsWhatItMeasures()
    monitor = OvertrainingMonitor(
        reference_batches(code_text, n=N_REF),
        every_n_steps=3,
        probes=[NoiseProbe(gammas=(1.0,), pairs=2), keeps],
        cooldown_steps=COOLDOWN,
        cooldown_data=DataLoader(ByteWindows(code_text[-20_000:], CONTEXT), batch_size=8),
        dirpath=tmp_path / "mon",
    )
    trainer = make_trainer(tmp_path, [monitor], max_steps=6)
    model = make_module()
    trainer.fit(model, train_loader(code_text, shuffle=True))
    assert monitor.best_path == os.path.join(monitor.dirpath, "best-cooled.ckpt")
    assert not os.path.exists(os.path.join(monitor.dirpath, "best.ckpt"))
    index = [r["tokens"] for r in monitor.history].index(monitor.best_tokens)
    cooled = keeps.measured[index]
    saved = torch.load(monitor.best_path, weights_only=True)
    for key, value in saved["state_dict"].items():
        assert torch.equal(value, cooled[key]), key
    assert any(not torch.equal(v, cooled[k]) for k, v in live_tensors(model).items())
    assert "optimizer_states" not in saved  # weights only, plus the monitor's state
    # `lightning-overtrain probe` reads its tokens, and sees what the weights are.
    ckpt = Checkpoint(monitor.best_path, LIGHTNING)
    read_metadata(ckpt)
    assert tokens_from_checkpoint()(ckpt) == (monitor.best_tokens, "the monitor's tokens")
    assert ckpt.monitor_state["weights"] == "cooled"
    assert ckpt.monitor_state["config"]["cooldown_steps"] == COOLDOWN
    assert ckpt.monitor_state["init_stds"] == monitor.init_stds


def test_without_a_cooldown_the_kept_snapshot_carries_its_tokens_and_settings(tmp_path, code_text):
    monitor = noise_monitor(code_text, tmp_path)
    model = make_module()
    make_trainer(tmp_path, [monitor], max_steps=3).fit(model, train_loader(code_text))
    assert monitor.best_path == os.path.join(monitor.dirpath, "best.ckpt")
    ckpt = Checkpoint(monitor.best_path, LIGHTNING)
    read_metadata(ckpt)
    assert tokens_from_checkpoint()(ckpt)[0] == monitor.best_tokens == monitor.history[0]["tokens"]
    assert ckpt.monitor_state["weights"] == "live"
    assert ckpt.monitor_state["config"]["probes"]["noise"]["gammas"] == [1.0]
    loaded = type(model).load_from_checkpoint(monitor.best_path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


# ---------------------------------------------------------------------- judging faults
class SnapshotAgain(pl.Callback):
    """Calls ``monitor.snapshot()`` again right after the cadence's, at the same tokens."""

    def __init__(self, monitor: OvertrainingMonitor) -> None:
        self.monitor = monitor

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            self.monitor.snapshot(trainer, pl_module)


def test_a_policy_failure_is_counted_and_skipped_while_training_goes_on(tmp_path, code_text):
    monitor = noise_monitor(code_text, tmp_path)
    policy_before = {}

    class Remember(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                policy_before.update(json.loads(json.dumps(monitor.policy.state_dict())))

    recorder = LossRecorder()
    trainer = make_trainer(
        tmp_path, [monitor, Remember(), SnapshotAgain(monitor), recorder], max_steps=6
    )
    with pytest.warns(UserWarning, match=r"judging the snapshot .* failed at 768 tokens") as caught:
        trainer.fit(make_module(), train_loader(code_text, shuffle=True))
    assert trainer.global_step == 6 and len(recorder.losses) == 6
    assert any("must strictly increase" in str(w.message) for w in caught)
    assert [r["tokens"] for r in monitor.history] == [768, 768, 1536]
    assert [r["probe_failures"] for r in monitor.history] == [0, 1, 1]
    assert "best/tokens" not in monitor.history[1]  # not judged
    # The failed judgement left the policy as it was: one point per detector per token count.
    assert policy_before["detectors"].keys() == monitor.policy.state_dict()["detectors"].keys()
    for detector in monitor.policy.state_dict()["detectors"].values():
        assert detector["tokens"] == [768, 1536]


def test_a_policy_failure_stops_training_with_on_probe_error_raise(tmp_path, code_text):
    monitor = noise_monitor(code_text, tmp_path, on_probe_error="raise")
    trainer = make_trainer(tmp_path, [monitor, SnapshotAgain(monitor)], max_steps=6)
    with pytest.raises(ValueError, match="must strictly increase"):
        trainer.fit(make_module(), train_loader(code_text))


class SaveInside(Probe):
    """Writes a full checkpoint the first time it runs (inside the cadence's snapshot)."""

    name = "save_inside"

    def __init__(self, path: str) -> None:
        self.path = path
        self.trainer: pl.Trainer | None = None

    def run(self, ctx):
        if self.trainer is not None and not os.path.exists(self.path):
            self.trainer.save_checkpoint(self.path)
        return {}


class Attach(pl.Callback):
    def __init__(self, probe: SaveInside) -> None:
        self.probe = probe

    def on_fit_start(self, trainer, pl_module):
        self.probe.trainer = trainer


def test_a_checkpoint_written_during_a_due_snapshot_resumes_to_take_it_again(tmp_path, code_text):
    """The cadence in such a checkpoint is the one before `due` passed this threshold, so a
    requeued run takes the snapshot it was writing (one step later), instead of losing it."""
    path = str(tmp_path / "requeue.ckpt")
    inside = SaveInside(path)

    def run(root, probes, ckpt_path=None):
        monitor = OvertrainingMonitor(
            reference_batches(code_text, n=1), every_n_tokens=1024, probes=probes
        )
        trainer = make_trainer(root, [monitor, Attach(inside)], max_steps=8)
        trainer.fit(make_module(), train_loader(code_text), ckpt_path=ckpt_path)
        return monitor

    whole = run(tmp_path / "whole", [NoiseProbe(pairs=1)])
    run(tmp_path / "first", [NoiseProbe(pairs=1), inside])
    saved = torch.load(path, weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("OvertrainingMonitor")]
    assert state["history"] == [] and state["cadence"]["next_index"] == 0
    resumed = run(tmp_path / "second", [NoiseProbe(pairs=1)], ckpt_path=path)
    assert len(resumed.history) == len(whole.history)
    assert resumed.history[0]["step"] == whole.history[0]["step"] + 1  # taken again, a step late


def test_a_best_snapshot_that_cannot_be_written_is_skipped_and_training_goes_on(
    tmp_path, code_text, monkeypatch
):
    from lightning.pytorch.strategies import SingleDeviceStrategy

    def full_disk(self, checkpoint, filepath, storage_options=None):
        if "best" in os.path.basename(filepath):  # written as .best.ckpt.<random>.tmp first
            raise OSError("No space left on device")
        return real(self, checkpoint, filepath, storage_options)

    real = SingleDeviceStrategy.save_checkpoint
    monkeypatch.setattr(SingleDeviceStrategy, "save_checkpoint", full_disk)
    monitor = OvertrainingMonitor(reference_batches(code_text, n=1), every_n_steps=2)
    trainer = make_trainer(tmp_path, [monitor], max_steps=6)
    trainer.fit(make_module(), train_loader(code_text))
    assert trainer.global_step == 6 and len(monitor.history) == 3
    # A failed write is not a failed judgement: the policy keeps the snapshot, no file named.
    assert monitor.output_failures >= 1 and monitor.probe_failures == 0
    assert monitor.best_path is None and monitor.policy.best is not None
