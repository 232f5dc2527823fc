"""Re-derive a study's comparisons from its published per-run records.

``python -m gru_optim.study.rederive docs/results/study_full/summary.json`` prints the
paragraph the README quotes: :func:`~._verdict.verdict` of those records (paired
differences per seed, 95% t intervals, Holm's correction, the oracles' noise floor),
after a sentence naming the records it comes from.
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


def main(argv: Sequence[str] | None = None) -> int:
    """Print :func:`paragraph` of the ``summary.json`` named on the command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m gru_optim.study.rederive path/to/summary.json", file=sys.stderr)
        return 2
    print(paragraph(json.loads(Path(args[0]).read_text()), args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
