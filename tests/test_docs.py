"""Every ```python block of README.md and docs/**/*.md runs as a test.

How the blocks run
------------------
- A page's blocks run in order in one fresh namespace (``__name__ == "__main__"``), in a
  subprocess of their own: blocks of one page share state, pages are independent.
- Each block is its own test item, ``test_doc_block[<page>:<n>]`` (``n`` counts the page's
  python blocks from 1). The page runs once, when its first item runs; an item fails with
  its block's traceback (line numbers are those of the Markdown file), or because an
  earlier block of its page failed.
- The subprocess runs in an empty temporary directory (files a block writes go there),
  with the repository root first on ``sys.path``, ``OMP_NUM_THREADS=1`` unless set, and
  pytest's warning filters (the ``filterwarnings`` ini option, then ``-W``, applied as
  pytest applies them): under ``pytest -W error`` a warning in a block fails it.
- Each block has a time limit: 60 s, or ``timeout=N`` from a marker.
- Pages run two at a time (``GRU_DOCS_JOBS=N`` to change it), each item waiting for its
  page's results.

Markers (an HTML comment on the line right before the opening fence, invisible on the
rendered page)::

    <!-- docs-test: timeout=180 -->      a longer time limit for the next block
    <!-- docs-test: no-run -->           the next block is only compiled, never executed

``no-run`` is for blocks that truly cannot run here (several GPUs, a download); prefer a
runnable block. A ``no-run`` block is still a test item: it must compile. The attribute
form ```` ```{.python .no-run} ```` is accepted too (an invisible CSS class). Words after
the language in a plain info string (```` ```python no-run ````) are refused: the
Markdown renderer (pymdownx.superfences) then no longer sees a fence and the page breaks;
only ``key="value"`` options (``title="train.py"``) may follow the language.

Blocks in other languages (bash, text, pycon, ...) are not collected.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _pytest.config import apply_warning_filters

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT = 60.0
LANGUAGES = {"python", "py", "python3"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    index: int  # 1-based among the page's python blocks
    line: int  # 1-based line of the first line of code
    source: str
    run: bool
    timeout: float
    problem: str | None = None  # why the block is malformed (its test item fails)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.index}"


_Options = tuple[bool, float | None, str | None]  # run, timeout, problem


def _parse_options(words: list[str]) -> _Options:
    run, timeout, problem = True, None, None
    for word in words:
        if word in ("no-run", "norun"):
            run = False
        elif re.fullmatch(r"timeout=\d+(\.\d*)?", word):
            timeout = float(word.split("=", 1)[1])
        else:
            problem = f"unknown docs-test option {word!r} (known: no-run, timeout=SECONDS)"
    return run, timeout, problem


_OPTION = re.compile(r'^[A-Za-z_][\w-]*=("[^"]*"|\'[^\']*\'|\S+)$')


def _parse_info(info: str) -> tuple[str, bool, str | None]:
    """(language, runnable, problem) of a fence's info string."""
    if info.startswith("{") and info.endswith("}"):
        classes = [t[1:] for t in info[1:-1].split() if t.startswith(".")]
        lang = classes[0].lower() if classes else ""
        return lang, not ({"no-run", "norun"} & set(classes[1:])), None
    lang, _, rest = info.partition(" ")
    lang = lang.lower()
    extra = [w for w in re.findall(r'\S+="[^"]*"|\S+=\'[^\']*\'|\S+', rest) if not _OPTION.match(w)]
    if extra:
        return (
            lang,
            False,
            (
                f"the fence's info string {info!r} has words after the language, which breaks "
                "the rendered page; mark the block with <!-- docs-test: no-run --> on the line "
                "before the fence, or write ```{.python .no-run}"
            ),
        )
    return lang, True, None


def extract_blocks(text: str, page: str) -> list[Block]:
    """The python code blocks of a Markdown page, with their markers applied."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    pending: _Options | None = None
    while i < len(lines):
        marker = _MARKER.match(lines[i])
        if marker:
            pending = _parse_options(marker.group("body").split())
            i += 1
            continue
        m = _FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                pending = None  # a marker applies to the very next fence only
            i += 1
            continue
        indent, fence = m.group("indent"), m.group("fence")
        info = m.group("info").strip()
        lang, info_run, problem = _parse_info(info)
        j = i + 1
        close = re.compile(r"^[ \t]*" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$")
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        if lang in LANGUAGES:
            body = [
                ln[len(indent) :] if ln.startswith(indent) else ln.lstrip()
                for ln in lines[i + 1 : j]
            ]
            run, timeout, marker_problem = pending if pending is not None else (True, None, None)
            problem = problem or marker_problem
            blocks.append(
                Block(
                    page=page,
                    index=len(blocks) + 1,
                    line=i + 2,
                    source="\n".join(body) + "\n",
                    run=run and info_run and problem is None,
                    timeout=timeout or DEFAULT_TIMEOUT,
                    problem=problem,
                )
            )
        pending = None
        i = j + 1
    return blocks


def doc_pages() -> list[Path]:
    pages = [ROOT / "README.md"] if (ROOT / "README.md").exists() else []
    pages += sorted((ROOT / "docs").rglob("*.md"))
    return pages


def _all_blocks() -> list[Block]:
    out: list[Block] = []
    for path in doc_pages():
        out += extract_blocks(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    return out


BLOCKS = _all_blocks()


# --------------------------------------------------------------------------- child side
class _BlockTimeout(Exception):
    pass


def _child_main(spec_path: str, result_path: str) -> None:
    """Run a page's blocks in order in one namespace; write one result line per block."""
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, spec["root"])
    filters = spec.get("warnings", {"ini": [], "cmdline": []})
    warnings.filterwarnings("always", category=DeprecationWarning)
    warnings.filterwarnings("always", category=PendingDeprecationWarning)
    apply_warning_filters(filters["ini"], filters["cmdline"])
    namespace: dict[str, object] = {"__name__": "__main__", "__builtins__": __builtins__}

    def on_alarm(signum: int, frame: object) -> None:
        raise _BlockTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    with open(result_path, "a", encoding="utf-8") as out:
        for b in spec["blocks"]:
            start = time.perf_counter()
            status, detail = "ok", ""
            try:
                # Padding with newlines makes tracebacks show the Markdown file's line numbers.
                code = compile("\n" * (b["line"] - 1) + b["source"], b["path"], "exec")
                if b["run"]:
                    signal.setitimer(signal.ITIMER_REAL, b["timeout"])
                    try:
                        exec(code, namespace)
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
            except _BlockTimeout:
                status, detail = "timeout", f"block ran past its time limit of {b['timeout']:g} s"
            except BaseException:  # noqa: BLE001 - report everything, SystemExit included
                status, detail = "error", traceback.format_exc()
            elapsed = time.perf_counter() - start
            out.write(
                json.dumps(
                    {"index": b["index"], "status": status, "detail": detail, "seconds": elapsed}
                )
                + "\n"
            )
            out.flush()
            if status != "ok":
                break


# --------------------------------------------------------------------------- parent side
_RESULTS: dict[str, dict[int, dict[str, object]]] = {}
_FUTURES: dict[str, concurrent.futures.Future[dict[int, dict[str, object]]]] = {}


def _jobs() -> int:
    """Pages run this many at a time (``GRU_DOCS_JOBS``; default: 2, or 1 on one core)."""
    env = os.environ.get("GRU_DOCS_JOBS")
    return max(1, int(env)) if env else min(2, os.cpu_count() or 1)


@pytest.fixture(scope="module")
def page_pool(request: pytest.FixtureRequest) -> Iterator[None]:
    """Start every page that has a selected test item, a few at a time, in collection
    order; each item then waits for its own page."""
    pages: list[str] = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        block = callspec.params.get("block") if callspec is not None else None
        if isinstance(block, Block) and block.page not in pages:
            pages.append(block.page)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=_jobs())
    for page in pages:
        _FUTURES[page] = pool.submit(_run_page_now, page, request.config)
    try:
        yield
    finally:
        for f in _FUTURES.values():
            f.cancel()
        pool.shutdown(wait=True)
        _FUTURES.clear()


def _run_page(page: str, config: pytest.Config) -> dict[int, dict[str, object]]:
    if page not in _RESULTS:
        future = _FUTURES.get(page)
        _RESULTS[page] = future.result() if future is not None else _run_page_now(page, config)
    return _RESULTS[page]


def _warning_filters(config: pytest.Config) -> dict[str, list[str]]:
    return {
        "ini": list(config.getini("filterwarnings")),
        "cmdline": list(config.known_args_namespace.pythonwarnings or []),
    }


PAGE_SLACK = 60.0  # seconds a page may take beyond the sum of its blocks' limits


def _run_page_now(page: str, config: pytest.Config) -> dict[int, dict[str, object]]:
    return _run_blocks([b for b in BLOCKS if b.page == page], _warning_filters(config))


def _run_blocks(blocks: list[Block], filters: dict[str, list[str]]) -> dict[int, dict[str, object]]:
    """Run blocks of one page in a subprocess; results by block index, and under key 0
    the process's exit code and the tail of its output."""
    with tempfile.TemporaryDirectory(prefix="docs-test-") as tmp:
        spec = {
            "root": str(ROOT),
            "warnings": filters,
            "blocks": [
                {
                    "index": b.index,
                    "line": b.line,
                    "source": b.source,
                    "run": b.run,
                    "timeout": b.timeout,
                    "path": str(ROOT / b.page),
                }
                for b in blocks
            ],
        }
        spec_path = Path(tmp) / "spec.json"
        result_path = Path(tmp) / "results.jsonl"
        spec_path.write_text(json.dumps(spec))
        workdir = Path(tmp) / "cwd"
        workdir.mkdir()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        env.setdefault("OMP_NUM_THREADS", "1")
        env.pop("PYTHONWARNINGS", None)
        budget = sum(b.timeout for b in blocks if b.run) + PAGE_SLACK
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--run-page",
            str(spec_path),
            str(result_path),
        ]
        # A session of its own, so that a timeout also ends the processes a block started.
        with subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        ) as proc:
            try:
                out, _ = proc.communicate(timeout=budget)
                rc: int | None = proc.returncode
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                out, rc = f"{out}\npage ran past its overall limit of {budget:g} s", None
        tail = out[-8000:].strip()
        results: dict[int, dict[str, object]] = {}
        if result_path.exists():
            for line in result_path.read_text().splitlines():
                r = json.loads(line)
                results[r["index"]] = r
    results[0] = {"rc": rc, "output": tail}
    return results


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block(block: Block, request: pytest.FixtureRequest, page_pool: None) -> None:
    if block.problem is not None:
        pytest.fail(f"{block.id} (line {block.line - 1}): {block.problem}", pytrace=False)
    results = _run_page(block.page, request.config)
    r = results.get(block.index)
    if r is None:
        failed = [i for i, v in results.items() if i and v["status"] != "ok"]
        if failed:
            pytest.fail(
                f"not run: block {failed[0]} of {block.page} failed before it", pytrace=False
            )
        pytest.fail(
            f"{block.id} (line {block.line}) produced no result; the page's process exited "
            f"with {results[0]['rc']}:\n{results[0]['output']}",
            pytrace=False,
        )
    if r["status"] != "ok":
        pytest.fail(f"{block.id} (line {block.line}) {r['status']}:\n{r['detail']}", pytrace=False)
    assert r["status"] == "ok"


# --------------------------------------------------------------------------- the harness itself
def test_collects_readme_and_docs() -> None:
    pages = {b.page for b in BLOCKS}
    assert "README.md" in pages
    assert {"docs/quickstart.md", "docs/math.md", "docs/gamma.md", "docs/faq.md"} <= pages
    # Every block of one page has a distinct, consecutive index.
    for page in pages:
        assert [b.index for b in BLOCKS if b.page == page] == list(
            range(1, sum(b.page == page for b in BLOCKS) + 1)
        )


def test_extract_blocks_markers_and_languages() -> None:
    text = "\n".join(
        [
            "# t",
            "```python",
            "a = 1",
            "```",
            "```bash",
            "echo no",
            "```",
            "<!-- docs-test: no-run -->",
            "```python",
            "import missing_module",
            "```",
            "<!-- docs-test: timeout=5 -->",
            "",
            "```py",
            "b = a",
            "```",
            "- item",
            "",
            "    ```python",
            "    c = 2",
            "    ```",
            "````{.python .no-run}",
            "```not a fence end",
            "````",
            '```python title="x.py"',
            "e = 5",
            "```",
            "```python no-run",
            "f = 6",
            "```",
            "<!-- docs-test: no-run -->",
            "text between: the marker no longer applies",
            "```python",
            "d = 4",
            "```",
        ]
    )
    blocks = extract_blocks(text, "x.md")
    assert [b.source for b in blocks] == [
        "a = 1\n",
        "import missing_module\n",
        "b = a\n",
        "c = 2\n",
        "```not a fence end\n",
        "e = 5\n",
        "f = 6\n",
        "d = 4\n",
    ]
    assert [b.run for b in blocks] == [True, False, True, True, False, True, False, True]
    assert [b.timeout for b in blocks] == [DEFAULT_TIMEOUT, DEFAULT_TIMEOUT, 5.0] + [
        DEFAULT_TIMEOUT
    ] * 5
    assert [b.line for b in blocks] == [3, 10, 15, 20, 23, 26, 29, 34]
    assert [b.problem is not None for b in blocks] == [False] * 6 + [True, False]
    assert "docs-test: no-run" in (blocks[6].problem or "")
    (typo,) = extract_blocks("<!-- docs-test: typo -->\n```python\nx\n```\n", "y.md")
    assert not typo.run and "unknown docs-test option 'typo'" in (typo.problem or "")


def _run_fake_page(
    tmp_path: Path,
    sources: list[str],
    run: list[bool] | None = None,
    timeout: float = 20.0,
    filters: dict[str, list[str]] | None = None,
) -> list[dict[str, object]]:
    md = tmp_path / "page.md"
    md.write_text("")
    spec = {
        "root": str(ROOT),
        "warnings": filters or {"ini": [], "cmdline": []},
        "blocks": [
            {
                "index": i + 1,
                "line": 10 * i + 1,
                "source": s,
                "run": True if run is None else run[i],
                "timeout": timeout,
                "path": str(md),
            }
            for i, s in enumerate(sources)
        ],
    }
    spec_path, result_path = tmp_path / "spec.json", tmp_path / "out.jsonl"
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec))
    subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--run-page",
            str(spec_path),
            str(result_path),
        ],
        cwd=tmp_path,
        check=True,
        timeout=120,
    )
    return [json.loads(line) for line in result_path.read_text().splitlines()]


def test_child_shares_state_within_a_page_and_stops_at_a_failure(tmp_path: Path) -> None:
    res = _run_fake_page(
        tmp_path, ["x = 41\n", "x += 1\nassert x == 42\n", "assert x == 0\n", "y = 1\n"]
    )
    assert [r["status"] for r in res] == ["ok", "ok", "error"]
    # The traceback names the Markdown file and the block's line there (block 3 starts at 21).
    assert 'page.md", line 21' in res[2]["detail"]


def test_child_enforces_the_time_limit_and_compiles_no_run_blocks(tmp_path: Path) -> None:
    res = _run_fake_page(tmp_path, ["import time\ntime.sleep(30)\n"], timeout=1.0)
    assert res[0]["status"] == "timeout" and res[0]["seconds"] < 10
    res = _run_fake_page(tmp_path, ["raise SystemExit(3)\n", "x = 1\n"], run=[False, True])
    assert [r["status"] for r in res] == ["ok", "ok"]
    res = _run_fake_page(tmp_path, ["def broken(:\n"], run=[False])
    assert res[0]["status"] == "error" and "SyntaxError" in res[0]["detail"]


def test_page_limit_ends_the_page_and_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "PAGE_SLACK", 2.0)
    pid_file = tmp_path / "pid"
    stubborn = (
        "import subprocess, time\n"
        f"p = subprocess.Popen(['sleep', '600'])\nopen({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "while True:\n    try:\n        time.sleep(10)\n    except BaseException:\n        pass\n"
    )
    block = Block(page="x.md", index=1, line=1, source=stubborn, run=True, timeout=1.0)
    start = time.perf_counter()
    results = _run_blocks([block], {"ini": [], "cmdline": []})
    assert time.perf_counter() - start < 30
    assert results[0]["rc"] is None and "overall limit" in str(results[0]["output"])
    assert 1 not in results  # the block never finished
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed with its session (a zombie until something reaps it)
        try:
            os.kill(grandchild, 0)
            state = Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, FileNotFoundError):
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {grandchild} started by the block is still alive")


def test_child_applies_pytest_warning_filters(tmp_path: Path) -> None:
    warn = "import warnings\nwarnings.warn('old thing', DeprecationWarning)\n"
    res = _run_fake_page(tmp_path, [warn], filters={"ini": [], "cmdline": ["error"]})
    assert res[0]["status"] == "error" and "DeprecationWarning: old thing" in res[0]["detail"]
    # An ini filter that ignores it (a regex, as in setup.cfg) wins over nothing on the
    # command line, and loses to a later command-line filter, as in pytest.
    ignore = "ignore:old th.*:DeprecationWarning"
    res = _run_fake_page(tmp_path, [warn], filters={"ini": ["error", ignore], "cmdline": []})
    assert res[0]["status"] == "ok"
    res = _run_fake_page(tmp_path, [warn], filters={"ini": [ignore], "cmdline": ["error"]})
    assert res[0]["status"] == "error"


def test_version_has_one_source_and_the_changelog_leads_with_it() -> None:
    import gru_optim

    spec = importlib.util.spec_from_file_location("gru_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    assert hooks.read_version() == gru_optim.__version__
    assert hooks.substitute_version("v{{ version }} / {{version}}", "9.9") == "v9.9 / 9.9"
    known = {"gru_optim.functional.segment_sum", "gru_optim.A.step", "gru_optim.B.step"}
    html = (
        ":func:<code>segment_sum</code>, :meth:<code>step</code>, :class:<code>~x.Y</code> "
        "and :class:<code>~gru_optim.functional.segment_sum</code> x::</p>"
    )
    assert hooks.resolve_roles(html, known, local={"gru_optim.B.step"}) == (
        '<autoref identifier="gru_optim.functional.segment_sum" optional><code>segment_sum</code>'
        '</autoref>, <autoref identifier="gru_optim.B.step" optional><code>step</code></autoref>,'
        ' <code>Y</code> and <autoref identifier="gru_optim.functional.segment_sum" optional>'
        "<code>segment_sum</code></autoref> x:</p>"
    )
    # An ambiguous short name with no candidate on the page stays plain code.
    assert hooks.resolve_roles(":meth:<code>step</code>", known, local=set()) == "<code>step</code>"
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    first = re.search(r"^## \[?(\d+\.\d+\.\d+[^\]\s]*)", changelog, re.M)
    assert first is not None and first.group(1) == gru_optim.__version__


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--run-page":
    _child_main(sys.argv[2], sys.argv[3])
