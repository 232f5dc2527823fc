"""How GRU's own work grows with model size, against AdamW and the baselines.

The same measurement as ``bench_step.py`` (same protocol, same methods, interleaved
repeats, medians) on GPT-shaped models from 1M to 300M parameters. The flatten-based
baselines need several extra model-sized buffers, so they run up to 100M; the 300M case
(GRU, AdamW, copy only) runs only when the machine has the memory for it.

Run: ``python benchmarks/bench_scaling.py [--quick] [--sizes 1M,10M,30M]``.
Writes ``docs/results/bench_scaling.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import _common as C
import bench_step

REPEATS = {"tiny": 3, "1M": 15, "10M": 9, "30M": 7, "100M": 5, "300M": 3}


def methods_for(shape: C.ModelShape) -> list[str]:
    n = shape.numel
    if n <= 40e6:
        return ["gru", "gru_core", "adamw", "reference", "pcgrad", "adamw_fused", "copy"]
    if n <= 150e6:  # leave out the extra memories that are not needed for the ratios
        return ["gru", "adamw", "reference", "pcgrad", "copy"]
    return ["gru", "adamw", "copy"]


def fits(shape: C.ModelShape) -> bool:
    """Whether the machine has room for the case (params, grads, forget source, EMA,
    AdamW's two moments: 6 fp32 copies, and the baselines' ~10 more up to 100M)."""
    copies = 6 if "reference" not in methods_for(shape) else 16
    need = copies * 4 * shape.numel
    avail = C.mem_available_bytes()
    return avail is None or need < min(0.6 * avail, 10 * 2**30)


def run(sizes: list[str], quick: bool, verbose: bool = True) -> dict[str, Any]:
    results = []
    skipped = []
    for name in sizes:
        shape = C.TINY if name == "tiny" else C.SHAPES[name]
        if not fits(shape):
            skipped.append({"size": name, "reason": "not enough free memory"})
            print(f"skipping {name}: not enough free memory")
            continue
        res = bench_step.measure(
            shape,
            repeats=REPEATS.get(name, 3),
            warmup=1,
            methods=methods_for(shape),
            verbose=verbose,
        )
        results.append(res)
        gc.collect()  # the case's tensors are freed once measure() returns
    return {"cases": results, "skipped": skipped}


def rows(payload: dict[str, Any]) -> list[list[Any]]:
    out = []
    for r in payload["cases"]:
        med = {k: v["median_s"] for k, v in r["methods"].items()}
        b = r.get("bandwidth", {})
        ratio = r["ratios"]
        out.append(
            [
                r["shape"]["name"],
                r["shape"]["numel"] / 1e6,
                r["shape"]["n_tensors"],
                med.get("gru", float("nan")) * 1e3,
                med.get("adamw", float("nan")) * 1e3,
                med.get("reference", float("nan")) * 1e3,
                med.get("pcgrad", float("nan")) * 1e3,
                ratio.get("gru_over_adamw", float("nan")),
                ratio.get("reference_over_gru", float("nan")),
                b.get("gru_over_bound", float("nan")),
                b.get("copy_bandwidth_GBps", float("nan")),
            ]
        )
    return out


HEADERS = [
    "size",
    "params (M)",
    "tensors",
    "GRU ms",
    "AdamW ms",
    "reference ms",
    "PCGrad ms",
    "GRU / AdamW",
    "reference / GRU",
    "GRU / bound",
    "copy GB/s",
]


def growth(payload: dict[str, Any]) -> dict[str, float]:
    """Least-squares exponent b of time ~ numel^b per method (1 = linear)."""
    import math

    by: dict[str, list[tuple[float, float]]] = {}
    for r in payload["cases"]:
        for k, v in r["methods"].items():
            by.setdefault(k, []).append((math.log(r["shape"]["numel"]), math.log(v["median_s"])))
    out = {}
    for k, pts in by.items():
        if len(pts) < 2:
            continue
        mx = sum(p[0] for p in pts) / len(pts)
        my = sum(p[1] for p in pts) / len(pts)
        sxx = sum((p[0] - mx) ** 2 for p in pts)
        if sxx > 0:
            out[k] = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return out


def plot(payload: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = bench_step.METHOD_LABELS
    keys = ["gru", "gru_core", "adamw", "adamw_fused", "reference", "pcgrad", "copy"]
    for k in keys:
        pts = [
            (r["shape"]["numel"], r["methods"][k]["median_s"])
            for r in payload["cases"]
            if k in r["methods"]
        ]
        if pts:
            style = "-o" if k.startswith("gru") else "--s"
            ax1.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], style, label=names[k])
    bound = [
        (r["shape"]["numel"], r["bandwidth"]["gru_bound_s"])
        for r in payload["cases"]
        if "bandwidth" in r
    ]
    if bound:
        ax1.plot(
            [p[0] for p in bound], [p[1] * 1e3 for p in bound], ":k", label="GRU bandwidth bound"
        )
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("parameters")
    ax1.set_ylabel("median ms per step (own work)")
    ax1.set_title("Cost per step")
    ax1.legend(fontsize=7)
    ax1.grid(True, which="both", alpha=0.3)
    for key, label in (
        ("gru_over_adamw", "GRU / AdamW foreach"),
        ("gru_over_reference", "GRU / reference-style"),
        ("gru_over_pcgrad", "GRU / PCGrad-style"),
    ):
        pts = [
            (r["shape"]["numel"], r["ratios"][key]) for r in payload["cases"] if key in r["ratios"]
        ]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=label)
    ax2.axhline(0.8, color="C0", ls=":", lw=1, label="target vs AdamW (0.8)")
    ax2.axhline(0.1, color="C1", ls=":", lw=1, label="target vs reference (0.1)")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("parameters")
    ax2.set_ylabel("time ratio (lower is better for GRU)")
    ax2.set_title("GRU wrapper relative to the others")
    ax2.legend(fontsize=7)
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(payload: dict[str, Any]) -> str:
    g = payload.get("growth_exponent", {})
    lines = [C.markdown_table(HEADERS, rows(payload)), ""]
    if g:
        lines.append(
            "Growth exponent b in time ~ params^b (least squares over the sizes): "
            + ", ".join(f"{bench_step.METHOD_LABELS.get(k, k)} {v:.2f}" for k, v in g.items())
            + "."
        )
    for s in payload.get("skipped", []):
        lines.append(f"\nSkipped {s['size']}: {s['reason']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two tiny sizes, few repeats")
    ap.add_argument("--sizes", default=None, help="comma-separated, e.g. 1M,10M,30M")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default 1)")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    C.set_threads(args.threads)
    if args.sizes:
        sizes = args.sizes.split(",")
    elif args.quick:
        sizes = ["tiny", "1M"]
    else:
        sizes = ["1M", "10M", "30M", "100M", "300M"]
    if args.quick:
        REPEATS["1M"] = 3
    payload: dict[str, Any] = {"benchmark": "scaling", "quick": args.quick, "env": C.environment()}
    payload.update(run(sizes, args.quick))
    payload["growth_exponent"] = growth(payload)
    out = Path(args.out) if args.out else C.RESULTS
    C.write_json("bench_scaling", payload, out)
    md = markdown(payload)
    C.write_markdown("bench_scaling", md, out)
    plot(payload, out / "bench_scaling.png")
    C.print_table("scaling", HEADERS, rows(payload))
    print(md.splitlines()[-1])
    if args.out is None and not args.no_doc and not args.quick:
        C.update_doc_section("bench_scaling", md)
    return payload


if __name__ == "__main__":
    main()
