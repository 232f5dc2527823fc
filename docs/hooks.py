"""MkDocs hooks for the gru_optim site (listed under ``hooks:`` in mkdocs.yml).

- The version lives in one place, ``gru_optim/_version.py``: it is read from there (without
  importing the package) and replaces ``{{ version }}`` in every page; the footer shows it.
- Docstrings use reST roles (``:func:`name```); in the rendered API reference each becomes
  a link to the object it names (or plain code when it is not an API object of the site).
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

_ROLE = re.compile(r":(?:func|meth|class|data|attr|mod|obj|exc):<code>(?P<target>[^<]*)</code>")
_LITERAL = re.compile(r"::</p>")
_PLACEHOLDER = re.compile(r"\{\{\s*version\s*\}\}")
_API_ID = re.compile(r'id="(gru_optim(?:\.[A-Za-z0-9_]+)*)"')

# Identifiers of every API object rendered on the site, gathered page by page.
_KNOWN_IDS: set[str] = set()


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


def _resolve(target: str, known: set[str], local: set[str]) -> str | None:
    """The identifier a reST role's target names: itself when known, otherwise the one
    known identifier ending in ``.target``, preferring those on the same page."""
    if target in known:
        return target
    matches = sorted(i for i in known if i.endswith("." + target))
    if len(matches) > 1:
        matches = [i for i in matches if i in local] or matches
    return matches[0] if len(matches) == 1 else None


def resolve_roles(html: str, known: set[str], local: set[str] | None = None) -> str:
    """Turn reST roles rendered by Markdown (``:func:<code>x</code>``) into cross-references
    to the API object they name (an ``autoref`` element that mkdocs-autorefs resolves), or
    into plain code when the name is not an API object of the site. ``~a.b.c`` shows ``c``.
    A paragraph ending in reST's literal-block marker ``::`` ends in one colon."""
    local = set(_API_ID.findall(html)) if local is None else local

    def repl(m: re.Match[str]) -> str:
        target = m.group("target")
        short = target.startswith("~")
        target = target.lstrip("~")
        shown = target.rsplit(".", 1)[-1] if short else target
        ident = _resolve(target, known, local)
        if ident is None:
            return f"<code>{shown}</code>"
        return f'<autoref identifier="{ident}" optional><code>{shown}</code></autoref>'

    return _LITERAL.sub(":</p>", _ROLE.sub(repl, html))


def on_config(config: Any, **kwargs: Any) -> Any:
    version = read_version()
    config["extra"]["gru_version"] = version
    config["copyright"] = f"gru_optim {version} · MIT License"
    _KNOWN_IDS.clear()
    return config


def on_page_markdown(markdown: str, *, config: Any, **kwargs: Any) -> str:
    return substitute_version(markdown, config["extra"]["gru_version"])


def on_page_content(html: str, **kwargs: Any) -> str:
    _KNOWN_IDS.update(_API_ID.findall(html))
    return html


def on_env(env: Any, *, config: Any, files: Any, **kwargs: Any) -> Any:
    # Runs after every page's content exists and before mkdocs-autorefs (priority -50)
    # resolves the cross-references.
    for file in files:
        page = getattr(file, "page", None)
        if page is not None and page.content:
            page.content = resolve_roles(page.content, _KNOWN_IDS)
    return env
