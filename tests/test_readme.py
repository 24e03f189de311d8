"""Every ```python block of README.md runs, with small stand-ins for the user's data.

A block sees, ready-made, any of the names in ``STAND_INS`` that it uses without
defining (``model``, ``train_loader``, ``held_out_loader``, ...: a tiny byte-level GPT-2
and a few batches of standard-library code), and ``L.Trainer`` stops after a few
steps. A block that needs more declares it in an HTML comment right above it, run
first in the block's namespace (``helpers`` is tests/conftest.py)::

    <!-- readme-test: my_batches = helpers.reference_batches(code_text, n=2) -->

A snippet that raises fails this test, and so CI.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
from collections.abc import Callable
from typing import Any

import conftest as helpers
import lightning
import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_overtrain.testing.demo import ByteWindows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# An optional `<!-- readme-test: setup code -->` (never spanning another comment's end)
# right above a ```python fence, then the block.
BLOCK = re.compile(
    r"(?:<!--\s*readme-test:(?P<setup>(?:(?!-->).)*)-->[ \t]*\n)?```python\n(?P<code>.*?)\n```",
    re.S,
)
STEPS = 3  # every README Trainer stops here: the snippets must run, not train


def readme_blocks() -> list[Any]:
    with open(README) as f:
        text = f.read()
    blocks = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code"))  # lines above the block
        heading = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        name = f"line{line}-{heading[-1] if heading else 'top'}".replace(" ", "_")
        # Padded with the lines above it, so a traceback points at README.md's own line.
        code = "\n" * line + match.group("code")
        blocks.append(pytest.param(code, (match.group("setup") or "").strip(), id=name))
    return blocks


def pairs(text: bytes) -> TensorDataset:
    """``(x, y)`` examples: ``y`` is ``x`` shifted by one token."""
    ids = ByteWindows(text, helpers.CONTEXT + 1).tokens.long()
    return TensorDataset(ids[:, :-1], ids[:, 1:])


def stand_ins(code_text: bytes, prose_text: bytes) -> dict[str, Callable[[], Any]]:
    """The user's objects the README names, each built only if a block uses it."""
    windows = ByteWindows(code_text[:20_000], helpers.CONTEXT)
    return {
        "model": lambda: helpers.make_module(),
        "train_loader": lambda: DataLoader(windows, batch_size=4),
        "held_out_loader": lambda: DataLoader(
            ByteWindows(code_text[-20_000:], helpers.CONTEXT), batch_size=8
        ),
        "held_out_batches": lambda: helpers.reference_batches(code_text, n=2),
        "held_out_code_batches": lambda: helpers.reference_batches(code_text, n=2),
        "more_code_batches": lambda: helpers.reference_batches(code_text[:50_000], n=4),
        "prose_batches": lambda: helpers.reference_batches(prose_text, n=110, batch_size=2),
        "held_out_pairs": lambda: list(DataLoader(pairs(code_text[-10_000:]), batch_size=8)),
        "train_pairs": lambda: DataLoader(pairs(code_text[:10_000]), batch_size=4),
    }


def free_names(code: str) -> set[str]:
    """Names a block reads that it neither assigns, imports nor gets from builtins."""
    tree = ast.parse(code)
    bound, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return read - bound - set(dir(builtins))


@pytest.fixture
def short_trainers(monkeypatch, tmp_path):
    """``L.Trainer(...)`` as the README writes it, on CPU, for a few steps, in tmp_path."""
    real = pl.Trainer

    def trainer(*args: Any, **kwargs: Any) -> pl.Trainer:
        settings: dict[str, Any] = dict(
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            # Unless the block keeps checkpoints itself (a ModelCheckpoint it passes).
            enable_checkpointing=any(
                isinstance(c, ModelCheckpoint) for c in kwargs.get("callbacks") or []
            ),
            default_root_dir=str(tmp_path),
        )
        settings.update(kwargs)
        settings.update(max_steps=STEPS, max_epochs=None)
        return real(*args, **settings)

    monkeypatch.setattr(lightning, "Trainer", trainer)
    monkeypatch.setattr(pl, "Trainer", trainer)
    monkeypatch.chdir(tmp_path)  # a WandbLogger writes ./wandb here (offline: conftest)


def test_the_readme_has_python_blocks_to_run():
    assert len(readme_blocks()) >= 4


@pytest.mark.parametrize("code, setup", readme_blocks())
def test_a_readme_python_block_runs(code, setup, code_text, prose_text, short_trainers):
    if re.search(r"^\s*import torchmetrics", code, re.M):
        pytest.importorskip("torchmetrics")
    available = stand_ins(code_text, prose_text)
    namespace: dict[str, Any] = {"__name__": "readme"}
    if setup:
        namespace.update(helpers=helpers, code_text=code_text, prose_text=prose_text)
        exec(compile(setup, "README setup", "exec"), namespace)
    missing = free_names(code) - set(namespace)
    unknown = missing - set(available)
    assert not unknown, (
        f"the block uses {sorted(unknown)} without defining them: add a stand-in to"
        " tests/test_readme.py or a `<!-- readme-test: ... -->` comment above the block"
    )
    namespace.update({name: available[name]() for name in missing})
    exec(compile(code, "README.md", "exec"), namespace)


def test_the_readme_points_only_at_files_in_the_repository():
    with open(README) as f:
        text = f.read()
    # `../x` leaves the repository (`.../x` is the README's ellipsis for a metric key).
    assert not re.search(r"(?<!\.)\.\./", text), "the README names a path outside the repository"
    targets = re.findall(r"\]\(([^)#\s]+)\)", text)  # [text](target) links and images
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "expected the README's own images and links"
    missing = [t for t in local if not os.path.exists(os.path.join(ROOT, t))]
    assert not missing, f"the README links to files the repository lacks: {missing}"
