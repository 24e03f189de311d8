"""A progress bar while a snapshot's probes run, through Lightning's progress bar, or none."""

from types import SimpleNamespace

import pytest
from conftest import make_module, make_trainer, reference_batches, train_loader
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from lightning_overtrain import OvertrainingMonitor, Probe
from lightning_overtrain.reporting.progress import SnapshotProgress, counted


class Spy(Probe):
    """Evaluates the reference set once and notes the progress tasks it sees meanwhile."""

    name = "spy"

    def __init__(self, bar=None):
        self.bar = bar
        self.seen = []

    def run(self, ctx):
        ctx.local_loss_sums()
        if isinstance(self.bar, RichProgressBar):
            self.seen.append(
                [(t.description, t.total, t.completed) for t in self.bar.progress.tasks]
            )
        return {}


def fit(tmp_path, code_text, probe, *callbacks, **trainer_kwargs):
    monitor = OvertrainingMonitor(
        reference_batches(code_text, n=2), every_n_steps=1, probes=[probe]
    )
    trainer = make_trainer(tmp_path, [monitor, *callbacks], max_steps=2, **trainer_kwargs)
    trainer.fit(make_module(), train_loader(code_text))
    return trainer


def test_counted_ticks_once_per_evaluation_and_returns_the_same_loss():
    ticks = []
    loss = counted(lambda module, batch: module * batch, lambda: ticks.append(1))
    assert [loss(2, 3), loss(4, 5)] == [6, 20]
    assert len(ticks) == 2


def test_the_next_bar_expects_what_the_last_snapshot_needed():
    progress = SnapshotProgress()
    silent = SimpleNamespace(progress_bar_callback=None, is_global_zero=True)
    with progress.track(silent, "first") as tick:
        for _ in range(7):
            tick()
    assert progress.expected == 7


@pytest.mark.slow
def test_a_rich_progress_bar_shows_a_task_while_probes_run(tmp_path, code_text):
    bar = RichProgressBar()
    spy = Spy(bar)
    fit(tmp_path, code_text, spy, bar, enable_progress_bar=True)
    first, second = ([t for t in tasks if t[0].startswith("Probing")] for tasks in spy.seen)
    # The reference loss and the spy's own pass, 2 batches each, are counted as they run;
    # the first bar's total is unknown, the second expects what the first needed.
    assert first == [("Probing at 256 tokens", float("inf"), 4)]
    assert second == [("Probing at 512 tokens", 4, 4)]
    assert not [t for t in bar.progress.tasks if t.description.startswith("Probing")]


@pytest.mark.slow
def test_a_tqdm_progress_bar_shows_a_bar_while_probes_run(tmp_path, code_text, capsys):
    fit(tmp_path, code_text, Spy(), TQDMProgressBar(), enable_progress_bar=True)
    assert "Probing at 512 tokens" in capsys.readouterr().out


@pytest.mark.slow
def test_no_progress_bar_means_no_probe_bar(tmp_path, code_text, capsys):
    trainer = fit(tmp_path, code_text, Spy(), enable_progress_bar=False)
    assert trainer.progress_bar_callback is None
    captured = capsys.readouterr()
    assert "Probing" not in captured.out + captured.err


def test_only_rank_zero_shows_a_bar():
    bar = TQDMProgressBar()
    rank_one = SimpleNamespace(progress_bar_callback=bar, is_global_zero=False)
    progress = SnapshotProgress()
    with progress.track(rank_one, "Probing") as tick:
        tick()
    assert progress.expected == 1
