"""What a run writes besides the model: ``report.json``'s tables in Markdown, the loss
plot, and the sweep's table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["loss_curves", "plot_losses", "run_table", "sweep_table"]

METRICS = ("nll", "prob", "rouge_l", "truth_ratio", "mia_minkpp_auc", "mia_loss_auc")
"""The columns, in order (a metric a set lacks is left out)."""

HOW = {
    "nll": "token-mean answer NLL",
    "prob": "mean P(a|q)^(1/|a|)",
    "rouge_l": "ROUGE-L recall of the greedy answer",
    "truth_ratio": "forget: mean min(R, 1/R); others: mean max(0, 1 - R)",
    "mia_minkpp_auc": "Min-K%++ AUC, forget vs holdout (0.5: chance)",
    "mia_loss_auc": "loss AUC, forget vs holdout (0.5: chance)",
}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def run_table(report: Mapping[str, Any]) -> str:
    """``report.json`` as a Markdown table: one row per set and metric, before and after."""
    lines = ["| set | metric | before | after | change |", "| --- | --- | ---: | ---: | ---: |"]
    for name, before in report["before"].items():
        after = report["after"].get(name, {})
        for metric in METRICS:
            if metric in before or metric in after:
                b, a = before.get(metric, math.nan), after.get(metric, math.nan)
                lines.append(f"| {name} | {metric} | {_fmt(b)} | {_fmt(a)} | {a - b:+.4f} |")
    lines.append("")
    lines.append("; ".join(f"`{k}`: {v}" for k, v in HOW.items()))
    return "\n".join(lines) + "\n"


def _columns(reports: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    cols = []
    for name in ("forget", "retain", "holdout"):
        for metric in METRICS:
            if any(metric in r["after"].get(name, {}) for r in reports):
                cols.append((name, metric))
    return cols


def sweep_table(before: Mapping[str, Any], runs: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """One row for the model before unlearning and one per run: every set's metrics
    after the run."""
    reports = [r for _, r in runs]
    cols = _columns(reports)
    head = "| run | " + " | ".join(f"{s} {m}" for s, m in cols) + " |"
    sep = "| --- | " + " | ".join("---:" for _ in cols) + " |"
    rows = [
        "| before | " + " | ".join(_fmt(before.get(s, {}).get(m, math.nan)) for s, m in cols) + " |"
    ]
    for name, r in runs:
        rows.append(
            f"| {name} | "
            + " | ".join(_fmt(r["after"].get(s, {}).get(m, math.nan)) for s, m in cols)
            + " |"
        )
    return "\n".join([head, sep, *rows]) + "\n"


def loss_curves(history: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{"forget": [(step, loss)], "retain": [(step, retain NLL)]}`` from the Trainer's
    log history (the objective's loss and the retain NLL logged at every step)."""
    out: dict[str, list[tuple[int, float]]] = {"forget": [], "retain": []}
    for entry in history:
        if "loss" in entry and "step" in entry:
            out["forget"].append((int(entry["step"]), float(entry["loss"])))
            if "retain_loss" in entry:
                out["retain"].append((int(entry["step"]), float(entry["retain_loss"])))
    return out


def plot_losses(curves: Mapping[str, Sequence[tuple[int, float]]], path: Path, title: str) -> None:
    """The forget objective's loss and the retain NLL over the steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("forget", "forget: objective loss"), ("retain", "retain: NLL")):
        pts = curves.get(key, [])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
