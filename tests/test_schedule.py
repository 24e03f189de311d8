"""The training lr and its schedule phase at each snapshot, read without touching training."""

import json

import pytest
import torch
from conftest import LossRecorder, make_module, make_trainer, reference_batches, train_loader

from lightning_overtrain import OvertrainingMonitor
from lightning_overtrain.engine.schedule import PHASES, future_lrs, phase_code, schedule_phase
from lightning_overtrain.probes.schedule import LR, PHASE, ScheduleProbe
from lightning_overtrain.testing.demo import TinyCausalLM

WARMUP, STABLE_END, END = 4, 8, 12
# Stepping a bare scheduler in these tests, with no optimizer step between.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")


def wsd(step: int) -> float:
    """Warm-up over 4 steps, stable to step 8, linear decay to 0 at step 12."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    if step < STABLE_END:
        return 1.0
    return max(0.0, (END - step) / (END - STABLE_END))


def wsd_phase(step: int) -> str:
    """The phase at ``step`` by construction (the lr the next optimizer step uses)."""
    if step < WARMUP - 1:
        return "warmup"
    return "stable" if step < STABLE_END else "decay"


def optimizer_and(scheduler_of):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    param.grad = torch.ones(3)
    optimizer.step()  # some state, so that any change to it would show
    return optimizer, scheduler_of(optimizer)


def frozen(optimizer, scheduler) -> str:
    return json.dumps([optimizer.state_dict(), scheduler.state_dict()], default=str)


# ---------------------------------------------------------------------- the maths
def test_the_phase_of_every_step_of_a_warmup_stable_decay_schedule():
    optimizer, scheduler = optimizer_and(lambda o: torch.optim.lr_scheduler.LambdaLR(o, wsd))
    phases = []
    for _ in range(END):
        upcoming = future_lrs(scheduler, optimizer)
        phases.append(schedule_phase(optimizer.param_groups[0]["lr"], upcoming=upcoming))
        scheduler.step()
    assert phases == [wsd_phase(s) for s in range(END)]


@pytest.mark.parametrize(
    "make",
    [
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, wsd),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o,
            [
                torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
                torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
            ],
            milestones=[3],
        ),
    ],
    ids=["lambda", "step", "sequential"],
)
def test_future_lrs_are_the_schedulers_own_and_touch_neither_it_nor_the_optimizer(make):
    optimizer, scheduler = optimizer_and(make)
    twin_optimizer, twin = optimizer_and(make)
    before = frozen(optimizer, scheduler)
    predicted = future_lrs(scheduler, optimizer, steps=5)
    assert frozen(optimizer, scheduler) == before
    actual = []
    for _ in range(5):
        twin.step()
        actual.append(twin_optimizer.param_groups[0]["lr"])
    assert predicted == actual


def test_a_step_schedule_holding_below_its_peak_is_decay_and_a_constant_lr_is_stable():
    assert schedule_phase(0.5, seen=[1.0, 1.0], upcoming=[0.5]) == "decay"
    assert schedule_phase(1.0, seen=[1.0], upcoming=[1.0]) == "stable"
    assert schedule_phase(1.0) == "stable"  # no scheduler, first snapshot
    # Without a scheduler's word, the direction since the last snapshot decides.
    assert schedule_phase(0.5, seen=[0.2]) == "warmup"
    assert schedule_phase(0.2, seen=[0.5]) == "decay"


def test_a_plateau_scheduler_cannot_be_simulated_and_says_so_with_no_future():
    optimizer, scheduler = optimizer_and(lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o))
    assert future_lrs(scheduler, optimizer) == []
    assert [phase_code(p) for p in PHASES] == [0.0, 1.0, 2.0]


# ---------------------------------------------------------------------- in training
class WSDModel(TinyCausalLM):
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, wsd)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit(tmp_path, code_text, probes):
    recorder = LossRecorder()
    callbacks = [recorder]
    monitor = None
    if probes is not None:
        monitor = OvertrainingMonitor(
            reference_batches(code_text, n=1, batch_size=2),
            every_n_steps=2,
            probes=probes,
            dirpath=tmp_path / "m",
            cooldown_steps=0,
            on_probe_error="raise",
        )
        callbacks.append(monitor)
    model = WSDModel(**make_module(0, n_layer=1, n_embd=16).hparams)
    trainer = make_trainer(tmp_path, callbacks, max_steps=END)
    trainer.fit(model, train_loader(code_text, batch_size=2))
    return recorder.losses, monitor


def test_every_snapshot_records_the_training_lr_and_phase_and_training_is_untouched(
    tmp_path, code_text
):
    plain, _ = fit(tmp_path / "plain", code_text, None)
    losses, monitor = fit(tmp_path / "probed", code_text, [ScheduleProbe()])
    assert losses == plain
    for record in monitor.history:
        step = record["step"]  # optimizer steps taken: the next one uses wsd(step)
        assert record[LR] == pytest.approx(1e-3 * wsd(step))
        assert PHASES[int(record[PHASE])] == wsd_phase(step), step
    seen = {PHASES[int(r[PHASE])] for r in monitor.history}
    assert seen == set(PHASES)
    assert {s.key for s in ScheduleProbe().signals()} == {LR, PHASE}


def test_without_a_training_optimizer_the_probe_is_refused_before_training():
    from conftest import quadratic_context
    from test_noise import Quadratic

    with pytest.raises(ValueError, match=r"needs the training optimizer"):
        ScheduleProbe().validate(quadratic_context(Quadratic()))
