"""The documentation site builds in strict mode: any Sphinx warning fails CI.

A warning is a broken cross-reference or heading link, a page missing from the
contents, or a docstring autodoc cannot render (a malformed ``Args:`` block, say).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

pytest.importorskip("sphinx")
pytest.importorskip("myst_parser")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> str:
    """The site, built as CI builds it: ``sphinx-build -W --keep-going -b html docs OUT``."""
    out = str(tmp_path_factory.mktemp("site"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    proc = subprocess.run(
        [*command, DOCS, out], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, f"the docs build warns or fails:\n{proc.stderr[-5000:]}"
    return out


def page(site: str, name: str) -> str:
    with open(os.path.join(site, name)) as f:
        return f.read()


@pytest.mark.slow
def test_every_page_is_in_the_contents(site):
    index = page(site, "index.html")
    names = sorted(n[: -len(".md")] for n in os.listdir(DOCS) if n.endswith(".md"))
    unlisted = [n for n in names if n != "index" and f'href="{n}.html"' not in index]
    assert not unlisted, f"pages missing from the site's contents: {unlisted}"


@pytest.mark.slow
def test_the_api_reference_renders_the_docstrings(site):
    api = page(site, "api.html")
    # Each public name has its entry, and napoleon turned `Args:` into a parameter list.
    for name in ("OvertrainingMonitor", "NoiseProbe", "FineTuneProbe", "InflectionPolicy"):
        assert f'id="lightning_overtrain.{name}"' in api, name
    assert "Parameters" in api and "reference_data" in api
