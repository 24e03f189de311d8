"""End to end with the real wandb in offline mode, read back from the run's ``.wandb`` file."""

import json
import os

import pytest
import wandb
import wandb_reader as reader
from conftest import make_module, make_trainer, reference_batches, train_loader
from lightning.pytorch.loggers import WandbLogger

from lightning_overtrain import NoiseProbe, OvertrainingMonitor
from lightning_overtrain.reporting.wandb import WandbReporter

TOKENS = "overtrain/tokens"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    yield
    wandb.finish()


def only_run_file(root):
    files = {os.path.realpath(f) for f in reader.run_files(root)}
    assert len(files) == 1, files
    return files.pop()


def scalar_keys(row):
    # Media values arrive as nested keys ("overtrain/plots/noise/path"); scalars do not.
    return {
        k
        for k in row
        if k.startswith("overtrain/")
        and not any(k.startswith(f"overtrain/{media}/") for media in ("plots", "snapshots"))
    }


@pytest.mark.slow
def test_lightning_star_rule_beats_a_prefix_glob_so_keys_are_defined_by_name(tmp_path):
    """Why the reporter defines each key: W&B matches a key against its globs in no fixed order."""
    run = wandb.init(dir=str(tmp_path), project="t")
    run.define_metric("trainer/global_step")  # what WandbLogger defines
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    run.define_metric(TOKENS)
    run.define_metric("overtrain/*", step_metric=TOKENS, step_sync=True)
    run.log({"trainer/global_step": 7})
    globbed = [f"overtrain/glob/k{i}" for i in range(200)]
    run.log({**dict.fromkeys(globbed, 1.0), TOKENS: 100})
    named = [f"overtrain/named/k{i}" for i in range(200)]
    for key in named:
        run.define_metric(key, step_metric=TOKENS, step_sync=True)
    run.log({**dict.fromkeys(named, 1.0), TOKENS: 200})
    wandb.finish()
    rows = reader.history(reader.read_records(only_run_file(tmp_path)))
    *_, globbed_row, named_row = rows
    # step_sync adds the x-axis of the rule each key matched: Lightning's, for some globbed
    # keys; ours alone for keys defined by name.
    assert globbed_row["trainer/global_step"] == 7
    assert "trainer/global_step" not in named_row and named_row[TOKENS] == 200


@pytest.mark.slow
def test_a_short_run_logs_curves_table_plots_config_and_alerts(tmp_path, code_text):
    monitor = OvertrainingMonitor(
        reference_batches(code_text, n=2),
        every_n_steps=2,
        probes=[NoiseProbe(gammas=(0.5, 1.0), pairs=2)],
    )
    logger = WandbLogger(save_dir=str(tmp_path), project="overtrain-test")
    trainer = make_trainer(tmp_path, [monitor], max_steps=4, logger=logger)
    trainer.fit(make_module(), train_loader(code_text))
    reporter = monitor.reporters[0]
    assert isinstance(reporter, WandbReporter) and reporter.run is logger.experiment
    reporter.alert(trainer, monitor, "Overtraining: stop", "delta at gamma=1 is 0.52 > 0.5", "stop")
    run_dir = logger.experiment.dir
    wandb.finish()

    records = reader.read_records(only_run_file(tmp_path))
    rows = reader.history(records)
    definitions = {m.name: m for m in reader.metrics(records) if m.name}
    assert definitions[TOKENS].step_metric == ""
    assert any(m.glob_name == "*" for m in reader.metrics(records))  # Lightning's rule competed

    # Every scalar is defined by name, on the tokens axis, before its first row.
    order = {id(r): i for i, r in enumerate(records)}
    history_records = [r for r in records if r.WhichOneof("record_type") == "history"]
    defined_at = {}
    for i, r in enumerate(records):
        if r.WhichOneof("record_type") == "metric" and r.metric.name:
            defined_at.setdefault(r.metric.name, i)
    for record, row in zip(history_records, rows):
        for key in scalar_keys(row) - {TOKENS}:
            assert definitions[key].step_metric == TOKENS, key
            assert defined_at[key] < order[id(record)], key

    # The numbers: one row per snapshot, with its tokens, equal to the monitor's history.
    number_rows = [r for r in rows if "overtrain/reference_loss" in r]
    assert [r[TOKENS] for r in number_rows] == [h["tokens"] for h in monitor.history] == [512, 1024]
    for row, record in zip(number_rows, monitor.history):
        assert row["overtrain/noise/gamma=1/delta"] == pytest.approx(record["noise/gamma=1/delta"])

    # The table and the plots: one row each per snapshot, at that snapshot's tokens.
    media_rows = [r for r in rows if "overtrain/snapshots/_type" in r]
    assert [r[TOKENS] for r in media_rows] == [512, 1024]
    assert [r["overtrain/snapshots/nrows"] for r in media_rows] == [1, 2]
    assert all(r["overtrain/plots/noise/_type"] == "image-file" for r in media_rows)
    with open(os.path.join(run_dir, media_rows[-1]["overtrain/snapshots/path"])) as f:
        table = json.load(f)
    last = dict(zip(table["columns"], table["data"][-1]))
    assert last["tokens"] == 1024
    assert last["noise/gamma=0.5/perturbed_loss"] == pytest.approx(
        monitor.history[-1]["noise/gamma=0.5/perturbed_loss"]
    )
    assert (
        os.path.getsize(os.path.join(run_dir, media_rows[-1]["overtrain/plots/noise/path"])) > 1000
    )

    config = reader.config(records)["overtrain"]
    assert config.pop("wandb") == reporter.config()
    assert config == json.loads(json.dumps(monitor.config()))
    assert config["probes"]["noise"]["gammas"] == [0.5, 1.0]

    (alert,) = reader.alerts(records)
    assert alert.title == "Overtraining: stop" and alert.level == "ERROR"
    assert "0.52 > 0.5" in alert.text and "1,024 tokens, step 4" in alert.text

    # The same PNGs are on disk for anyone without W&B.
    assert os.path.exists(os.path.join(monitor.dirpath, "plots", "noise.png"))


@pytest.mark.slow
def test_one_wandb_run_per_ddp_job_and_only_rank_zero_logs(tmp_path, code_text):
    monitor = OvertrainingMonitor(
        reference_batches(code_text, n=2),
        every_n_steps=2,
        probes=[NoiseProbe(gammas=(1.0,), pairs=1)],
    )
    logger = WandbLogger(save_dir=str(tmp_path), project="overtrain-ddp")
    trainer = make_trainer(
        tmp_path,
        [monitor],
        max_steps=4,
        logger=logger,
        strategy="ddp_spawn",
        devices=2,
    )
    trainer.fit(make_module(), train_loader(code_text, batch_size=4))
    wandb.finish()
    records = reader.read_records(only_run_file(tmp_path))  # one run, not one per rank
    rows = reader.history(records)
    # Tokens count both ranks: 2 steps x 2 ranks x 4 sequences x 32 tokens per snapshot.
    assert [r[TOKENS] for r in rows if "overtrain/reference_loss" in r] == [512, 1024]
    assert [r[TOKENS] for r in rows if "overtrain/snapshots/_type" in r] == [512, 1024]
    assert sum(m.name == TOKENS for m in reader.metrics(records)) == 1
