"""``make demo``: a real unlearning study end to end, GRU against plain unlearning.

``python -m gru_optim.demo`` runs the ``demo`` preset (a few minutes on two CPU cores);
``python -m gru_optim.demo --preset full`` the study behind ``docs/results/``. Results go
to ``results/<preset>/``; trained models are cached under ``results/cache/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Run a preset, print its table, the plot's path, a one-sentence verdict and the wall
    time. Returns the exit status."""
    t0 = time.perf_counter()
    parser = argparse.ArgumentParser(prog="python -m gru_optim.demo", description=__doc__)
    parser.add_argument("--preset", default="demo", help="demo (default) or full")
    parser.add_argument("--out", default=None, help="output folder (default results/<preset>)")
    parser.add_argument("--cache-dir", default="results/cache", help="trained-model cache")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="a folder in TOFU's file layout to use instead of the generated corpus",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the table, plot and README of --out from its summary.json",
    )
    args = parser.parse_args(argv)
    try:
        from .study import PRESETS, run_study
        from .study._report import markdown_table, verdict
    except ImportError as e:  # pragma: no cover - missing extra
        print(
            f"the study needs the 'study' extra: pip install -e '.[study]' ({e})",
            file=sys.stderr,
        )
        return 2
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[args.preset]
    if args.data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=args.data_dir, truth_reference="paraphrase")
    if args.threads is not None:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    out = Path(args.out or f"results/{cfg.name}")
    if args.report_only:
        from .study._report import report_from_dir

        paths = report_from_dir(out)
        print(paths["table"].read_text())
        print(f"Plot: {paths['plot']}")
        return 0
    print(
        f"GRU unlearning study, preset '{cfg.name}': {len(cfg.methods)} methods x "
        f"{{plain, GRU}} x {len(cfg.lrs)} lr x {len(cfg.seeds)} seed(s), {cfg.steps} steps"
    )
    command = "python -m gru_optim.demo " + " ".join(sys.argv[1:] if argv is None else argv)
    records = run_study(cfg, out_dir=out, cache_dir=args.cache_dir, command=command.strip())
    print()
    print(markdown_table(records))
    print()
    print(
        f"Plot: {out / 'tradeoff.png'}  "
        f"(table: {out / 'table.md'}, records: {out / 'summary.json'})"
    )
    print(verdict(records))
    print(f"Wall time: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
