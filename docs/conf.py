"""Sphinx configuration: Markdown pages (myst-parser) and an API reference from the docstrings.

Build the site as CI does (strict: every warning is an error)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # autodoc documents this checkout, installed or not

from lightning_overtrain import __version__  # noqa: E402

project = "lightning-overtrain"
author = "lightning-overtrain contributors"
copyright = "lightning-overtrain contributors"
release = version = __version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3  # `page.md#a-heading` links resolve to the heading's slug

# Google-style docstrings (`Args:`, `Returns:`, `Raises:`, `Example::`).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # `Attributes:` as fields, not second descriptions of dataclass fields
autodoc_member_order = "bysource"
autodoc_typehints = "description"  # hints in the argument list, not a long signature
autodoc_default_options = {"members": True, "show-inheritance": True}
# Dependencies autodoc need not import to document the names (the package imports them).
autodoc_mock_imports = ["wandb", "matplotlib"]

html_theme = "alabaster"
html_title = f"lightning-overtrain {release}"

# The pages of the site, in reading order. A page not written yet is left out (the
# toctree below is built from the pages that exist), and a page not listed here comes
# after these, so a new page never breaks the build or goes missing.
PAGES = [
    "quickstart",
    "inflection",
    "finetune",
    "cli",
    "distributed",
    "wandb",
    "speed",
    "reliability",
    "reproduction",
    "figures",
    "fabric",
    "hf-trainer",
    "plain-loop",
    "architecture",
    "api",
]
TOCTREE_PLACEHOLDER = "<!-- pages -->"


def _pages(docs: str) -> list[str]:
    """The pages under ``docs``, PAGES' order first, every other page after, index excluded."""
    found = {name[: -len(".md")] for name in os.listdir(docs) if name.endswith(".md")}
    found.discard("index")
    return [p for p in PAGES if p in found] + sorted(found - set(PAGES))


def _fill_toctree(app, docname: str, source: list[str]) -> None:
    if docname == "index":
        source[0] = source[0].replace(TOCTREE_PLACEHOLDER, "\n".join(_pages(app.srcdir)))


def _reread_index(app, env, added, changed, removed) -> list[str]:
    return ["index"]  # an incremental build sees a page added or removed since the last


def setup(app) -> None:
    app.connect("source-read", _fill_toctree)
    app.connect("env-get-outdated", _reread_index)
