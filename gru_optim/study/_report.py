"""Study outputs: ``summary.json``, ``summary.csv``, ``table.md``, the trade-off plots and a
one-sentence verdict decided by Pareto fronts."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FRONTS",
    "compare_fronts",
    "hypervolume",
    "markdown_table",
    "pareto_table",
    "report_from_dir",
    "verdict",
    "write_report",
]

_COLUMNS = (
    "forget_quality",
    "model_utility",
    "forget_prob",
    "retain_prob",
    "forget_rouge",
    "forget_truth_ratio",
    "mia_auc",
    "privleak",
)


def hypervolume(points: Sequence[tuple[float, float]]) -> float:
    """Area dominated by ``points`` (both coordinates maximised) above the origin."""
    hv, best_y = 0.0, 0.0
    for x, y in sorted(points, key=lambda p: -p[0]):
        if x > 0 and y > best_y:
            hv += x * (y - best_y)
            best_y = y
    return hv


def _fq_score(p: float, p_target: float) -> float:
    """``log10`` forget quality mapped to ``[0, 1]``: 0 at the target's, 1 at ``p = 1``."""
    lt = math.log10(max(p_target, 1e-300))
    if lt >= 0:
        return 1.0
    return float(np.clip((math.log10(max(p, 1e-300)) - lt) / -lt, 0.0, 1.0))


def _runs(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["method"] not in ("target", "oracle")]


def _target(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return next(r for r in records if r["method"] == "target")


def _fp_score(fp: float, fp_target: float, fp_oracle: float) -> float:
    """Forget probability mapped to ``[0, 1]``: 0 at the target's, 1 at the oracle's (and
    below: forgetting more than the oracle earns nothing)."""
    span = fp_target - fp_oracle
    if span <= 0:
        return 0.0
    return float(np.clip((fp_target - fp) / span, 0.0, 1.0))


FRONTS = ("fq", "fp")
"""The two Pareto planes: forget-quality score and forget-probability score, each against
model utility relative to the target's."""


def pareto_table(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and GRU flag: the hypervolume of the Pareto front over every learning
    rate and checkpoint of one seed, mean and standard deviation over seeds, in two planes
    with model utility relative to the target's as x: ``hv_fq`` with the forget quality
    score (``log10 p`` mapped linearly from the target's, 0, to ``p = 1``, 1) and ``hv_fp``
    with the forget probability score (the target's 0, the reference oracle's 1)."""
    t = _target(records)
    oracle = next((r for r in records if r["method"] == "oracle" and r["seed"] == 0), None)
    fp_oracle = oracle["forget_prob"] if oracle is not None else 0.0
    pts: dict[tuple[str, bool, int], dict[str, list[tuple[float, float]]]] = defaultdict(
        lambda: {f: [] for f in FRONTS}
    )
    for r in _runs(records):
        x = r["model_utility"] / t["model_utility"] if t["model_utility"] > 0 else 0.0
        p = pts[(r["method"], r["gru"], r["seed"])]
        p["fq"].append((x, _fq_score(r["forget_quality"], t["forget_quality"])))
        p["fp"].append((x, _fp_score(r["forget_prob"], t["forget_prob"], fp_oracle)))
    by: dict[tuple[str, bool], dict[str, list[float]]] = defaultdict(
        lambda: {f: [] for f in FRONTS}
    )
    for (m, g, _), p in pts.items():
        for f in FRONTS:
            by[(m, g)][f].append(hypervolume(p[f]))
    out = []
    for (m, g), hv in by.items():
        row: dict[str, Any] = {"method": m, "gru": g, "n_seeds": len(hv["fq"])}
        for f in FRONTS:
            row[f"hv_{f}_mean"] = float(np.mean(hv[f]))
            row[f"hv_{f}_std"] = float(np.std(hv[f], ddof=1)) if len(hv[f]) > 1 else 0.0
        out.append(row)
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in _runs(records)))}
    return sorted(out, key=lambda r: (order[r["method"]], r["gru"]))


def compare_fronts(
    records: Sequence[dict[str, Any]], tol: float = 0.02
) -> dict[str, dict[str, str]]:
    """Per method and front: ``"better"``, ``"worse"`` or ``"tie"`` for GRU against plain.
    A difference of mean hypervolumes counts when it exceeds twice its standard error over
    seeds and ``tol``."""
    by = {(r["method"], r["gru"]): r for r in pareto_table(records)}
    out: dict[str, dict[str, str]] = {}
    for m in dict.fromkeys(k[0] for k in by):
        p, g = by.get((m, False)), by.get((m, True))
        if p is None or g is None:
            continue
        out[m] = {}
        n = min(p["n_seeds"], g["n_seeds"])
        for f in FRONTS:
            diff = g[f"hv_{f}_mean"] - p[f"hv_{f}_mean"]
            se = math.hypot(p[f"hv_{f}_std"], g[f"hv_{f}_std"]) / math.sqrt(n)
            thr = max(tol, 2 * se)
            out[m][f] = "better" if diff > thr else "worse" if diff < -thr else "tie"
    return out


def _agg(rows: Sequence[dict[str, Any]], key: str) -> tuple[float, float]:
    v = np.array([r[key] for r in rows], dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _fmt(mean: float, std: float, n: int, key: str) -> str:
    f = "{:.2e}" if key == "forget_quality" else ("{:.1f}" if key == "privleak" else "{:.3f}")
    s = f.format(mean)
    return s + (" ± " + f.format(std) if n > 1 else "")


def final_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed-aggregated metrics at the last checkpoint of each (method, GRU, lr)."""
    runs = _runs(records)
    last = max(r["step"] for r in runs) if runs else 0
    groups: dict[tuple[str, bool, float], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r["step"] == last:
            groups[(r["method"], r["gru"], r["lr"])].append(r)
    out = []
    for (m, g, lr), rows in groups.items():
        row: dict[str, Any] = {
            "method": m,
            "gru": g,
            "lr": lr,
            "step": last,
            "n": len(rows),
        }
        for k in _COLUMNS:
            row[k] = _agg(rows, k)
        out.append(row)
    return out


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """The markdown tables: reference models, final checkpoints, Pareto hypervolumes."""
    head = ["model", "GRU", "lr", "step", "n"] + [k for k in _COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(name: str, gru: str, lr: str, step: str, rows: Sequence[dict[str, Any]]) -> str:
        cells = [name, gru, lr, step, str(len(rows))]
        for k in _COLUMNS:
            cells.append(_fmt(*_agg(rows, k), len(rows), k))
        return "| " + " | ".join(cells) + " |"

    lines.append(line("target", "", "", "0", [_target(records)]))
    oracles = [r for r in records if r["method"] == "oracle"]
    lines.append(line("oracle (reference)", "", "", "", [r for r in oracles if r["seed"] == 0]))
    others = [r for r in oracles if r["seed"] != 0]
    if others:
        lines.append(line("oracles vs reference (noise floor)", "", "", "", others))
    runs = _runs(records)
    last = max(r["step"] for r in runs) if runs else 0
    groups: dict[tuple[str, bool, float], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r["step"] == last:
            groups[(r["method"], r["gru"], r["lr"])].append(r)
    for (m, g, lr), rows in groups.items():
        lines.append(line(m, "yes" if g else "no", f"{lr:g}", str(last), rows))
    out = "\n".join(lines)
    pt = pareto_table(records)
    if pt:
        cmp = compare_fronts(records)
        out += (
            "\n\nPareto front hypervolume over all learning rates and checkpoints, per seed "
            "(x: model utility / target's; y: forget-quality score, FQ, or forget-probability "
            "score, FP; higher is better; mean ± std over seeds):\n\n"
            "| method | FQ plain | FQ GRU | FQ GRU − plain | FP plain | FP GRU | FP GRU − plain |\n"
            "|---|---|---|---|---|---|---|\n"
        )
        by = {(r["method"], r["gru"]): r for r in pt}
        for m in dict.fromkeys(r["method"] for r in pt):
            pr, gr = by.get((m, False)), by.get((m, True))
            if pr is None or gr is None:
                continue
            cells = [m]
            for f in FRONTS:
                cells += [
                    _fmt(pr[f"hv_{f}_mean"], pr[f"hv_{f}_std"], pr["n_seeds"], ""),
                    _fmt(gr[f"hv_{f}_mean"], gr[f"hv_{f}_std"], gr["n_seeds"], ""),
                    f"{gr[f'hv_{f}_mean'] - pr[f'hv_{f}_mean']:+.3f} ({cmp[m][f]})",
                ]
            out += "| " + " | ".join(cells) + " |\n"
    return out


def verdict(records: Sequence[dict[str, Any]], tol: float = 0.02) -> str:
    """One sentence on what the numbers show, decided by the Pareto fronts
    (:func:`compare_fronts`): per method, whether GRU moves the trade-off between
    forgetting and model utility, and whether at equal steps it merely forgets less."""
    cmp = compare_fronts(records, tol)
    both = [m for m, c in cmp.items() if all(v == "better" for v in c.values())]
    one = [
        m
        for m, c in cmp.items()
        if "better" in c.values() and "worse" not in c.values() and m not in both
    ]
    worse = [m for m, c in cmp.items() if "worse" in c.values() and "better" not in c.values()]
    mixed = [m for m, c in cmp.items() if "worse" in c.values() and "better" in c.values()]
    tie = [m for m, c in cmp.items() if all(v == "tie" for v in c.values())]
    slower = list(
        dict.fromkeys(
            m
            for m, pr, gr in _group_final(records)
            if gr["model_utility"] > pr["model_utility"] and gr["forget_prob"] > pr["forget_prob"]
        )
    )
    parts = []
    if both:
        parts.append(f"on both fronts for {', '.join(both)}")
    if one:
        parts.append(f"on one front only (the other within the seed spread) for {', '.join(one)}")
    if mixed:
        parts.append(f"on one front while worsening the other for {', '.join(mixed)}")
    if tie:
        parts.append(f"on neither beyond the seed spread for {', '.join(tie)}")
    if worse:
        parts.append(f"on neither, and worsens it, for {', '.join(worse)}")
    n_seeds = min((r["n_seeds"] for r in pareto_table(records)), default=1)
    if n_seeds == 1:
        parts = [
            p.replace("the seed spread", f"a {tol} margin (one seed: no spread measured)")
            for p in parts
        ]
    s = (
        "Judged by the Pareto fronts of forgetting (forget quality, forget probability) "
        "against model utility over all learning rates and checkpoints, GRU improves the "
        "trade-off " + "; ".join(parts)
    )
    only_trade = [m for m in slower if m in tie or m in worse]
    also_slower = [m for m in slower if m not in only_trade]
    if only_trade:
        s += (
            f"; for {', '.join(only_trade)} GRU's higher utility at equal steps only comes "
            "from forgetting less, a trade rather than a gain"
        )
    if also_slower:
        s += (
            f"; at equal steps GRU also forgets more slowly for {', '.join(also_slower)}, so "
            "compare it at equal forgetting (the plot), not at equal steps"
        )
    return s + "."


def _group_final(
    records: Sequence[dict[str, Any]],
) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    rows = final_rows(records)
    by = {(r["method"], r["gru"], r["lr"]): r for r in rows}
    out = []
    for (m, g, lr), r in by.items():
        if g:
            continue
        gr = by.get((m, True, lr))
        if gr is not None:
            out.append((m, {k: r[k][0] for k in _COLUMNS}, {k: gr[k][0] for k in _COLUMNS}))
    return out


def plot_tradeoff(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Forget metric against model utility, one column per method: trajectories over the
    checkpoints per learning rate, plain and GRU, mean over seeds with standard deviation
    bars; the target, the oracles and the oracles' spread (the noise floor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _runs(records)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    lrs = sorted({r["lr"] for r in runs})
    t = _target(records)
    oracles = [r for r in records if r["method"] == "oracle"]
    rows = (
        ("forget_quality", "forget quality (KS p-value)"),
        ("forget_prob", "forget probability"),
    )
    fig, axes = plt.subplots(
        len(rows),
        len(methods),
        figsize=(3.3 * len(methods), 6.2),
        squeeze=False,
        sharey="row",
    )
    markers = "osD^v"
    colors = {False: "tab:blue", True: "tab:orange"}
    for j, m in enumerate(methods):
        for i, (key, label) in enumerate(rows):
            ax = axes[i][j]
            for g in (False, True):
                for li, lr in enumerate(lrs):
                    sel = [r for r in runs if r["method"] == m and r["gru"] == g and r["lr"] == lr]
                    steps = sorted({r["step"] for r in sel})
                    xs, ys, xe, ye = [], [], [], []
                    for s in steps:
                        pts = [r for r in sel if r["step"] == s]
                        x = np.array([r["model_utility"] for r in pts])
                        y = np.array([r[key] for r in pts])
                        if key == "forget_quality":
                            y = np.log10(np.maximum(y, 1e-300))
                        xs.append(x.mean())
                        ys.append(y.mean())
                        xe.append(x.std())
                        ye.append(y.std())
                    ax.errorbar(
                        xs,
                        ys,
                        xerr=xe,
                        yerr=ye,
                        color=colors[g],
                        marker=markers[li % 5],
                        ms=4,
                        lw=1,
                        alpha=0.5 + 0.5 * (li + 1) / len(lrs),
                        capsize=2,
                        label=f"{'GRU' if g else 'plain'} lr={lr:g}" if i == j == 0 else None,
                    )
            ty = math.log10(max(t[key], 1e-300)) if key == "forget_quality" else t[key]
            ax.scatter(
                [t["model_utility"]],
                [ty],
                marker="*",
                s=120,
                c="k",
                zorder=5,
                label="target" if i == j == 0 else None,
            )
            if oracles:
                ox = [o["model_utility"] for o in oracles]
                oy = [
                    math.log10(max(o[key], 1e-300)) if key == "forget_quality" else o[key]
                    for o in oracles
                ]
                ax.scatter(
                    ox,
                    oy,
                    marker="P",
                    s=50,
                    c="tab:green",
                    zorder=5,
                    label="oracles (retain only)" if i == j == 0 else None,
                )
                noise = [y for o, y in zip(oracles, oy) if o["seed"] != 0]
                if noise:
                    ax.axhspan(min(noise), max(noise), color="tab:green", alpha=0.12)
            if i == 0:
                ax.set_title(m)
            if j == 0:
                ax.set_ylabel(("log10 " if key == "forget_quality" else "") + label)
            if i == len(rows) - 1:
                ax.set_xlabel("model utility")
            ax.grid(alpha=0.3)
    fig.suptitle(
        "Each line: one learning rate's checkpoints (mean ± std over seeds) from the target "
        "(star); better is up-right (top) and down-right (bottom); green: retain-only oracles "
        "and their spread",
        fontsize=9,
    )
    fig.legend(loc="lower center", ncol=min(8, 2 * len(lrs) + 2), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    records: Sequence[dict[str, Any]], out_dir: Path, meta: dict[str, Any]
) -> dict[str, Path]:
    """Write ``summary.json`` (the records), ``summary.csv``, ``table.md`` (tables and the
    verdict), ``tradeoff.png`` and ``meta.json`` (config, versions, wall time) under
    ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "summary.json",
        "csv": out_dir / "summary.csv",
        "table": out_dir / "table.md",
        "plot": out_dir / "tradeoff.png",
        "meta": out_dir / "meta.json",
    }
    clean = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        for r in records
    ]
    paths["json"].write_text(json.dumps(clean, indent=1))
    keys = list(dict.fromkeys(k for r in records for k in r))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(records)
    paths["table"].write_text(markdown_table(records) + "\n\n" + verdict(records) + "\n")
    plot_tradeoff(records, paths["plot"])
    paths["meta"].write_text(json.dumps(meta, indent=1))
    cfg = meta.get("config", {})
    runs = _runs(records)
    if meta.get("models_cached") and "train_seconds" in meta:
        trained = (
            "; the target and the oracles came from the cache (training them took"
            f" {meta['train_seconds']:.0f} s more)."
        )
    elif "train_seconds" in meta:
        trained = f"; training the target and the oracles took {meta['train_seconds']:.0f} s of it."
    else:
        trained = "."
    lines = [
        f"Preset `{meta.get('preset', '?')}`,"
        f" made by `{meta.get('command', 'python -m gru_optim.demo')}`"
        f" in {meta.get('wall_seconds', float('nan')):.0f} s wall time"
        f" (torch {meta.get('torch', '?')},"
        f" {meta.get('threads', cfg.get('threads', '?'))} CPU thread(s))" + trained,
        (
            f"{len({(r['method'], r['gru'], r['lr'], r['seed']) for r in runs})} unlearning runs"
            f" ({len(cfg.get('methods', []))} methods × plain/GRU ×"
            f" {len(cfg.get('lrs', []))} learning"
            f" rates × {len(cfg.get('seeds', []))} seeds, {cfg.get('steps', '?')} steps each),"
            f" {sum(1 for r in records if r['method'] == 'oracle')} oracles;"
            f" forget split `{cfg.get('split', '?')}`"
            f" of {cfg.get('corpus', {}).get('n_authors', '?')} authors."
        ),
    ]
    paths["readme"] = out_dir / "README.md"
    paths["readme"].write_text("\n".join(lines) + "\n")
    return paths


def report_from_dir(out_dir: str | Path) -> dict[str, Path]:
    """Rewrite every output of :func:`write_report` from the ``summary.json`` and
    ``meta.json`` already in ``out_dir``."""
    out_dir = Path(out_dir)
    records = json.loads((out_dir / "summary.json").read_text())
    records = [{k: (math.nan if v is None else v) for k, v in r.items()} for r in records]
    meta = json.loads((out_dir / "meta.json").read_text())
    return write_report(records, out_dir, meta)
