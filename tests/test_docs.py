"""Every ```python block on every page (README.md and docs/*.md) runs, with small stand-ins.

A block sees, ready-made, any of the names in ``STAND_INS`` that it uses without
defining (``model``, ``train_loader``, ``held_out_loader``, ...: a tiny byte-level GPT-2
and a few batches of standard-library code), and ``L.Trainer`` stops after a few
steps. A block that needs more declares it in an HTML comment right above it, run
first in the block's namespace (``helpers`` is tests/conftest.py)::

    <!-- readme-test: my_batches = helpers.reference_batches(code_text, n=2) -->

A snippet that raises fails this test, and so CI. The pages also cite only files the
repository holds, and their sample console lines have the shape the console prints.
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
DOCS = os.path.join(ROOT, "docs")


def pages() -> list[str]:
    """README.md and every Markdown page under docs/, as paths relative to the repository."""
    found = sorted(f"docs/{name}" for name in os.listdir(DOCS) if name.endswith(".md"))
    return ["README.md", *found]


def read(page: str) -> str:
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


# An optional `<!-- readme-test: setup code -->` (never spanning another comment's end)
# right above a ```python fence, then the block.
BLOCK = re.compile(
    r"(?:<!--\s*readme-test:(?P<setup>(?:(?!-->).)*)-->[ \t]*\n)?```python\n(?P<code>.*?)\n```",
    re.S,
)
STEPS = 3  # every Trainer on a page stops here: the snippets must run, not train


def page_blocks(page: str) -> list[Any]:
    """The ```python blocks of one page, each a ``pytest.param(page, code, setup)``."""
    text = read(page)
    blocks = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code"))  # lines above the block
        heading = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        name = f"{page}:{line}-{heading[-1] if heading else 'top'}".replace(" ", "_")
        # Padded with the lines above it, so a traceback points at the page's own line.
        code = "\n" * line + match.group("code")
        blocks.append(pytest.param(page, code, (match.group("setup") or "").strip(), id=name))
    return blocks


def all_blocks() -> list[Any]:
    return [block for page in pages() for block in page_blocks(page)]


def pairs(text: bytes) -> TensorDataset:
    """``(x, y)`` examples: ``y`` is ``x`` shifted by one token."""
    ids = ByteWindows(text, helpers.CONTEXT + 1).tokens.long()
    return TensorDataset(ids[:, :-1], ids[:, 1:])


def stand_ins(code_text: bytes, prose_text: bytes) -> dict[str, Callable[[], Any]]:
    """The user's objects the pages name, each built only if a block uses it."""
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
    """``L.Trainer(...)`` as a page writes it, on CPU, for a few steps, in tmp_path."""
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


def test_the_readme_and_the_pages_have_python_blocks_to_run():
    assert len(page_blocks("README.md")) >= 3
    assert len(all_blocks()) >= 10


@pytest.mark.parametrize("page, code, setup", all_blocks())
def test_a_python_block_on_a_page_runs(page, code, setup, code_text, prose_text, short_trainers):
    if re.search(r"^\s*import torchmetrics", code, re.M):
        pytest.importorskip("torchmetrics")
    available = stand_ins(code_text, prose_text)
    namespace: dict[str, Any] = {"__name__": "readme"}
    if setup:
        namespace.update(helpers=helpers, code_text=code_text, prose_text=prose_text)
        exec(compile(setup, f"{page} setup", "exec"), namespace)
    missing = free_names(code) - set(namespace)
    unknown = missing - set(available)
    assert not unknown, (
        f"a block of {page} uses {sorted(unknown)} without defining them: add a stand-in to"
        " tests/test_docs.py or a `<!-- readme-test: ... -->` comment above the block"
    )
    namespace.update({name: available[name]() for name in missing})
    exec(compile(code, page, "exec"), namespace)


# Where a page may point: the repository's own folders, and the package's subpackages,
# which the pages name as `engine/noise.py` (a path inside lightning_overtrain/).
PACKAGE = "lightning_overtrain"
REPO_DIRS = (PACKAGE, "examples", "benchmarks", "tests", "docs", "requirements", ".ci")
SUBPACKAGES = tuple(
    name for name in os.listdir(os.path.join(ROOT, PACKAGE)) if not name.startswith("_")
)
# A file named by its path: `dir/.../name.ext`, in backticks, a code block or prose. Paths
# under other folders (`runs/...`, `ckpt/...`) are what a run writes, not the repository's.
PATH = re.compile(r"(?<![\w/.<>*-])((?:[\w.-]+/)+[\w.-]+\.[a-z]{2,5})(?![\w/<>*-])")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")  # [text](target) links and images


def cited_files(page: str) -> list[tuple[str, str]]:
    """``(as written, path from the repository root)`` for each file the page names."""
    text, here = read(page), os.path.dirname(page)
    cited = []
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            cited.append((target, os.path.normpath(os.path.join(here, target))))
    for path in PATH.findall(text):
        top = path.split("/")[0]
        if top in REPO_DIRS:
            cited.append((path, path))
        elif top in SUBPACKAGES:
            cited.append((path, f"{PACKAGE}/{path}"))
    # A capitalized document (`CHANGELOG.md`) lives at the root; nothing else is named bare.
    cited.extend((name, name) for name in re.findall(r"(?<![\w/.-])([A-Z][A-Z_]+\.md)\b", text))
    return cited


@pytest.mark.parametrize("page", pages())
def test_a_page_cites_only_files_in_the_repository(page):
    cited = cited_files(page)
    outside = [w for w, path in cited if path.startswith("..") or os.path.isabs(path)]
    assert not outside, f"{page} points outside the repository: {outside}"
    missing = sorted({w for w, path in cited if not os.path.exists(os.path.join(ROOT, path))})
    assert not missing, f"{page} cites files the repository lacks: {missing}"


def test_the_file_check_sees_links_paths_and_documents():
    """The check above would catch each way a page names a file."""
    text = (
        "[a](docs/nowhere.md) ![b](docs/reproduction.png) `benchmarks/gone.py` and"
        " engine/nowhere.py, DESIGN.md; runs/x/history.jsonl is a run's output"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(f"{__name__}.read", lambda page: text)
        cited = dict(cited_files("README.md"))
    assert cited == {
        "docs/nowhere.md": "docs/nowhere.md",
        "docs/reproduction.png": "docs/reproduction.png",
        "benchmarks/gone.py": "benchmarks/gone.py",
        "engine/nowhere.py": "lightning_overtrain/engine/nowhere.py",
        "DESIGN.md": "DESIGN.md",
    }


# The console's line for records in each of the detector's states, from the console's
# own formatting: a page's sample line must have the shape of one of them.
_SIGNAL = "inflection/noise/gamma=1/perturbed_loss"
_SNAPSHOT = {
    "tokens": 1_778_279,
    "step": 435,
    "reference_loss": 1.9981,
    "noise/gamma=0.25/delta": 0.0166,
    "noise/gamma=0.5/delta": 0.0655,
    "noise/gamma=1/delta": 0.2495,
    "probe_seconds": 40.4,
}
DETECTOR_STATES = {
    "no turn yet": {},
    "a forecast": {f"{_SIGNAL}/forecast_tokens": 2_150_000},
    "a far forecast": {f"{_SIGNAL}/forecast_tokens": 9e9},
    "rising": {f"{_SIGNAL}/rise": 0.2, f"{_SIGNAL}/rise_threshold": 0.1},
    "turned up": {f"{_SIGNAL}/crossed": 1.0, f"{_SIGNAL}/bottom_tokens": 1_000_000},
    "a probe failed": {"probe_failures": 1},
}
NUMBER = r"~?-?\d+(?:\.\d+)?(?:e[+-]?\d+)?[kMBT]?"


def shape(line: str) -> re.Pattern[str]:
    """The line with every number a wildcard: its fields, words and separators remain."""
    pieces = re.split(NUMBER, line.strip())
    return re.compile(NUMBER.join(re.escape(piece) for piece in pieces))


def sample_lines(page: str) -> list[str]:
    """The console lines a page shows as output (indented, as Markdown code)."""
    return re.findall(r"^(?: {4}|\t)(OvertrainingMonitor @ .+)$", read(page), re.M)


def test_the_readme_shows_a_console_line():
    assert sample_lines("README.md")


@pytest.mark.parametrize(
    "page, line", [(page, line) for page in pages() for line in sample_lines(page)]
)
def test_a_sample_console_line_has_the_shape_the_console_prints(page, line):
    from lightning_overtrain.reporting.console import format_snapshot

    printed = {
        name: format_snapshot({**_SNAPSHOT, **keys}) for name, keys in DETECTOR_STATES.items()
    }
    assert any(shape(line).fullmatch(out) for out in printed.values()), (
        f"{page} shows a console line that the console no longer prints:\n  {line}\n"
        "it prints, for example:\n  " + "\n  ".join(printed.values())
    )


def test_the_shape_check_tells_fields_apart():
    """Numbers may differ; a field renamed, added or dropped may not."""
    from lightning_overtrain.reporting.console import format_snapshot

    line = format_snapshot(_SNAPSHOT)
    assert shape(line).fullmatch(format_snapshot({**_SNAPSHOT, "tokens": 5e6, "step": 9}))
    assert not shape(line).fullmatch(line.replace("reference loss", "loss"))
    assert not shape(line).fullmatch(line.replace(" | probes", " | timing"))
    without_gamma = {k: v for k, v in _SNAPSHOT.items() if k != "noise/gamma=1/delta"}
    assert not shape(line).fullmatch(format_snapshot(without_gamma))


def test_the_api_reference_lists_every_public_name():
    """A name added to ``lightning_overtrain.__all__`` needs its one line in docs/api.md."""
    import lightning_overtrain

    api = read("docs/api.md")
    documented = set(re.findall(r"^\.\. auto\w+:: lightning_overtrain\.(\w+)$", api, re.M))
    missing = sorted(set(lightning_overtrain.__all__) - {"__version__"} - documented)
    assert not missing, f"docs/api.md lacks an autodoc line for {missing}"


def test_the_readme_shows_the_command_ci_runs_verbatim():
    """The README's second command is the project's contract: `.ci/run` runs it as written."""
    ci = read(".ci/run").strip().splitlines()[-1]
    assert ci.startswith("python3 -m venv .venv")
    assert ci in read("README.md").splitlines()


def test_the_architecture_page_names_every_module_of_the_package():
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        page = f.read()
    modules = [
        os.path.relpath(os.path.join(folder, name), ROOT)
        for folder, _, names in os.walk(os.path.join(ROOT, "lightning_overtrain"))
        for name in names
        if name.endswith(".py") and name not in ("__init__.py", "__main__.py")
    ]
    unnamed = [m for m in modules if os.path.basename(m) not in page]
    assert not unnamed, f"docs/architecture.md does not say what these modules do: {unnamed}"
