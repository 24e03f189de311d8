"""The monitor and its probes configured from a LightningCLI YAML: ``examples/monitor_cli.yaml``."""

import os
import sys
from pathlib import Path

import pytest
import yaml

from lightning_overtrain import NoiseProbe, OvertrainingMonitor
from lightning_overtrain.history import read_history

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import monitor_cli  # noqa: E402  (the YAML imports it by this name)


def shipped_config():
    with open(EXAMPLES / "monitor_cli.yaml") as f:
        return yaml.safe_load(f)


def monitor_args(config):
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_overtrain.OvertrainingMonitor"
    return callback["init_args"]


def tiny(config, tmp_path):
    """The shipped config shrunk to seconds: small model, little text, a snapshot every 2 steps."""
    config["trainer"].update(
        max_steps=4, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1
    )
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    config["model"].update(n_embd=32, context=32, warmup_steps=4)
    config["data"].update(max_bytes=200_000, context=32, batch_size=8)
    args = monitor_args(config)
    del args["points_per_decade"], args["start_tokens"]
    args["every_n_steps"] = 2
    args["reference_data"]["init_args"].update(max_bytes=200_000, context=32, batches=2)
    args["probes"][0]["init_args"].update(gammas=[0.5, 1.0], pairs=1)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(autouse=True)
def no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # LightningCLI reads them otherwise


def parse(*args):
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(
        monitor_cli.TinyCausalLM, monitor_cli.StdlibCode, run=False, args=list(args)
    )


def the_monitor(trainer):
    (monitor,) = [cb for cb in trainer.callbacks if isinstance(cb, OvertrainingMonitor)]
    return monitor


def test_the_shipped_yaml_configures_the_monitor_and_its_probes():
    cli = parse("--config", str(EXAMPLES / "monitor_cli.yaml"))
    monitor = the_monitor(cli.trainer)
    assert (monitor.cadence.points_per_decade, monitor.cadence.start_tokens) == (4, 50_000)
    (probe,) = monitor.probes
    assert isinstance(probe, NoiseProbe)
    assert (probe.gammas, probe.pairs) == ((0.25, 0.5, 1.0), 4)
    assert isinstance(monitor.reference_data, monitor_cli.HeldOutBatches)
    assert monitor.reference_data.batches == 8
    assert type(cli.trainer.logger).__name__ == "CSVLogger"


def test_a_bad_probe_setting_in_the_yaml_names_the_argument(tmp_path):
    config = shipped_config()
    monitor_args(config)["probes"][0]["init_args"]["gammas"] = [0.5, -1.0]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"`gammas` must be .* got \(0.5, -1.0\)"):
        parse("--config", str(path))


@pytest.mark.slow
def test_fit_from_the_yaml_writes_history_and_plots(tmp_path):
    target = tmp_path / "docs" / "example_plot.png"
    cli = monitor_cli.main(
        ["fit", "--config", tiny(shipped_config(), tmp_path), "--plot", str(target)]
    )
    monitor = the_monitor(cli.trainer)
    assert monitor.dirpath == os.path.join(cli.trainer.log_dir, "overtrain")
    history = read_history(os.path.join(monitor.dirpath, "history.jsonl"))
    assert [r["tokens"] for r in history] == [512, 1024]
    assert {"noise/gamma=0.5/delta", "noise/gamma=1/delta"} <= set(history[-1])
    assert target.read_bytes() == Path(monitor.dirpath, "plots", "noise.png").read_bytes()
