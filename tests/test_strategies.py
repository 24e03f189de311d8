"""Strategies the monitor cannot measure correctly are refused before training, by name."""

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

from lightning_overtrain import OvertrainingMonitor
from lightning_overtrain.callbacks.strategies import check_strategy


def fake(name: str):
    """An object whose class is called ``name`` (the check reads the class hierarchy)."""
    return type(name, (), {})()


@pytest.mark.parametrize(
    "name, match",
    [
        ("FSDPStrategy", "does not support FSDPStrategy .*FSDP1 flattens parameters"),
        ("DeepSpeedStrategy", "does not support DeepSpeedStrategy .*ZeRO"),
        ("XLAStrategy", "has not been tested under XLAStrategy"),
    ],
)
def test_other_strategies_are_refused_with_what_to_use_instead(name, match):
    with pytest.raises(ValueError, match=match) as info:
        check_strategy(fake(name))
    assert "ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1)" in str(
        info.value
    )
    assert "fully_shard" in str(info.value) and "configure_model" in str(info.value)


def test_a_subclass_of_a_refused_strategy_is_refused_too():
    from lightning.pytorch.strategies import FSDPStrategy

    class MyFSDP(FSDPStrategy):
        def __init__(self) -> None:  # no GPU needed to build the object
            pass

    with pytest.raises(ValueError, match="does not support MyFSDP"):
        check_strategy(MyFSDP())


def test_tensor_parallelism_is_refused():
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        check_strategy(strategy)


def test_single_device_ddp_and_data_parallel_fsdp2_are_accepted():
    import torch

    check_strategy(SingleDeviceStrategy(torch.device("cpu")))
    check_strategy(DDPStrategy())
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))


def test_the_monitor_refuses_in_setup_before_training(tmp_path):
    monitor = OvertrainingMonitor([{"input_ids": None}], every_n_steps=1, dirpath=tmp_path)
    trainer = SimpleNamespace(strategy=fake("DeepSpeedStrategy"))
    with pytest.raises(ValueError, match="DeepSpeedStrategy"):
        monitor.setup(trainer, None, "fit")
