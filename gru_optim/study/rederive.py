"""Re-derive a study's comparisons from its published per-run records.

``python -m gru_optim.study.rederive docs/results/study_full/summary.json`` prints the
paragraph the README quotes: :func:`~._verdict.verdict` of those records (paired
differences per seed, 95% t intervals, Holm's correction, the oracles' noise floor),
after a sentence naming the records it comes from; ``--readme README.md`` writes it into
the README's generated block.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._verdict import verdict

__all__ = ["paragraph"]


def paragraph(records: Sequence[dict[str, Any]], source: str) -> str:
    """The results paragraph of ``records`` (read from ``source``, named in it)."""
    clean = [{k: (math.nan if v is None else v) for k, v in r.items()} for r in records]
    return f"Re-derived from the per-run records in `{source}`. " + verdict(clean)


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
    """Print :func:`paragraph` of the ``summary.json`` named on the command line; with
    ``--readme PATH``, also write it into that file's generated block."""
    args = list(sys.argv[1:] if argv is None else argv)
    readme = None
    if len(args) == 3 and args[1] == "--readme":
        readme = args[2]
        args = args[:1]
    if len(args) != 1:
        print(
            "usage: python -m gru_optim.study.rederive path/to/summary.json [--readme README.md]",
            file=sys.stderr,
        )
        return 2
    text = paragraph(json.loads(Path(args[0]).read_text()), args[0])
    print(text)
    if readme is not None:
        write_readme(readme, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
