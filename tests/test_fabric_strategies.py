"""``FabricMonitor`` refuses what the Lightning callback refuses, before anything is measured;
the non-Lightning front ends' best snapshot holds whole tensors under FSDP2.

FSDP1 (flattened parameters) would read as ``sigma_t = 0`` and ``delta = 0``:
silently wrong numbers. Fabric will not build FSDP1 or DeepSpeed on a CPU, so those
strategy objects are handed to the monitor as a Fabric would; tensor parallelism and
a precision of one's own go through a real ``Fabric``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import make_module, reference_batches
from lightning.fabric import Fabric
from lightning.fabric.plugins import Precision
from lightning.fabric.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_overtrain import FabricMonitor, NoiseProbe

HERE = os.path.dirname(os.path.abspath(__file__))


def monitor(code_text: bytes, tmp_path) -> FabricMonitor:
    return FabricMonitor(
        reference_batches(code_text, n=1),
        every_n_steps=2,
        probes=[NoiseProbe(gammas=(1.0,), pairs=1)],
        dirpath=str(tmp_path / "mon"),
        reporters=[],
    )


def as_fabric(strategy) -> SimpleNamespace:
    """What ``on_train_start`` reads of a Fabric, around a strategy Fabric won't build here."""
    return SimpleNamespace(
        strategy=strategy, loggers=[], global_rank=0, world_size=1, autocast=None
    )


def refused(mon: FabricMonitor, fabric, *words: str) -> None:
    model = make_module().model
    with pytest.raises(ValueError) as info:
        mon.on_train_start(fabric, model)
    text = str(info.value)
    assert "FabricMonitor" in text and all(w in text for w in words), text
    assert not mon.started  # refused before anything was measured or written
    assert not os.path.exists(mon.core.dirpath or "") or not os.listdir(mon.core.dirpath)


def test_fsdp1_is_refused_naming_it_and_fsdp2(code_text, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = FSDPStrategy()
    refused(monitor(code_text, tmp_path), as_fabric(strategy), "FSDPStrategy", "FSDP1")
    with pytest.raises(ValueError, match="parallelize_fn"):
        monitor(code_text, tmp_path).on_train_start(as_fabric(strategy), make_module().model)


def test_deepspeed_is_refused_naming_it(code_text, tmp_path):
    strategy = object.__new__(DeepSpeedStrategy)  # deepspeed itself is not installed here
    refused(monitor(code_text, tmp_path), as_fabric(strategy), "DeepSpeedStrategy", "ZeRO")


def test_tensor_parallelism_is_refused_through_a_real_fabric(code_text, tmp_path):
    strategy = ModelParallelStrategy(
        lambda m, mesh: m, data_parallel_size=1, tensor_parallel_size=2
    )
    mon = monitor(code_text, tmp_path)
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy, callbacks=[mon])
    model = make_module().model
    with pytest.raises(ValueError, match="tensor_parallel_size=2") as info:
        fabric.call("on_train_start", fabric=fabric, model=model)
    assert "ModelParallelStrategy" in str(info.value) and not mon.started


def test_a_precision_the_probes_do_not_follow_is_refused(code_text, tmp_path):
    class Fp8(Precision):
        precision = "transformer-engine"

    mon = monitor(code_text, tmp_path)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[Fp8()], callbacks=[mon])
    refused(mon, fabric, "precision='transformer-engine'", "bf16-mixed")


def test_single_device_fabric_is_accepted(code_text, tmp_path):
    mon = monitor(code_text, tmp_path)
    fabric = Fabric(accelerator="cpu", devices=1)
    model = make_module().model
    mon.on_train_start(fabric, model)
    assert mon.started
    mon.on_train_end(fabric)


@pytest.mark.slow
def test_the_best_snapshot_of_an_fsdp2_loop_holds_whole_tensors(tmp_path):
    out = tmp_path / "result"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "keeping_fsdp_run.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_text() == "ok"
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["state_dict"]
