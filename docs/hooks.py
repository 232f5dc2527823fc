"""MkDocs hooks for the gru_optim site (listed under ``hooks:`` in mkdocs.yml).

- The version lives in one place, ``gru_optim/_version.py``: it is read from there (without
  importing the package) and replaces ``{{ version }}`` in every page; the footer shows it.
- Docstrings use reST roles (``:func:`name```); in the rendered API reference each becomes
  a link to the object it names (or plain code when it is not an API object of the site).
- The ``<!-- docs-test: ... -->`` markers that tests/test_docs.py reads are HTML comments and
  never reach the page.
- MathJax is served from the site itself (offline viewing renders the mathematics): its
  SVG build is copied from the ``django-static-mathjax`` package of the docs extra, and the
  build fails if a page with mathematics does not load it or loads anything from a CDN.
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


MATHJAX_URI = "javascripts/vendor/mathjax/tex-svg.js"
_CDN = re.compile(r"""(?:src|href)=["']https?://[^"']*(?:mathjax|unpkg|jsdelivr|cdnjs)""", re.I)


def mathjax_source() -> Path:
    """The MathJax 3 SVG build inside the installed ``django-static-mathjax`` package."""
    import importlib.util

    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("MathJax is missing: install the docs extra (pip install -e '.[docs]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "static/mathjax/es5/tex-svg.js"
    if not path.is_file():
        raise RuntimeError(f"no MathJax build at {path}")
    return path


def check_offline_math(site_dir: Path) -> int:
    """Every built page with mathematics loads the site's own MathJax, and no page loads a
    script or style from a CDN. Returns the number of pages with mathematics."""
    pages = 0
    for page in site_dir.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        if _CDN.search(html):
            raise RuntimeError(f"{page} loads from a CDN: {_CDN.search(html).group(0)}")
        if 'class="arithmatex"' in html:
            pages += 1
            if MATHJAX_URI.rsplit("/", 1)[-1] not in html:
                raise RuntimeError(f"{page} has mathematics but does not load MathJax")
    if not (site_dir / MATHJAX_URI).is_file():
        raise RuntimeError(f"{MATHJAX_URI} was not copied into the site")
    return pages


def on_files(files: Any, *, config: Any, **kwargs: Any) -> Any:
    from mkdocs.structure.files import File

    files.append(File.generated(config, MATHJAX_URI, abs_src_path=str(mathjax_source())))
    return files


def on_post_build(*, config: Any, **kwargs: Any) -> None:
    if check_offline_math(Path(config["site_dir"])) == 0:
        raise RuntimeError("no page with mathematics was found: the check is not looking")


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
