"""Run every CPU benchmark, write docs/results/bench_*.{json,md,png}, refresh docs/benchmarks.md.

    python benchmarks/run_all.py            # full mode (~15-25 minutes on 2 shared cores)
    python benchmarks/run_all.py --quick    # smoke mode: tiny models, seconds per benchmark

Quick mode writes to a scratch folder (``--out``, default a temporary directory) so that
it never overwrites the committed full-mode results; full mode writes to docs/results/
and rewrites the generated sections of docs/benchmarks.md. Finally it checks the issue's
targets and prints them (and stores them in ``bench_summary.json``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import _common as C
import bench_e2e
import bench_memory
import bench_scaling
import bench_step

TARGETS = {
    "own_work_over_adamw": 0.8,
    "own_work_over_adamw_fused": 1.5,
    "reference_over_own_work": 10.0,
    "ema_per_param_byte_fp32": 1.0,
    "e2e_gru_over_graddiff": 1.05,
}


def summary(step: dict[str, Any], memory: dict[str, Any], e2e: dict[str, Any]) -> dict[str, Any]:
    r = step["ratios"]
    p = memory["persistent"]
    checks = {
        "own_work_over_adamw": {
            "value": r["gru_over_adamw"],
            "target": f"<= {TARGETS['own_work_over_adamw']}",
            "met": r["gru_over_adamw"] <= TARGETS["own_work_over_adamw"],
        },
        "own_work_over_adamw_fused": {
            "value": r["gru_over_adamw_fused"],
            "target": f"<= {TARGETS['own_work_over_adamw_fused']}",
            "met": r["gru_over_adamw_fused"] <= TARGETS["own_work_over_adamw_fused"],
        },
        "own_work_over_adamw_fused (skip_nonfinite=False)": {
            "value": r["gru_nocheck_over_adamw_fused"],
            "target": f"<= {TARGETS['own_work_over_adamw_fused']}",
            "met": r["gru_nocheck_over_adamw_fused"] <= TARGETS["own_work_over_adamw_fused"],
        },
        "reference_over_own_work": {
            "value": r["reference_over_gru"],
            "target": f">= {TARGETS['reference_over_own_work']}",
            "met": r["reference_over_gru"] >= TARGETS["reference_over_own_work"],
        },
        "persistent_memory_one_ema": {
            "value": p["fp32"]["ema_per_param_byte"],
            "other_bytes": p["fp32"]["other_bytes"],
            "target": "EMA exactly 1.0 x parameter bytes (fp32), 0.5 (bf16); nothing else "
            "but 0-dim statistics",
            "met": p["fp32"]["ema_per_param_byte"] == 1.0
            and p["bf16"]["ema_per_param_byte"] == 0.5
            and p["fp32"]["other_bytes"] < 1024,
        },
        "e2e_gru_over_graddiff (wall)": {
            "value": e2e["ratio_gru_over_graddiff"],
            "target": f"<= {TARGETS['e2e_gru_over_graddiff']}",
            "met": e2e["ratio_gru_over_graddiff"] <= TARGETS["e2e_gru_over_graddiff"],
        },
        "e2e_gru_over_graddiff (CPU time)": {
            "value": e2e["ratio_cpu_time"],
            "target": f"<= {TARGETS['e2e_gru_over_graddiff']}",
            "met": e2e["ratio_cpu_time"] <= TARGETS["e2e_gru_over_graddiff"],
        },
    }
    return {"size": step["shape"]["name"], "checks": checks}


def summary_markdown(s: dict[str, Any]) -> str:
    rows = [
        [k, v["value"], v["target"], "yes" if v["met"] else "NO"] for k, v in s["checks"].items()
    ]
    return C.markdown_table(["target (at " + s["size"] + ")", "measured", "target", "met"], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, seconds")
    ap.add_argument("--out", default=None, help="results folder")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default 1)")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument(
        "--summary-only",
        action="store_true",
        help="recompute the targets table from the JSON files already in docs/results",
    )
    args = ap.parse_args(argv)
    if args.summary_only:
        import json

        step, memory, e2e = (
            json.loads((C.RESULTS / f"bench_{n}.json").read_text())
            for n in ("step", "memory", "e2e")
        )
        s = summary(step, memory, e2e)
        s["quick"] = False
        s["env"] = step["env"]
        C.write_json("bench_summary", s, C.RESULTS)
        md = summary_markdown(s)
        C.write_markdown("bench_summary", md, C.RESULTS)
        C.update_doc_section("bench_summary", md)
        print(md)
        return s
    if args.quick:
        out = args.out or tempfile.mkdtemp(prefix="gru_bench_")
    else:
        out = args.out
    common = (["--out", out] if out else []) + (
        ["--threads", str(args.threads)] if args.threads else []
    )
    quick = ["--quick"] if args.quick else []
    step = bench_step.main(quick + common)
    if not args.skip_scaling:
        bench_scaling.main(quick + common)
    memory = bench_memory.main(quick + common)
    e2e = bench_e2e.main(quick + common)
    s = summary(step, memory, e2e)
    s["quick"] = args.quick
    s["env"] = C.environment()
    folder = Path(out) if out else C.RESULTS
    C.write_json("bench_summary", s, folder)
    md = summary_markdown(s)
    C.write_markdown("bench_summary", md, folder)
    if not out and not args.quick:
        C.update_doc_section("bench_summary", md)
        C.update_doc_section(
            "bench_env",
            "Measured {date_utc} UTC on {cpu_model} ({cpu_count} cores, {torch_threads} "
            "intra-op thread(s)), torch {torch}, Python {python}.".format(
                **{"cpu_model": "an unknown CPU", **s["env"]}
            ),
        )
    title = "targets"
    if args.quick:
        title += (
            " (quick mode: tiny models, where per-call overheads dominate; the targets are "
            "stated for ~30M parameters and are shown here only to exercise the code)"
        )
    C.print_table(
        title,
        ["target", "measured", "target", "met"],
        [[k, v["value"], v["target"], "yes" if v["met"] else "NO"] for k, v in s["checks"].items()],
    )
    print(f"results in {folder}")
    return s


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
