"""Finding, ordering and loading a checkpoint series (no training: fake checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_overtrain.cli.loading import (
    SeriesInitStd,
    import_object,
    load_model,
    order_series,
)
from lightning_overtrain.cli.runs import one_run
from lightning_overtrain.cli.series import (
    LIGHTNING,
    TRANSFORMERS,
    Checkpoint,
    CheckpointError,
    SeriesError,
    find_checkpoints,
    read_metadata,
)
from lightning_overtrain.cli.token_rules import (
    parse_count,
    tokens_from_checkpoint,
    tokens_from_mapping,
    tokens_from_pattern,
)

MONITOR_KEY = "OvertrainingMonitor{'prefix': 'overtrain'}"


def lightning_ckpt(path: Path, step: int, monitor: dict | None = None) -> Path:
    data = {"state_dict": {"w": torch.zeros(2)}, "global_step": step, "callbacks": {}}
    if monitor is not None:
        data["callbacks"][MONITOR_KEY] = monitor
    torch.save(data, path)
    return path


def hf_dir(path: Path, trainer_state: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if trainer_state is not None:
        (path / "trainer_state.json").write_text(json.dumps(trainer_state))
    return path


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("123", 123),
        ("1_000", 1000),
        ("4B", 4 * 10**9),
        ("2.3T", 2_300_000_000_000),
        ("500k", 500_000),
        ("1.5M", 1_500_000),
        ("1e9", 10**9),
        (2048, 2048),
        (3.0, 3),
    ],
)
def test_token_counts_read_with_suffixes(text, tokens):
    assert parse_count(text) == tokens


@pytest.mark.parametrize("text", ["lots", "-5", "1.5", "nan", "inf", True, ""])
def test_bad_token_counts_are_refused(text):
    with pytest.raises(ValueError, match="token count"):
        parse_count(text)


def test_directories_are_searched_for_both_formats(tmp_path):
    (tmp_path / "run").mkdir()
    lightning_ckpt(tmp_path / "run" / "a.ckpt", 1)
    hf_dir(tmp_path / "run" / "hf" / "step-1")
    hf_dir(tmp_path / "run" / "hf" / "step-2")
    (tmp_path / "run" / "hf" / "step-2" / "inner.ckpt").write_bytes(b"")  # inside a checkpoint
    found, failures = find_checkpoints([str(tmp_path / "run")])
    kinds = {Path(c.path).name: c.kind for c in found}
    assert kinds == {"a.ckpt": LIGHTNING, "step-1": TRANSFORMERS, "step-2": TRANSFORMERS}
    assert failures == []


def test_missing_paths_and_empty_directories_are_failures_not_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    good = lightning_ckpt(tmp_path / "good.ckpt", 1)
    paths = [
        str(tmp_path / "nope"),
        str(tmp_path / "empty"),
        str(tmp_path / "notes.txt"),
        str(good),
    ]
    found, failures = find_checkpoints(paths)
    assert [c.path for c in found] == [str(good)]
    reasons = dict(failures)
    assert reasons[str(tmp_path / "nope")] == "no such file or directory"
    assert "no .ckpt file" in reasons[str(tmp_path / "empty")]
    assert "not a checkpoint" in reasons[str(tmp_path / "notes.txt")]


def test_the_monitors_tokens_include_its_token_offset(tmp_path):
    state = {"counted_tokens": 1234, "tokens": 5234}
    ckpt = Checkpoint(str(lightning_ckpt(tmp_path / "a.ckpt", 7, state)), LIGHTNING)
    read_metadata(ckpt)
    assert tokens_from_checkpoint(100)(ckpt) == (5234, "the monitor's tokens")


def test_metadata_of_a_lightning_checkpoint_holds_the_monitors_tokens(tmp_path):
    ckpt = Checkpoint(
        str(lightning_ckpt(tmp_path / "a.ckpt", 7, {"counted_tokens": 1234})), LIGHTNING
    )
    read_metadata(ckpt)
    assert ckpt.step == 7
    assert tokens_from_checkpoint(100)(ckpt) == (1234, "the monitor's counted_tokens")


def test_without_the_monitor_tokens_are_steps_times_tokens_per_step(tmp_path):
    ckpt = Checkpoint(str(lightning_ckpt(tmp_path / "a.ckpt", 7)), LIGHTNING)
    read_metadata(ckpt)
    assert tokens_from_checkpoint(100)(ckpt)[0] == 700
    with pytest.raises(CheckpointError, match="--tokens-per-step"):
        tokens_from_checkpoint(None)(ckpt)


def test_transformers_trainer_state_gives_step_and_tokens(tmp_path):
    state = {"global_step": 30, "num_input_tokens_seen": 9000}
    ckpt = Checkpoint(str(hf_dir(tmp_path / "c", state)), TRANSFORMERS)
    read_metadata(ckpt)
    assert ckpt.step == 30
    assert tokens_from_checkpoint(None)(ckpt)[0] == 9000


def test_unreadable_lightning_checkpoint_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_metadata(Checkpoint(str(bad), LIGHTNING))


def test_pattern_reads_tokens_or_steps_from_the_path():
    by_tokens = tokens_from_pattern(r"tokens=(?P<tokens>[\d.]+[kMBT]?)")
    assert by_tokens(Checkpoint("run/step10-tokens=2.5M", TRANSFORMERS))[0] == 2_500_000
    ckpt = Checkpoint("pythia/step143000", TRANSFORMERS)
    assert tokens_from_pattern(r"step(?P<step>\d+)", 2_097_152)(ckpt)[0] == 143000 * 2_097_152
    assert ckpt.step == 143000
    with pytest.raises(CheckpointError, match="does not match"):
        by_tokens(Checkpoint("run/final", TRANSFORMERS))


@pytest.mark.parametrize(
    ("pattern", "per_step", "message"),
    [
        ("step(", None, "not a valid regex"),
        (r"step\d+", None, "no named group"),
        (r"step(?P<step>\d+)", None, "--tokens-per-step"),
    ],
)
def test_bad_patterns_are_clear_errors(pattern, per_step, message):
    with pytest.raises(SeriesError, match=message) as info:
        tokens_from_pattern(pattern, per_step)
    assert "--tokens-pattern" in str(info.value)


def test_mapping_finds_checkpoints_by_relative_path_or_name(tmp_path):
    mapping = tmp_path / "tokens.json"
    mapping.write_text(json.dumps({"ckpts/a.ckpt": 100, "b.ckpt": "2k"}))
    rule = tokens_from_mapping(str(mapping))
    assert rule(Checkpoint(str(tmp_path / "ckpts" / "a.ckpt"), LIGHTNING))[0] == 100
    assert rule(Checkpoint("/elsewhere/b.ckpt", LIGHTNING))[0] == 2000
    with pytest.raises(CheckpointError, match="not in --tokens-map"):
        rule(Checkpoint("/elsewhere/c.ckpt", LIGHTNING))


def test_csv_mapping_and_ambiguous_names(tmp_path):
    mapping = tmp_path / "tokens.csv"
    mapping.write_text("checkpoint,tokens\nx/last.ckpt,10\ny/last.ckpt,20\n")
    rule = tokens_from_mapping(str(mapping))
    assert rule(Checkpoint(str(tmp_path / "y" / "last.ckpt"), LIGHTNING))[0] == 20
    with pytest.raises(CheckpointError, match="several entries"):
        rule(Checkpoint("/other/last.ckpt", LIGHTNING))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("t.json", "{not json", "not valid JSON"),
        ("t.json", "[1, 2]", "JSON object"),
        ("t.json", '{"a.ckpt": -3}', "not a token count"),
        ("t.csv", "path,count\na,1\n", "checkpoint,tokens"),
    ],
)
def test_bad_mappings_are_clear_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(SeriesError, match=message) as info:
        tokens_from_mapping(str(tmp_path / name))
    assert "--tokens-map" in str(info.value) and name in str(info.value)


def test_missing_mapping_file_is_a_clear_error(tmp_path):
    with pytest.raises(SeriesError, match="no such file"):
        tokens_from_mapping(str(tmp_path / "nope.json"))


def test_series_is_ordered_by_tokens_and_duplicates_dropped():
    tokens = {"a": 300, "b": 100, "c": 200, "last": 300, "x": None}

    def rule(ckpt):
        if tokens[ckpt.path] is None:
            raise CheckpointError("no tokens")
        return tokens[ckpt.path], "test"

    ordered, failures, duplicates = order_series([Checkpoint(p, LIGHTNING) for p in tokens], rule)
    assert [c.path for c in ordered] == ["b", "c", "a"]
    assert failures == [("x", "no tokens")]
    assert [(d.path, k.path) for d, k in duplicates] == [("last", "a")]


def test_import_object_accepts_modules_and_files(tmp_path):
    assert import_object("lightning_overtrain.cli.token_rules:parse_count", "--x") is parse_count
    assert import_object("lightning_overtrain.cli.token_rules.parse_count", "--x") is parse_count
    source = tmp_path / "mine.py"
    source.write_text("def f():\n    return 42\n")
    assert import_object(f"{source}:f", "--x")() == 42
    with pytest.raises(SeriesError, match="--module-class 'nope:Missing' cannot be imported"):
        import_object("nope:Missing", "--module-class")


def test_lightning_checkpoints_need_the_module_class(tmp_path):
    ckpt = Checkpoint(str(lightning_ckpt(tmp_path / "a.ckpt", 1)), LIGHTNING)
    with pytest.raises(SeriesError, match="--module-class"):
        load_model(ckpt, None, None, torch.device("cpu"))


def test_init_std_prefers_the_users_then_the_monitors_state(tmp_path):
    model = nn.Linear(3, 2)
    saved = Checkpoint("a.ckpt", LIGHTNING, step=5, tokens=10)
    saved.monitor_state = {"init_stds": {"weight": 0.5, "bias": 0.0}, "init_std_source": "w"}

    def never(ckpt):
        raise AssertionError("nothing should be loaded")

    user = SeriesInitStd(0.02, [saved], never)
    assert user.sigmas(model, ["weight", "bias"]) == [0.02, 0.0]
    state = SeriesInitStd(None, [saved], never)
    assert state.sigmas(model, ["weight", "bias"]) == [0.5, 0.0]
    assert "monitor's state in a.ckpt" in state.source
    with pytest.raises(CheckpointError, match="do not name its parameters"):
        state.sigmas(model, ["other.weight"])


def test_init_std_from_a_step_zero_checkpoint_else_the_config():
    first = Checkpoint("step-0", TRANSFORMERS, step=0, tokens=0)
    later = Checkpoint("step-9", TRANSFORMERS, step=9, tokens=90)
    torch.manual_seed(0)
    initial = nn.Linear(200, 100)
    init = SeriesInitStd(None, [first, later], lambda ckpt: initial)
    assert init.sigmas(initial, ["weight"])[0] == pytest.approx(initial.weight.std().item())
    assert "step-0 checkpoint step-0" in init.source

    from_config = SeriesInitStd(None, [later], lambda ckpt: initial)
    with pytest.raises(SeriesError, match="--init-std"):
        from_config.sigmas(initial, ["weight"])
    initial.config = SimpleNamespace(initializer_range=0.03)
    assert from_config.sigmas(initial, ["weight", "bias"]) == [0.03, 0.0]
    assert from_config.source == "config.initializer_range = 0.03"


# ---------------------------------------------------------------------- one run per series
def _ckpt(path: str, head: dict | None = None) -> Checkpoint:
    ckpt = Checkpoint(path, LIGHTNING)
    ckpt.history_head = head
    return ckpt


def test_the_monitors_first_record_tells_runs_apart_in_one_directory():
    run_a = {"tokens": 512, "reference_loss": 5.25}
    run_b = {"tokens": 512, "reference_loss": 5.5}  # another seed, same architecture
    series = [_ckpt(f"/r/ckpt/step={s}.ckpt", run_a) for s in (4, 8, 12)]
    series += [_ckpt("/r/ckpt/step=0.ckpt"), _ckpt("/r/ckpt/copied.ckpt", run_b)]
    kept, skipped = one_run(series)
    assert [c.path for c in kept] == [c.path for c in series[:4]]  # step 0 joins its directory
    ((path, reason),) = skipped
    assert path == "/r/ckpt/copied.ckpt"
    assert "reference_loss 5.5" in reason and "reference_loss 5.25" in reason
    assert "--mix-runs" in reason
    assert one_run(series, mix=True) == (series, [])


def test_a_resumed_run_in_a_new_directory_is_still_one_run():
    head = {"tokens": 512, "reference_loss": 5.25}
    series = [_ckpt("/logs/version_0/checkpoints/step=4.ckpt", head)]
    series.append(_ckpt("/logs/version_1/checkpoints/step=8.ckpt", head))
    assert one_run(series) == (series, [])


def test_without_the_monitor_the_directory_names_the_run():
    series = [_ckpt(f"/a/step-{s}") for s in (1, 2)] + [_ckpt("/b/step-3")]
    kept, skipped = one_run(series)
    assert [c.path for c in kept] == ["/a/step-1", "/a/step-2"]
    assert skipped[0][0] == "/b/step-3" and "the run in /b" in skipped[0][1]
