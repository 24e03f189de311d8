"""The package as users get it: typed, documented, lint clean."""

import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import lightning_overtrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_py_typed_is_shipped():
    assert os.path.isfile(os.path.join(os.path.dirname(lightning_overtrain.__file__), "py.typed"))
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    assert 'lightning_overtrain = ["py.typed"]' in pyproject


#: The names a user writes; everything else is imported from its module.
PUBLIC = {
    "OvertrainingMonitor",
    "NoiseProbe",
    "FineTuneProbe",
    "InflectionPolicy",
    "InflectionDetector",
    "Probe",
    "ProbeContext",
    "ProbeFailure",
    "Reporter",
    "read_history",
    "SharpnessProbe",
    "WatcherStop",
    "Signal",
    "FabricMonitor",
    "HFTrainerMonitor",
    "LoopMonitor",
    "DetectorConfig",
    "ScheduleProbe",
    "__version__",
}


def test_the_public_api_is_the_names_a_user_writes():
    assert set(lightning_overtrain.__all__) == PUBLIC
    assert set(lightning_overtrain._LAZY) == PUBLIC - {"__version__"}
    assert set(dir(lightning_overtrain)) >= PUBLIC
    for name in PUBLIC - {"__version__"}:
        obj = getattr(lightning_overtrain, name)
        # The top-level name is the object its defining module holds, not a copy.
        assert getattr(importlib.import_module(obj.__module__), name) is obj
    with pytest.raises(AttributeError, match="no attribute 'ModelBackup'"):
        lightning_overtrain.ModelBackup  # noqa: B018


@pytest.mark.parametrize(
    "module, name",
    [
        ("lightning_overtrain.callbacks.cadence", "Cadence"),
        ("lightning_overtrain.engine.backup", "ModelBackup"),
        ("lightning_overtrain.engine.backup", "borrowed"),
        ("lightning_overtrain.engine.losses", "transformers_loss"),
        ("lightning_overtrain.engine.tokens", "count_tokens"),
        ("lightning_overtrain.engine.init_std", "init_std_from_weights"),
        ("lightning_overtrain.history", "write_history"),
        ("lightning_overtrain.inflection.policy", "Decision"),
        ("lightning_overtrain.probes.noise", "perturb_"),
        ("lightning_overtrain.probes.layers", "infer_layer_groups"),
        ("lightning_overtrain.reporting", "ConsoleReporter"),
        ("lightning_overtrain.reporting", "FileReporter"),
        ("lightning_overtrain.reporting", "LoggerReporter"),
        ("lightning_overtrain.reporting", "PlotReporter"),
        ("lightning_overtrain.reporting", "WandbReporter"),
    ],
)
def test_names_off_the_top_level_import_from_their_module(module, name):
    assert getattr(importlib.import_module(module), name)


def test_the_command_line_help_imports_neither_torch_nor_lightning():
    # What makes `lightning-overtrain --help` answer in a fraction of a second (it took
    # about 9 s when the package imported everything): checked by module, not by a clock.
    script = textwrap.dedent(
        """
        import json, sys
        import lightning_overtrain
        from lightning_overtrain.cli import main
        for argv in (["--help"], ["probe", "--help"], ["report", "--help"]):
            try:
                main(argv)
            except SystemExit as exc:
                assert exc.code == 0, exc.code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "lightning"))
        print(json.dumps(heavy))
        """
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("name", lightning_overtrain.__all__)
def test_public_api_is_documented_and_typed(name):
    obj = getattr(lightning_overtrain, name)
    if name == "__version__":
        return
    assert inspect.getdoc(obj), f"{name} has no docstring"
    target = obj.__init__ if inspect.isclass(obj) else obj
    if inspect.isclass(obj) and target is object.__init__:
        return
    signature = inspect.signature(target)
    for param in signature.parameters.values():
        if param.name in {"self", "args", "kwargs"}:
            continue
        assert param.annotation is not inspect.Parameter.empty, (
            f"{name}({param.name}) has no type hint"
        )


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    proc = subprocess.run([ruff, "check", ROOT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
