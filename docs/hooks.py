"""MkDocs hooks for the gru_optim site (listed under ``hooks:`` in mkdocs.yml).

- The version lives in one place, ``gru_optim/_version.py``: it is read from there (without
  importing the package) and replaces ``{{ version }}`` in every page; the footer shows it.
- Docstrings use reST roles (``:func:`name```); in the rendered API reference those roles
  are shown as plain code.
- The ``<!-- docs-test: ... -->`` markers that tests/test_docs.py reads are HTML comments and
  never reach the page.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VERSION_FILE = ROOT / "gru_optim" / "_version.py"

_ROLE = re.compile(r":(?:func|meth|class|data|attr|mod|obj|exc):(<code>[^<]*</code>)")
_LITERAL = re.compile(r"::</p>")
_PLACEHOLDER = re.compile(r"\{\{\s*version\s*\}\}")


def read_version(path: Path = VERSION_FILE) -> str:
    """The value assigned to ``__version__`` in ``path``, read with :mod:`ast`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            value = node.value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
    raise ValueError(f"no __version__ = '...' string in {path}")


def substitute_version(markdown: str, version: str) -> str:
    """Replace every ``{{ version }}`` placeholder with ``version``."""
    return _PLACEHOLDER.sub(version, markdown)


def strip_roles(html: str) -> str:
    """``:func:<code>x</code>`` (a reST role rendered by Markdown) becomes ``<code>x</code>``,
    and a paragraph ending in reST's literal-block marker ``::`` ends in one colon."""
    return _LITERAL.sub(":</p>", _ROLE.sub(r"\1", html))


def on_config(config: Any, **kwargs: Any) -> Any:
    version = read_version()
    config["extra"]["gru_version"] = version
    config["copyright"] = f"gru_optim {version} · MIT License"
    return config


def on_page_markdown(markdown: str, *, config: Any, **kwargs: Any) -> str:
    return substitute_version(markdown, config["extra"]["gru_version"])


def on_page_content(html: str, **kwargs: Any) -> str:
    return strip_roles(html)
