"""Study outputs: ``summary.json``, ``summary.csv``, ``table.md``, the trade-off plot and a
one-sentence verdict decided by Pareto fronts, the seed spread and the oracles' noise
floor."""

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
    "ARM_LABELS",
    "FRONTS",
    "compare_fronts",
    "hypervolume",
    "markdown_table",
    "noise_floor",
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

ARM_LABELS = {
    "plain": "plain",
    "GRU": "GRU",
    "GRU-k": "GRU-k",
    "update": "update-space GRU",
    "cos-clip": "cos-clip GRU",
    "+KL": "+KL GRU",
}
"""How the verdict names each arm."""


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


def _fp_score(fp: float, fp_target: float, fp_oracle: float) -> float:
    """Forget probability mapped to ``[0, 1]``: 0 at the target's, 1 at the oracle's (and
    below: forgetting more than the oracle earns nothing)."""
    span = fp_target - fp_oracle
    if span <= 0:
        return 0.0
    return float(np.clip((fp_target - fp) / span, 0.0, 1.0))


def _arm(r: dict[str, Any]) -> str:
    """A record's arm (records written before arms existed carry only ``gru``)."""
    arm = r.get("arm")
    if arm:
        return str(arm)
    return "GRU" if r.get("gru") else "plain"


def _runs(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["method"] not in ("target", "oracle")]


def _target(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return next(r for r in records if r["method"] == "target")


def _oracles(records: Sequence[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[Any]]:
    """The reference oracle and the others (the noise floor)."""
    oracles = [r for r in records if r["method"] == "oracle"]
    ref = next((r for r in oracles if r["seed"] == 0), None)
    return ref, [r for r in oracles if r["seed"] != 0]


def _order(records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(method, arm) pairs in the order they ran."""
    return list(dict.fromkeys((r["method"], _arm(r)) for r in _runs(records)))


FRONTS = ("fq", "fp")
"""The two Pareto planes: forget-quality score and forget-probability score, each against
model utility relative to the target's."""


def _point(
    r: dict[str, Any], t: dict[str, Any], fp_oracle: float
) -> dict[str, tuple[float, float]]:
    x = r["model_utility"] / t["model_utility"] if t["model_utility"] > 0 else 0.0
    return {
        "fq": (x, _fq_score(r["forget_quality"], t["forget_quality"])),
        "fp": (x, _fp_score(r["forget_prob"], t["forget_prob"], fp_oracle)),
    }


def pareto_table(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and arm: the hypervolume of the Pareto front over every learning rate
    and checkpoint of one seed, mean and standard deviation over seeds, in two planes with
    model utility relative to the target's as x: ``hv_fq`` with the forget quality score
    (``log10 p`` mapped linearly from the target's, 0, to ``p = 1``, 1) and ``hv_fp`` with
    the forget probability score (the target's 0, the reference oracle's 1)."""
    t = _target(records)
    ref, _ = _oracles(records)
    fp_oracle = ref["forget_prob"] if ref is not None else 0.0
    pts: dict[tuple[str, str, int], dict[str, list[tuple[float, float]]]] = defaultdict(
        lambda: {f: [] for f in FRONTS}
    )
    for r in _runs(records):
        p = pts[(r["method"], _arm(r), r["seed"])]
        for f, xy in _point(r, t, fp_oracle).items():
            p[f].append(xy)
    by: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: {f: [] for f in FRONTS})
    for (m, a, _), p in pts.items():
        for f in FRONTS:
            by[(m, a)][f].append(hypervolume(p[f]))
    out = []
    for m, a in _order(records):
        hv = by[(m, a)]
        row: dict[str, Any] = {"method": m, "arm": a, "n_seeds": len(hv["fq"])}
        for f in FRONTS:
            row[f"hv_{f}_mean"] = float(np.mean(hv[f]))
            row[f"hv_{f}_std"] = float(np.std(hv[f], ddof=1)) if len(hv[f]) > 1 else 0.0
        out.append(row)
    return out


def noise_floor(records: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    """The retrain-vs-retrain noise floor of each front: the standard deviation of the
    hypervolume of each non-reference oracle (one point, placed in the plane as a run's
    checkpoint is). Models that never saw the forget set differ by that much; a difference
    of hypervolumes below it is not a finding. ``None`` with fewer than two non-reference
    oracles (no spread to measure)."""
    t = _target(records)
    ref, others = _oracles(records)
    if len(others) < 2:
        return None
    fp_oracle = ref["forget_prob"] if ref is not None else 0.0
    hv: dict[str, list[float]] = {f: [] for f in FRONTS}
    for o in others:
        for f, xy in _point(o, t, fp_oracle).items():
            hv[f].append(hypervolume([xy]))
    return {f: float(np.std(v, ddof=1)) for f, v in hv.items()}


def compare_fronts(
    records: Sequence[dict[str, Any]], tol: float = 0.02
) -> dict[str, dict[str, dict[str, str]]]:
    """Per method, per arm other than plain, per front: ``"better"``, ``"worse"`` or
    ``"tie"`` against the same method plain. A difference of mean hypervolumes counts
    when it exceeds twice its standard error over seeds, the front's noise floor
    (:func:`noise_floor`) and ``tol``."""
    by = {(r["method"], r["arm"]): r for r in pareto_table(records)}
    floor = noise_floor(records) or {f: 0.0 for f in FRONTS}
    out: dict[str, dict[str, dict[str, str]]] = {}
    for m, a in by:
        p, g = by.get((m, "plain")), by[(m, a)]
        if a == "plain" or p is None:
            continue
        n = min(p["n_seeds"], g["n_seeds"])
        cmp: dict[str, str] = {}
        for f in FRONTS:
            diff = g[f"hv_{f}_mean"] - p[f"hv_{f}_mean"]
            se = math.hypot(p[f"hv_{f}_std"], g[f"hv_{f}_std"]) / math.sqrt(n)
            thr = max(tol, 2 * se, floor[f])
            cmp[f] = "better" if diff > thr else "worse" if diff < -thr else "tie"
        out.setdefault(m, {})[a] = cmp
    return out


def _agg(rows: Sequence[dict[str, Any]], key: str) -> tuple[float, float]:
    v = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
    if np.isnan(v).all():
        return math.nan, math.nan
    return float(np.nanmean(v)), float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0


def _fmt(mean: float, std: float, n: int, key: str) -> str:
    if math.isnan(mean):
        return "n/a"
    f = "{:.2e}" if key == "forget_quality" else ("{:.1f}" if key == "privleak" else "{:.3f}")
    s = f.format(mean)
    return s + (" ± " + f.format(std) if n > 1 else "")


def _last_groups(
    records: Sequence[dict[str, Any]],
) -> tuple[int, dict[tuple[str, str, float], list[dict[str, Any]]]]:
    runs = _runs(records)
    last = max(r["step"] for r in runs) if runs else 0
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r["step"] == last:
            groups[(r["method"], _arm(r), r["lr"])].append(r)
    return last, groups


def final_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed-aggregated metrics at the last checkpoint of each (method, arm, lr)."""
    last, groups = _last_groups(records)
    out = []
    for (m, a, lr), rows in groups.items():
        row: dict[str, Any] = {"method": m, "arm": a, "lr": lr, "step": last, "n": len(rows)}
        for k in _COLUMNS:
            row[k] = _agg(rows, k)
        out.append(row)
    return out


def _notes(config: dict[str, Any] | None, meta: dict[str, Any] | None) -> list[str]:
    """The sentences under the table: every place where the study deliberately differs
    from TOFU's, MUSE's or open-unlearning's definition, and the conventions."""
    cfg = config or {}
    notes = []
    if cfg.get("truth_reference", "answer") == "answer":
        notes.append(
            "† Truth ratio against the trained answer on every set, not against TOFU's "
            "paraphrased answer on the forget and retain sets (TOFU's mode is "
            '`truth_reference="paraphrase"`, the default with real TOFU files): a tiny '
            "model trained from scratch gives every wording it has not seen a tiny "
            "probability, true or false, so a ratio against the paraphrase would measure "
            "wording, not knowledge. Forget quality, the forget truth ratio and the truth "
            "scores inside model utility inherit this."
        )
    else:
        notes.append(
            "Truth ratio as TOFU's: against the paraphrased answer on the forget and retain "
            "sets, against the answer on the real-authors and world-facts sets."
        )
    if cfg.get("data_dir") is None and cfg.get("model_path") is None:
        notes.append(
            "Real authors and world facts are invented here and trained into the target and "
            "every oracle (TOFU's are real and known from pre-training); model utility is "
            "TOFU's harmonic mean of nine numbers (probability, ROUGE-L recall, truth score "
            "on the retain, real-authors and world-facts sets)."
        )
    rows = (meta or {}).get("eval_rows")
    gen = cfg.get("generation_max_length", 200)
    if rows:
        notes.append(
            "Every row is evaluated ("
            + ", ".join(f"{k} {v}" for k, v in rows.items())
            + f"); answers are generated greedily until the end of sequence or {gen} tokens "
            "of prompt and answer, as TOFU's `max_length=200`."
        )
    notes.append(
        "mia_auc: Min-K% (k = 0.4, the answer's tokens without the end of sequence) AUC of "
        "forget against holdout rows, open-unlearning's convention (1: the forget rows look "
        "far more likely). privleak: MUSE's, on that AUC in MUSE's convention: 0 is the "
        "reference oracle, −100 tells every forget row from every holdout row, > 0 "
        "over-unlearns."
    )
    return notes


def markdown_table(
    records: Sequence[dict[str, Any]],
    config: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> str:
    """The markdown tables: reference models, final checkpoints, Pareto hypervolumes, and
    the notes on definitions (``config``: the study's configuration as a dict, ``meta``:
    the run's :func:`write_report` meta)."""
    answer_ref = (config or {}).get("truth_reference", "answer") == "answer"
    dagger = {"forget_quality", "forget_truth_ratio", "model_utility"} if answer_ref else set()
    head = ["model", "arm", "lr", "step", "n"] + [
        k + ("†" if k in dagger else "") for k in _COLUMNS
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(name: str, arm: str, lr: str, step: str, rows: Sequence[dict[str, Any]]) -> str:
        cells = [name, arm, lr, step, str(len(rows))]
        for k in _COLUMNS:
            cells.append(_fmt(*_agg(rows, k), len(rows), k))
        return "| " + " | ".join(cells) + " |"

    lines.append(line("target", "", "", "0", [_target(records)]))
    ref, others = _oracles(records)
    if ref is not None:
        lines.append(line("oracle (reference)", "", "", "", [ref]))
    if others:
        lines.append(line("oracles vs reference (noise floor)", "", "", "", others))
    last, groups = _last_groups(records)
    for (m, a, lr), rows in sorted(
        groups.items(), key=lambda kv: (kv[0][2], _order(records).index(kv[0][:2]))
    ):
        lines.append(line(m, a, f"{lr:g}", str(last), rows))
    out = "\n".join(lines)
    pt = pareto_table(records)
    if pt:
        cmp = compare_fronts(records)
        floor = noise_floor(records)
        by = {(r["method"], r["arm"]): r for r in pt}
        floor_txt = (
            f"noise floor FQ {floor['fq']:.3f}, FP {floor['fp']:.3f}"
            if floor is not None
            else "no noise floor measured (fewer than two non-reference oracles)"
        )
        out += (
            "\n\nPareto front hypervolume over all learning rates and checkpoints, per seed "
            "(x: model utility / target's; y: forget-quality score, FQ, or forget-probability "
            "score, FP; higher is better; mean ± std over seeds). A difference from plain "
            "counts (better/worse) beyond twice its standard error over seeds, the oracles' "
            f"noise floor (the spread of their own hypervolumes: {floor_txt}) and 0.02:\n\n"
            "| method | arm | FQ | FQ − plain | FP | FP − plain |\n"
            "|---|---|---|---|---|---|\n"
        )
        for r in pt:
            m, a = r["method"], r["arm"]
            p = by.get((m, "plain"))
            cells = [m, a]
            for f in FRONTS:
                cells.append(_fmt(r[f"hv_{f}_mean"], r[f"hv_{f}_std"], r["n_seeds"], ""))
                if a == "plain" or p is None:
                    cells.append("")
                else:
                    diff = r[f"hv_{f}_mean"] - p[f"hv_{f}_mean"]
                    cells.append(f"{diff:+.3f} ({cmp[m][a][f]})")
            out += "| " + " | ".join(cells) + " |\n"
    out += "\n" + "\n\n".join(_notes(config, meta)) + "\n"
    return out


def _names(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def verdict(records: Sequence[dict[str, Any]], tol: float = 0.02) -> str:
    """One sentence on what the numbers show, decided by the Pareto fronts
    (:func:`compare_fronts`): per arm, for which methods it moves the trade-off between
    forgetting and model utility beyond the seed spread and the oracles' noise floor;
    whether any checkpoint reaches the oracles' region; whether at equal steps the
    rectified arms merely forget more slowly."""
    cmp = compare_fronts(records, tol)
    pt = pareto_table(records)
    n_seeds = min((r["n_seeds"] for r in pt), default=1)
    floor = noise_floor(records)
    arms = list(dict.fromkeys(a for c in cmp.values() for a in c))
    clauses = []
    for a in arms:
        res = {m: c[a] for m, c in cmp.items() if a in c}
        groups: dict[str, list[str]] = defaultdict(list)
        for m, c in res.items():
            outcomes = set(c.values())
            if outcomes == {"better"}:
                groups["on both fronts"].append(m)
            elif "better" in outcomes and "worse" in outcomes:
                groups["on one front while worsening the other"].append(m)
            elif "better" in outcomes:
                groups["on one front"].append(m)
            elif "worse" in outcomes:
                groups["on neither, and worsens it,"].append(m)
            else:
                groups["on neither"].append(m)
        parts = [
            f"{k} for {_names(v)}"
            for k in (
                "on both fronts",
                "on one front",
                "on one front while worsening the other",
                "on neither",
                "on neither, and worsens it,",
            )
            if (v := groups.get(k))
        ]
        clauses.append(f"{ARM_LABELS.get(a, a)} improves it " + ", ".join(parts))
    bounds = ["twice its standard error over seeds"] if n_seeds > 1 else []
    if floor is not None:
        bounds.append(f"the oracles' noise floor (FQ {floor['fq']:.3f}, FP {floor['fp']:.3f})")
    bounds.append(f"{tol}")
    margin = bounds[0] if len(bounds) == 1 else "the largest of " + _names(bounds)
    if n_seeds == 1:
        margin += " (one seed: no spread over seeds measured)"
    s = (
        "Judged by the Pareto fronts of forgetting (forget quality, forget probability) "
        "against model utility over all learning rates and checkpoints, a difference from "
        f"plain counting only beyond {margin}: "
        + "; ".join(
            c if i else c.replace(" improves it ", " improves the trade-off ", 1)
            for i, c in enumerate(clauses)
        )
    )
    ref, others = _oracles(records)
    if others:
        fq_min = min(o["forget_quality"] for o in others)
        mu_min = min(o["model_utility"] for o in others + ([ref] if ref else []))
        reach = list(
            dict.fromkeys(
                f"{r['method']} {_arm(r)}"
                for r in _runs(records)
                if r["forget_quality"] >= fq_min and r["model_utility"] >= mu_min
            )
        )
        s += (
            "; no checkpoint reaches the oracles' region (forget quality and model utility "
            "both within the oracles' spread)"
            if not reach
            else f"; checkpoints within the oracles' region in both forget quality and model "
            f"utility: {_names(reach)}"
        )
    slower, pairs = 0, 0
    for _m, _a, pr, gr in _group_final(records):
        pairs += 1
        slower += int(gr["forget_prob"] > pr["forget_prob"])
    if pairs:
        s += (
            f"; at equal learning rate and steps a rectified arm ends with a higher forget "
            f"probability than plain in {slower} of {pairs} cases, so compare at equal "
            "forgetting (the fronts, the plot), not at equal steps"
        )
    return s + "."


def _group_final(
    records: Sequence[dict[str, Any]],
) -> list[tuple[str, str, dict[str, float], dict[str, float]]]:
    """(method, arm, plain's final metrics, the arm's) per learning rate, means over
    seeds."""
    rows = final_rows(records)
    by = {(r["method"], r["arm"], r["lr"]): r for r in rows}
    out = []
    for (m, a, lr), r in by.items():
        pr = by.get((m, "plain", lr))
        if a == "plain" or pr is None:
            continue
        out.append((m, a, {k: pr[k][0] for k in _COLUMNS}, {k: r[k][0] for k in _COLUMNS}))
    return out


_COLORS = {
    "plain": "tab:blue",
    "GRU": "tab:orange",
    "GRU-k": "tab:red",
    "update": "tab:purple",
    "cos-clip": "tab:brown",
    "+KL": "tab:pink",
}
_STYLES = {"cos-clip": "--"}  # often equal to GRU's (no cosine below the threshold)


def plot_tradeoff(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Forget metric against model utility, one column per method: per arm, every
    checkpoint of every learning rate (mean over seeds, a marker per learning rate) and the
    Pareto front through them (a step line); the target, the oracles and the oracles'
    spread (the noise floor)."""
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
    # at most 4 methods side by side; more go to further bands of two rows
    per = min(4, max(1, len(methods)))
    bands = max(1, math.ceil(len(methods) / per))
    fig, axes = plt.subplots(
        len(rows) * bands,
        per,
        figsize=(3.6 * per, 3.1 * len(rows) * bands + 0.9),
        squeeze=False,
    )
    for k in range(len(methods), per * bands):  # empty places of the last band
        for i in range(len(rows)):
            axes[len(rows) * (k // per) + i][k % per].set_visible(False)
    markers = "osD^v"
    seen: set[str] = set()
    for j, m in enumerate(methods):
        arms = list(dict.fromkeys(_arm(r) for r in runs if r["method"] == m))
        for i, (key, label) in enumerate(rows):
            ax = axes[len(rows) * (j // per) + i][j % per]
            for a in arms:
                color = _COLORS.get(a, "tab:gray")
                pts = []
                for li, lr in enumerate(lrs):
                    sel = [r for r in runs if r["method"] == m and _arm(r) == a and r["lr"] == lr]
                    for s in sorted({r["step"] for r in sel}):
                        at = [r for r in sel if r["step"] == s]
                        x = float(np.mean([r["model_utility"] for r in at]))
                        ys = np.array([r[key] for r in at], dtype=float)
                        if key == "forget_quality":
                            ys = np.log10(np.maximum(ys, 1e-300))
                        pts.append((x, float(ys.mean())))
                        ax.scatter(
                            [x], [ys.mean()], color=color, marker=markers[li % 5], s=12, alpha=0.6
                        )
                # the Pareto front: utility right, forgetting up (FQ) or down (FP)
                sign = 1.0 if key == "forget_quality" else -1.0
                front, best = [], -math.inf
                for x, y in sorted(pts, key=lambda p: -p[0]):
                    if sign * y > best:
                        best = sign * y
                        front.append((x, y))
                if front:
                    fx, fy = zip(*front)
                    lab = ARM_LABELS.get(a, a) if a not in seen else None
                    seen.add(a)
                    ax.step(
                        fx, fy, where="post", color=color, lw=1.4, ls=_STYLES.get(a, "-"), label=lab
                    )
            ty = math.log10(max(t[key], 1e-300)) if key == "forget_quality" else t[key]
            ax.scatter(
                [t["model_utility"]],
                [ty],
                marker="*",
                s=120,
                c="k",
                zorder=5,
                label="target" if i == 0 and j == 0 else None,
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
                    label="oracles (retain only)" if i == 0 and j == 0 else None,
                )
                noise = [y for o, y in zip(oracles, oy) if o["seed"] != 0]
                if noise:
                    ax.axhspan(min(noise), max(noise), color="tab:green", alpha=0.12)
            if i == 0:
                ax.set_title(m)
            if j % per == 0:
                ax.set_ylabel(("log10 " if key == "forget_quality" else "") + label)
            if i == len(rows) - 1:
                ax.set_xlabel("model utility")
            ax.grid(alpha=0.3)
    fig.suptitle(
        "Per arm: every checkpoint (mean over seeds; marker = learning rate: "
        + ", ".join(f"{markers[i % 5]} {lr:g}" for i, lr in enumerate(lrs))
        + ") and the Pareto front through them\nbetter is up-right (top) and down-right "
        "(bottom); star: target; green: retain-only oracles and their spread",
        fontsize=9,
    )
    fig.legend(loc="lower center", ncol=8, fontsize=8, frameon=False)
    top = 1 - 0.5 / fig.get_figheight()
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(
    records: Sequence[dict[str, Any]], out_dir: Path, meta: dict[str, Any]
) -> dict[str, Path]:
    """Write ``summary.json`` (the records), ``summary.csv``, ``table.md`` (tables, notes
    and the verdict), ``tradeoff.png``, ``meta.json`` (config, versions, wall time) and
    ``README.md`` (how it was made) under ``out_dir``; returns their paths."""
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
    cfg = meta.get("config", {})
    paths["table"].write_text(markdown_table(records, cfg, meta) + "\n" + verdict(records) + "\n")
    plot_tradeoff(records, paths["plot"])
    paths["meta"].write_text(json.dumps(meta, indent=1))
    runs = _runs(records)
    if cfg.get("model_path"):
        trained = (
            f"; the target `{cfg['model_path']}` and the oracles "
            + ", ".join(f"`{p}`" for p in cfg.get("oracle_paths", []))
            + f" ran on `{cfg.get('device', '?')}` in {cfg.get('dtype', '?')}."
        )
    elif meta.get("models_cached") and "train_seconds" in meta:
        trained = (
            "; the target and the oracles came from the cache (training them took"
            f" {meta['train_seconds']:.0f} s more)."
        )
    elif "train_seconds" in meta:
        trained = f"; training the target and the oracles took {meta['train_seconds']:.0f} s of it."
    else:
        trained = "."
    arms_by_method = {
        m: list(dict.fromkeys(_arm(r) for r in runs if r["method"] == m))
        for m in dict.fromkeys(r["method"] for r in runs)
    }
    lines = [
        f"Preset `{meta.get('preset', '?')}`,"
        f" made by `{meta.get('command', 'python -m gru_optim.demo')}`"
        f" in {meta.get('wall_seconds', float('nan')):.0f} s wall time"
        f" (torch {meta.get('torch', '?')},"
        f" {meta.get('threads', cfg.get('threads', '?'))} CPU thread(s))" + trained,
        (
            f"{len({(r['method'], _arm(r), r['lr'], r['seed']) for r in runs})} unlearning runs"
            " ("
            + "; ".join(f"{m}: {', '.join(a)}" for m, a in arms_by_method.items())
            + f"; × {len(cfg.get('lrs', []))} learning rates × {len(cfg.get('seeds', []))}"
            f" seeds, {cfg.get('steps', '?')} steps each),"
            f" {sum(1 for r in records if r['method'] == 'oracle')} oracles;"
            f" forget split `{cfg.get('split', '?')}`"
            + (
                f" of the TOFU files in `{cfg['data_dir']}`."
                if cfg.get("data_dir")
                else f" of {cfg.get('corpus', {}).get('n_authors', '?')} generated authors."
            )
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
