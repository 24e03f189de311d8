"""The package as users get it: typed, documented, lint clean."""

import inspect
import os
import shutil
import subprocess
import sys

import pytest

import lightning_overtrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_py_typed_is_shipped():
    assert os.path.isfile(os.path.join(os.path.dirname(lightning_overtrain.__file__), "py.typed"))
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    assert 'lightning_overtrain = ["py.typed"]' in pyproject


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
