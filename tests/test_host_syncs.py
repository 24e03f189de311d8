"""The monitor's hot path: no host sync and no collective unless a snapshot may be due."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import CONTEXT, make_module, make_trainer, reference_batches, train_loader
from syncs import count_hot_path, counting
from torch.utils.data import DataLoader

from lightning_overtrain import NoiseProbe, OvertrainingMonitor
from lightning_overtrain.callbacks.cadence import Cadence
from lightning_overtrain.engine.tokens import TokenCounter, count_tokens

CADENCES = [
    {"every_n_steps": 5},
    {"every_n_tokens": 1000},
    {"points_per_decade": 4, "start_tokens": 300},
]


def padded_batches(n: int, rows: int = 4, length: int = 16, seed: int = 0) -> list[dict]:
    """Batches whose masks pad a random tail of each row (some rows fully padded)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 256, (rows, length), generator=gen)
        keep = torch.randint(0, length + 1, (rows, 1), generator=gen)
        mask = (torch.arange(length) < keep).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def old_snapshots(batches, cadence_kwargs, accumulate: int = 1) -> list[tuple[int, int]]:
    """The implementation before this change: an exact count on every micro-batch."""
    cadence, tokens, pending, due = Cadence(**cadence_kwargs), 0, 0, []
    for i, batch in enumerate(batches):
        pending += int(batch["attention_mask"].sum())
        if (i + 1) % accumulate:
            continue
        step = (i + 1) // accumulate
        tokens, pending = tokens + pending, 0
        if cadence.due(step, tokens):
            due.append((step, tokens))
    return due


def drive(monitor, batches, accumulate: int = 1) -> list[tuple[int, int]]:
    """Feed batches through the monitor's hook with a stand-in trainer; record the snapshots."""
    taken = []
    monitor.snapshot = lambda trainer, module: taken.append((trainer.global_step, monitor.tokens))
    trainer = SimpleNamespace(global_step=0, world_size=1)
    module = SimpleNamespace(device=torch.device("cpu"))
    for i, batch in enumerate(batches):
        trainer.global_step = (i + 1) // accumulate
        monitor.on_train_batch_end(trainer, module, None, batch, i)
    return taken


@pytest.mark.parametrize("cadence", CADENCES, ids=lambda c: next(iter(c)))
@pytest.mark.parametrize("accumulate", [1, 3])
def test_snapshots_land_on_the_same_steps_and_token_counts_as_exact_counting(cadence, accumulate):
    batches = padded_batches(240)
    monitor = OvertrainingMonitor([batches[0]], **cadence)
    expected = old_snapshots(batches, cadence, accumulate)
    assert len(expected) >= 4
    assert drive(monitor, batches, accumulate) == expected


@pytest.mark.parametrize("cadence", CADENCES, ids=lambda c: next(iter(c)))
def test_steps_far_from_a_snapshot_make_no_conversion(cadence):
    batches = padded_batches(240)
    monitor = OvertrainingMonitor([batches[0]], **cadence)
    calls = []
    hook = monitor.on_train_batch_end

    def counted(*args):
        counts: Counter = Counter()
        with counting(counts):
            hook(*args)
        calls.append(counts["conversions"] + counts["collectives"])

    monitor.on_train_batch_end = counted
    taken = drive(monitor, batches)
    synced = [i + 1 for i, n in enumerate(calls) if n]
    assert set(step for step, _ in taken) <= set(synced)
    # Exact counts only near a threshold: a few per snapshot (the bound counts these
    # batches' ~50% padding too, so each exact count about halves the distance left).
    assert len(synced) <= 7 * len(taken), synced
    assert len(synced) < len(batches) / 4
    if "every_n_steps" in cadence:
        assert synced == [step for step, _ in taken]


def test_the_bound_never_falls_below_the_exact_count():
    counter, exact = TokenCounter(count_tokens), 0
    for batch in padded_batches(50):
        counter.add(batch)
        counter.end_step()
        exact += int(batch["attention_mask"].sum())
        assert counter.upper_bound() >= exact
    assert counter.sync(lambda t: t, 1, torch.device("cpu")) == exact
    assert counter.upper_bound() == exact


def test_a_tokens_fn_returning_a_tensor_is_counted_on_the_device():
    counter = TokenCounter(lambda batch: (batch["input_ids"] > 100).sum())
    batches = padded_batches(10)
    for batch in batches:
        counter.add(batch)
        counter.end_step()
    assert counter.upper_bound() == sum(b["input_ids"].numel() for b in batches)
    expected = sum(int((b["input_ids"] > 100).sum()) for b in batches)
    assert counter.sync(lambda t: t, 1, torch.device("cpu")) == expected


class Masked(torch.utils.data.Dataset):
    """Byte windows with a padded tail on every other row, as a collator would pad them."""

    def __init__(self, text: bytes) -> None:
        self.inner = train_loader(text).dataset

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        item = dict(self.inner[i])
        mask = torch.ones(CONTEXT, dtype=torch.long)
        if i % 2:
            mask[CONTEXT // 2 :] = 0
        return {**item, "attention_mask": mask}


@pytest.mark.slow
def test_a_real_run_converts_nothing_on_ordinary_steps(tmp_path, code_text):
    mon = OvertrainingMonitor(
        reference_batches(code_text, n=2),
        every_n_tokens=3000,
        probes=[NoiseProbe(gammas=(1.0,), pairs=1)],
        dirpath=tmp_path / "mon",
    )
    calls = count_hot_path(mon)
    loader = DataLoader(Masked(code_text), batch_size=8)
    trainer = make_trainer(tmp_path, [mon], max_steps=40, accumulate_grad_batches=2)
    trainer.fit(make_module(0), loader)
    assert len(mon.history) >= 3
    busy = [c for c in calls if c.get("conversions") or c.get("collectives")]
    ordinary = [c for c in calls if not c["snapshot"]]
    assert sum(c.get("collectives", 0) for c in calls) == 0  # one process: none at all
    # Syncs only at snapshots or within a few steps before one.
    assert len(busy) <= 3 * len(mon.history), busy
    assert sum(1 for c in ordinary if not c.get("conversions")) >= 0.75 * len(ordinary)


def test_ranks_with_different_batch_shapes_agree_on_the_bound_and_flag_growth():
    """Two ranks simulated in one process: the bound is the same on both, never below the
    global exact count, and a rank whose batch outgrows its largest is flagged at the next count."""
    import copy

    counters = [TokenCounter(count_tokens, rank=0), TokenCounter(count_tokens, rank=1)]

    def sync_all() -> list[int]:
        packed = []
        for counter in counters:  # what each rank would send
            copy.deepcopy(counter).sync(lambda t: packed.append(t.clone()) or t, 2, CPU)
        total = packed[0] + packed[1]
        out = []
        for counter in counters:
            out.append(counter.sync(lambda t: total.clone(), 2, CPU))
        return out

    CPU = torch.device("cpu")
    big, small = padded_batches(30, rows=4), padded_batches(30, rows=2, seed=1)
    exact = 0
    for step in range(30):
        rows = small[step] if step < 20 else big[step]  # rank 1 grows at step 20
        for rank, batch in enumerate((big[step], rows)):
            counters[rank].add(batch)
            counters[rank].end_step()
        exact += int(big[step]["attention_mask"].sum()) + int(rows["attention_mask"].sum())
        bounds = [c.upper_bound(world_size=2) for c in counters]
        assert bounds[0] == bounds[1]
        if step < 20:
            assert bounds[0] >= exact
        if step in (0, 10, 25):
            assert sync_all() == [exact, exact]
            assert all(c.outgrown == (step == 25) for c in counters)
