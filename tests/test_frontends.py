"""The same monitor through every front end: the same numbers, the same decisions, no trace."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import history_text, make_module, reference_batches, train_loader
from frontend_runs import run_fabric, run_hf, run_lightning, run_loop

from lightning_overtrain import (
    FabricMonitor,
    HFTrainerMonitor,
    InflectionPolicy,
    LoopMonitor,
    NoiseProbe,
    OvertrainingMonitor,
    Probe,
)

STEPS = 6
U_CURVE = [3.0, 2.6, 2.3, 2.1, 2.0, 2.05, 2.2, 2.4, 2.7, 3.0, 3.3, 3.6]  # bottom at snapshot 5


def batches_of(code_text: bytes, n: int = STEPS) -> list:
    return list(itertools.islice(iter(train_loader(code_text)), n))


def settings(code_text: bytes, tmp_path, name: str) -> dict:
    return dict(
        reference_data=reference_batches(code_text, n=2),
        every_n_steps=2,
        probes=[NoiseProbe(gammas=(1.0,), pairs=1)],
        dirpath=str(tmp_path / name),
        reporters=[],
    )


def same_records(a: list[dict], b: list[dict]) -> None:
    assert [(r["tokens"], r["step"]) for r in a] == [(r["tokens"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for key, value in ra.items():
            if key == "probe_seconds":
                continue
            other = rb[key]
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(other), key
            else:
                assert other == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_the_plain_loop_and_the_lightning_trainer_record_the_same_history(tmp_path, code_text):
    batches = batches_of(code_text)
    kwargs = settings(code_text, tmp_path, "pl")
    lit = OvertrainingMonitor(kwargs.pop("reference_data"), **kwargs)
    lit_weights, _ = run_lightning(tmp_path, batches, lit)
    loop = LoopMonitor(**settings(code_text, tmp_path, "loop"))
    loop_weights, _ = run_loop(batches, loop)
    assert len(loop.history) == STEPS // 2
    same_records(lit.history, loop.history)
    # The same training: the two loops make the same updates (bit for bit on CPU).
    assert all(torch.equal(lit_weights[k], loop_weights[k]) for k in lit_weights)


@pytest.mark.parametrize("front", ["loop", "fabric"])
def test_training_is_bit_identical_with_the_monitor_on(tmp_path, code_text, front):
    batches = batches_of(code_text)
    run = run_loop if front == "loop" else run_fabric
    cls = LoopMonitor if front == "loop" else FabricMonitor
    without, _ = run(batches)
    monitor = cls(**settings(code_text, tmp_path, front))
    with_monitor, _ = run(batches, monitor)
    assert len(monitor.history) == STEPS // 2
    assert all(torch.equal(without[k], with_monitor[k]) for k in without)


def test_fabric_records_what_the_plain_loop_records(tmp_path, code_text):
    batches = batches_of(code_text)
    loop, fabric = (
        LoopMonitor(**settings(code_text, tmp_path, "loop")),
        FabricMonitor(**settings(code_text, tmp_path, "fabric")),
    )
    run_loop(batches, loop)
    run_fabric(batches, fabric)
    assert history_text(loop.history) == history_text(fabric.history)


def test_the_loop_state_round_trips_and_continues_the_same_curve(tmp_path, code_text):
    batches = batches_of(code_text)
    whole = LoopMonitor(**settings(code_text, tmp_path, "whole"))
    run_loop(batches, whole)
    first = LoopMonitor(**settings(code_text, tmp_path, "first"))
    run_loop(batches[:4], first)
    state = first.state_dict()
    assert state["loop_step"] == 4 and state["tokens"] == 4 * batches[0]["input_ids"].numel()
    resumed = LoopMonitor(**settings(code_text, tmp_path, "resumed"))
    resumed.load_state_dict(state)
    assert resumed.global_step == 4 and resumed.tokens == state["tokens"]
    assert resumed.history == first.history


def test_step_needs_exactly_one_count_and_says_how(tmp_path, code_text):
    monitor = LoopMonitor(**settings(code_text, tmp_path, "loop"))
    with pytest.raises(ValueError, match="exactly one of `batch`, `batches` or `tokens`"):
        monitor.step(model=torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="needs `model=`"):
        monitor.step(tokens=4)


class ScriptedProbe(Probe):
    """A signal with a U shape over its snapshots: it turns up after the fifth."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls = 0

    def run(self, ctx):
        self.calls += 1
        return {"scripted/loss": U_CURVE[self.calls - 1], "scripted/loss_stderr": 0.01}


def stopping(code_text, tmp_path, name: str) -> dict:
    return dict(
        reference_data=reference_batches(code_text, n=1),
        every_n_steps=1,
        probes=[ScriptedProbe()],
        policy=InflectionPolicy(signals=["scripted/loss"], action="stop", best_signal=None),
        dirpath=str(tmp_path / name),
        reporters=[],
    )


@pytest.mark.slow
def test_a_stop_decision_stops_every_front_end_at_the_same_step(tmp_path, code_text):
    batches = batches_of(code_text, len(U_CURVE))
    kwargs = stopping(code_text, tmp_path, "pl")
    lit = OvertrainingMonitor(kwargs.pop("reference_data"), **kwargs)
    with pytest.warns(UserWarning, match="scripted/loss has turned upward"):
        _, trainer = run_lightning(tmp_path, batches, lit)
        loop = LoopMonitor(**stopping(code_text, tmp_path, "loop"))
        _, loop_steps = run_loop(batches, loop)
        fabric = FabricMonitor(**stopping(code_text, tmp_path, "fabric"))
        _, fabric_steps = run_fabric(batches, fabric)
        hf = HFTrainerMonitor(**stopping(code_text, tmp_path, "hf"))
        _, hf_trainer = run_hf(tmp_path, batches, hf)
    assert 5 < trainer.global_step < len(U_CURVE)
    assert loop_steps == fabric_steps == hf_trainer.state.global_step == trainer.global_step
    for monitor in (loop, fabric, hf):
        assert monitor.should_stop and monitor.stop_reason == lit.stop_reason
        assert history_text(monitor.history) == history_text(lit.history)


def test_the_core_and_the_other_front_ends_import_no_lightning_trainer():
    import ast
    import os

    import lightning_overtrain

    root = os.path.dirname(lightning_overtrain.__file__)
    for folder in ("core", "frontends"):
        for name in os.listdir(os.path.join(root, folder)):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(root, folder, name)) as f:
                tree = ast.parse(f.read())
            imported = [
                alias.name if isinstance(node, ast.Import) else node.module or ""
                for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names
            ]
            assert not [m for m in imported if m.startswith("lightning.pytorch")], name
            assert "torch.distributed" not in imported, name  # ranks come from Collectives


def test_a_checkpoint_written_inside_a_step_cadence_snapshot_retakes_it(tmp_path, code_text):
    batches = batches_of(code_text)
    monitor = LoopMonitor(**settings(code_text, tmp_path, "first"))
    saved: list[dict] = []
    probe = monitor.core.probes[0]
    measure = probe.run

    def save_while_probing(ctx):  # a requeue handler saving in the middle of a probe
        saved.append(monitor.state_dict())
        return measure(ctx)

    probe.run = save_while_probing
    module = make_module()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)  # weights stay: same numbers
    monitor.start(module, optimizer=optimizer)
    for batch in batches[:2]:
        monitor.step(batch=batch)
    assert len(monitor.history) == 1 and len(saved) == 1  # the snapshot at step 2

    resumed = LoopMonitor(**settings(code_text, tmp_path, "second"))
    resumed.load_state_dict(saved[0])
    resumed.start(module, optimizer=optimizer)
    resumed.step(batch=batches[2])  # step 3: not a multiple of 2, but the snapshot was lost
    assert [r["step"] for r in resumed.history] == [3]


def test_loading_a_state_after_start_is_refused_with_the_order_to_use(tmp_path, code_text):
    monitor = LoopMonitor(**settings(code_text, tmp_path, "loop"))
    monitor.start(make_module())
    with pytest.raises(RuntimeError, match=r"before monitor.start"):
        monitor.load_state_dict({"history": []})
