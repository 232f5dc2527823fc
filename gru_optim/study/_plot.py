"""The trade-off plot: per method, every seed's trajectory of model utility against
forget probability (per arm), and per arm the per-seed paired differences from plain at
matched forgetting with their mean, 95% interval and the oracles' noise floor."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._outcomes import (
    FP_LEVELS,
    STATS,
    arm_of,
    comparisons,
    identical_arms,
    noise_floor,
    run_records,
    seed_outcomes,
    validated,
)
from ._verdict import arm_label

__all__ = ["plot_tradeoff"]

_COLORS = {
    "plain": "tab:blue",
    "GRU": "tab:orange",
    "GRU-k": "tab:red",
    "update": "tab:purple",
    "cos-clip": "tab:brown",
    "+KL": "tab:pink",
}
_MARKERS = {"plain": "o", "GRU": "s", "GRU-k": "^", "update": "D", "cos-clip": "v", "+KL": "P"}
_PRIMARY = "mu_fp10"


def plot_tradeoff(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Two rows per band of up to four methods. Top: forget probability (log scale,
    forgetting to the right) against model utility, every seed's trajectory (the learning
    rate chosen on validation for the primary statistic) as a thin line per arm, the
    levels of matched forgetting dotted, the target (star) and the oracles (crosses).
    Bottom: per arm, the per-seed difference from plain in model utility at forget
    probability <= 0.1 (points), their mean and 95% interval (bar) and the noise floor
    (grey band). Arms identical to another are drawn once, under both names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = run_records(records)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    same = identical_arms(records)
    outs = seed_outcomes(records)
    cmps = {(c.method, c.arm): c for c in comparisons(records) if c.stat == _PRIMARY}
    floor = (noise_floor(records) or {}).get(_PRIMARY)
    per = min(4, max(1, len(methods)))
    bands = max(1, math.ceil(len(methods) / per))
    fig, axes = plt.subplots(2 * bands, per, figsize=(3.9 * per, 6.4 * bands + 0.3), squeeze=False)
    for k in range(len(methods), per * bands):
        for i in range(2):
            axes[2 * (k // per) + i][k % per].set_visible(False)
    targets = [r for r in records if r["method"] == "target"]
    oracles = [r for r in records if r["method"] == "oracle"]
    for j, m in enumerate(methods):
        ax, bx = axes[2 * (j // per)][j % per], axes[2 * (j // per) + 1][j % per]
        arms = list(dict.fromkeys(arm_of(r) for r in runs if r["method"] == m))
        drawn = [a for a in arms if (m, a) not in same]
        label = {
            a: " = ".join([arm_label(a)] + [arm_label(b) for b in arms if same.get((m, b)) == a])
            for a in drawn
        }
        ys: list[float] = []
        for a in drawn:
            first = True
            for (mm, aa, s), res in outs.items():
                if (mm, aa) != (m, a):
                    continue
                lr = res[_PRIMARY].lr if res[_PRIMARY].lr is not None else res["area_fp"].lr
                rows = sorted(
                    (
                        r
                        for r in runs
                        if r["method"] == m and arm_of(r) == a and r["seed"] == s and r["lr"] == lr
                    ),
                    key=lambda r: r["step"],
                )
                fp = np.maximum([r["forget_prob"] for r in rows], 1e-4)
                mu = [r["model_utility"] for r in rows]
                ys += [u for f, u in zip(fp, mu) if f < 0.5]
                ax.plot(
                    fp,
                    mu,
                    color=_COLORS.get(a, "gray"),
                    lw=1.0,
                    alpha=0.75,
                    marker=_MARKERS.get(a, "o"),
                    ms=2.5,
                    label=label[a] if first else None,
                )
                first = False
        ax.scatter(
            [t["forget_prob"] for t in targets],
            [t["model_utility"] for t in targets],
            marker="*",
            s=80,
            c="k",
            zorder=5,
            label="target" if j == 0 else None,
        )
        ax.scatter(
            [o["forget_prob"] for o in oracles],
            [o["model_utility"] for o in oracles],
            marker="X",
            s=35,
            c="tab:green",
            zorder=5,
            label="retain-only oracles" if j == 0 else None,
        )
        for lv in FP_LEVELS:
            ax.axvline(lv, color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlim(1.2, 3e-3)
        ys += [o["model_utility"] for o in oracles] + [t["model_utility"] for t in targets]
        if ys:
            lo, hi = float(np.percentile(ys, 3)), float(max(ys))
            pad = 0.08 * max(hi - lo, 1e-3)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(m)
        ax.set_xlabel("forget probability (log; forgetting →)")
        if j % per == 0:
            ax.set_ylabel("model utility (held out)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower left", frameon=False)
        # bottom: paired differences at matched forgetting
        shown = [a for a in drawn if a != "plain"]
        for x, a in enumerate(shown):
            c = cmps.get((m, a))
            if c is None:
                continue
            d = list(c.diffs.values())
            if not d:
                continue
            jitter = np.linspace(-0.12, 0.12, len(d)) if len(d) > 1 else np.zeros(1)
            bx.scatter(x + np.asarray(jitter), d, color=_COLORS.get(a, "gray"), s=14, alpha=0.8)
            if c.test.n >= 2:
                bx.errorbar(
                    [x + 0.3],
                    [c.test.mean],
                    yerr=[[c.test.mean - c.test.low], [c.test.high - c.test.mean]],
                    fmt="o",
                    color="k",
                    ms=4,
                    capsize=3,
                )
                bx.annotate(
                    f"Holm p = {c.p_holm:.2g}",
                    (x, 1.0),
                    xycoords=("data", "axes fraction"),
                    ha="center",
                    va="top",
                    fontsize=7,
                )
        if not any(cmps[(m, a)].diffs for a in shown if (m, a) in cmps):
            note = "no seed reached forget probability 0.1\non validation with both arms"
            bx.text(0.5, 0.5, note, ha="center", va="center", transform=bx.transAxes, fontsize=8)
        bx.axhline(0.0, color="k", lw=0.8)
        if floor is not None:
            bx.axhspan(-floor, floor, color="gray", alpha=0.25, lw=0)
        bx.set_xticks(range(len(shown)), [label[a] for a in shown], fontsize=7, rotation=15)
        bx.set_xlim(-0.6, max(len(shown), 1) - 0.3)
        if j % per == 0:
            bx.set_ylabel(
                "arm − plain: " + STATS[_PRIMARY].replace("forget probability", "FP"), fontsize=8
            )
        bx.grid(alpha=0.3, axis="y")
    caption = (
        "Top: each seed's trajectory ("
        + (
            "held-out halves; learning rate chosen on validation"
            if validated(records)
            else "learning rate chosen on the reported sets: no validation metrics"
        )
        + "); "
        "dotted: forget probability 0.1 and 0.05. Bottom: per seed, arm − plain in model "
        "utility where validation forget probability first reaches 0.1; bar: mean and 95% "
        "t interval; grey: the oracles' noise floor."
    )
    lines = textwrap.wrap(caption, width=int(13 * fig.get_figwidth()))
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.05 + 0.15 * len(lines)) / fig.get_figheight()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
