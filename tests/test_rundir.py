"""The monitor's directory: a new run never overwrites another's history; a resume keeps its own."""

import json
import os
from types import SimpleNamespace

from conftest import make_module, make_trainer, reference_batches, train_loader

from lightning_overtrain import NoiseProbe, OvertrainingMonitor
from lightning_overtrain.history import read_history, write_history
from lightning_overtrain.reporting.rundir import choose_dirpath, run_dirpath, same_run

FIRST = {"tokens": 1024, "step": 2, "reference_loss": 4.5}


def a_run(directory, first=FIRST):
    write_history([first, {**first, "tokens": 2048, "step": 4}], str(directory))
    return str(directory)


def test_an_empty_or_missing_directory_is_used_as_asked(tmp_path):
    assert choose_dirpath(str(tmp_path / "overtrain"), [], resuming=False) == str(
        tmp_path / "overtrain"
    )
    (tmp_path / "overtrain").mkdir()
    (tmp_path / "overtrain" / "monitor.json").write_text("{}")  # settings but no snapshot yet
    assert choose_dirpath(str(tmp_path / "overtrain"), [], resuming=False) == str(
        tmp_path / "overtrain"
    )


def test_a_new_run_takes_the_next_free_sibling(tmp_path):
    base = a_run(tmp_path / "overtrain")
    assert choose_dirpath(base, [], resuming=False) == base + "_1"
    a_run(tmp_path / "overtrain_1")
    assert choose_dirpath(base, [], resuming=False) == base + "_2"


def test_the_same_run_keeps_its_directory(tmp_path):
    base = a_run(tmp_path / "overtrain")
    restored = [dict(FIRST)]  # the checkpoint's history starts with the same snapshot
    assert choose_dirpath(base, restored, resuming=True) == base
    other = [{**FIRST, "reference_loss": 4.25}]  # another run's checkpoint
    assert choose_dirpath(base, other, resuming=True) == base + "_1"


def test_a_resume_from_before_the_first_snapshot_keeps_the_directory(tmp_path):
    base = a_run(tmp_path / "overtrain")
    assert choose_dirpath(base, [], resuming=True) == base


def test_an_unreadable_history_is_never_overwritten(tmp_path):
    (tmp_path / "overtrain").mkdir()
    (tmp_path / "overtrain" / "history.jsonl").write_text("{not json\n")
    base = str(tmp_path / "overtrain")
    assert choose_dirpath(base, [dict(FIRST)], resuming=True) == base + "_1"


def test_same_run_reads_numbers_as_json_writes_them(tmp_path):
    loss = 2.0 / 3.0  # no short decimal: the JSON round trip must keep it exactly
    base = a_run(tmp_path / "overtrain", {**FIRST, "reference_loss": loss})
    on_disk = read_history(os.path.join(base, "history.jsonl"))[0]
    assert same_run(on_disk, [{**FIRST, "reference_loss": loss}])
    assert not same_run(on_disk, [])


def test_every_rank_writes_where_rank_zero_decided(tmp_path):
    base = a_run(tmp_path / "overtrain")
    sent = []

    def broadcast(obj, src=0):
        sent.append(obj)
        return str(tmp_path / "overtrain_1")  # what rank zero decided

    # Rank 1 sees no history (another machine's disk) but writes where rank zero does.
    rank1 = SimpleNamespace(
        is_global_zero=False, ckpt_path=None, strategy=SimpleNamespace(broadcast=broadcast)
    )
    assert run_dirpath(rank1, str(tmp_path / "elsewhere"), []) == base + "_1"
    assert sent == [None]  # rank 1 did not decide


def monitor(code_text):
    return OvertrainingMonitor(
        reference_data=reference_batches(code_text),
        every_n_steps=2,
        probes=[NoiseProbe(gammas=(1.0,), pairs=1)],
    )


def test_two_fits_with_the_same_root_keep_both_histories(tmp_path, code_text):
    histories = []
    for seed in (0, 1):
        mon = monitor(code_text)
        trainer = make_trainer(tmp_path, [mon], max_steps=4)
        trainer.fit(make_module(seed), train_loader(code_text, shuffle=False))
        histories.append((mon.dirpath, json.dumps(mon.history[0]["reference_loss"])))
    (first, first_loss), (second, second_loss) = histories
    assert first == str(tmp_path / "overtrain") and second == str(tmp_path / "overtrain_1")
    for path, loss in histories:
        on_disk = read_history(os.path.join(path, "history.jsonl"))
        assert json.dumps(on_disk[0]["reference_loss"]) == loss  # each run's own numbers
    assert first_loss != second_loss


def test_a_resumed_fit_keeps_one_directory(tmp_path, code_text):
    mon = monitor(code_text)
    trainer = make_trainer(tmp_path, [mon], max_steps=4)
    trainer.fit(make_module(0), train_loader(code_text, shuffle=False))
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = monitor(code_text)
    trainer = make_trainer(tmp_path, [resumed], max_steps=8)
    trainer.fit(make_module(0), train_loader(code_text, shuffle=False), ckpt_path=ckpt)
    assert resumed.dirpath == str(tmp_path / "overtrain")
    assert not (tmp_path / "overtrain_1").exists()
    on_disk = read_history(str(tmp_path / "overtrain" / "history.jsonl"))
    assert [r["step"] for r in on_disk] == [r["step"] for r in resumed.history] == [2, 4, 6, 8]
