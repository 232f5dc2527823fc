"""Re-derive a study's comparisons from its published per-run records.

``python -m gru_optim.study.rederive docs/results/study_full/summary.json
docs/results/study_large/summary.json`` prints, per study, the paragraph the README
quotes: its :func:`~._verdict.headline` (the one-sentence verdict ``make demo`` prints
with ``--brief``), then :func:`~._verdict.verdict` of those records (paired differences
per seed, 95% t intervals, Holm's correction, the oracles' noise floor) after a sentence
naming the records; ``--readme README.md`` writes them into the README's generated block.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._verdict import headline, verdict

__all__ = ["END", "START", "brief", "label_of", "paragraph", "write_readme"]


def _clean(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON's ``null`` (a metric not measured) as NaN, as the statistics expect."""
    return [{k: (math.nan if v is None else v) for k, v in r.items()} for r in records]


def label_of(summary: str | Path) -> str:
    """How the words name the study of ``summary`` (its ``meta.json``'s preset, else the
    folder)."""
    path = Path(summary)
    meta = path.with_name("meta.json")
    if meta.exists():
        return f"The `{json.loads(meta.read_text())['preset']}` preset"
    return f"The study in `{path.parent}`"


def paragraph(records: Sequence[dict[str, Any]], source: str, label: str | None = None) -> str:
    """The results paragraph of ``records`` (read from ``source``, named in it): with a
    ``label``, ``"**label.** "`` and the headline first."""
    clean = _clean(records)
    head = f"**{label}.** {headline(clean)} " if label else ""
    return f"{head}Re-derived from the per-run records in `{source}`. " + verdict(clean)


def brief(records: Sequence[dict[str, Any]], label: str) -> str:
    """``label``: the one-sentence verdict (what ``make demo`` prints)."""
    return f"{label}: {headline(_clean(records))}"


START = "<!-- study-results: generated, do not edit by hand -->"
END = "<!-- /study-results -->"


def write_readme(readme: str | Path, text: str) -> None:
    """Put ``text`` between the :data:`START` and :data:`END` markers of ``readme``."""
    path = Path(readme)
    page = path.read_text()
    if START not in page or END not in page:
        raise ValueError(f"{path} has no {START} ... {END} block to fill")
    head, rest = page.split(START, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    """Print :func:`paragraph` of each ``summary.json`` named on the command line (with
    ``--brief``, :func:`brief`); with ``--readme PATH``, also write the paragraphs into
    that file's generated block. Returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m gru_optim.study.rederive", description=__doc__)
    p.add_argument("summaries", nargs="+", help="a study's summary.json (its per-run records)")
    p.add_argument("--readme", default=None, help="write the paragraphs into this page's block")
    p.add_argument("--brief", action="store_true", help="one sentence per study")
    args = p.parse_args(argv)
    texts = []
    for s in args.summaries:
        if not Path(s).exists():
            p.error(f"{s}: no such file (a study's summary.json, e.g. docs/results/study_full/)")
        records = json.loads(Path(s).read_text())
        label = label_of(s)
        texts.append(brief(records, label) if args.brief else paragraph(records, s, label))
    text = "\n\n".join(texts)
    print(text)
    if args.readme is not None:
        write_readme(args.readme, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
