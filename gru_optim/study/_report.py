"""Study outputs: ``summary.json``, ``summary.csv``, ``table.md`` (the models, the last
evaluations, every paired comparison and the verdict), the trade-off plot, ``meta.json``
and ``README.md``."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._outcomes import (
    ALPHA,
    FP_LEVELS,
    FQ_LEVEL,
    STATS,
    arm_of,
    comparisons,
    noise_floor,
    run_records,
    seed_outcomes,
    validated,
)
from ._plot import plot_tradeoff
from ._verdict import arm_label, verdict

__all__ = [
    "distinct_oracles",
    "final_rows",
    "markdown_table",
    "report_from_dir",
    "statistics",
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


def distinct_oracles(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The oracle records, each model once (seeds that share a split share its oracles,
    and their records repeat)."""
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        if r["method"] == "oracle":
            key = (r.get("index", r["seed"]), r["forget_prob"], r["model_utility"])
            seen.setdefault(key, r)
    return list(seen.values())


def _order(records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(method, arm) pairs in the order they ran."""
    return list(dict.fromkeys((r["method"], arm_of(r)) for r in run_records(records)))


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
    runs = run_records(records)
    last = max(r["step"] for r in runs) if runs else 0
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r["step"] == last:
            groups[(r["method"], arm_of(r), r["lr"])].append(r)
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
            "Every row is evaluated once and cut into a validation half, on which the "
            "learning rate and stopping step are chosen, and a held-out half, which every "
            "number here reports ("
            + ", ".join(
                f"{k} {v['val']} + {v['test']}" if isinstance(v, dict) else f"{k} {v}"
                for k, v in rows.items()
            )
            + f" rows); answers are generated greedily until the end of sequence or {gen} tokens "
            "of prompt and answer (TOFU's `max_length` is 200)."
        )
    notes.append(
        "mia_auc: Min-K% (k = 0.4, the answer's tokens without the end of sequence) AUC of "
        "forget against holdout rows, open-unlearning's convention (1: the forget rows look "
        "far more likely). privleak: MUSE's, on that AUC in MUSE's convention: 0 is the "
        "reference oracle, −100 tells every forget row from every holdout row, > 0 "
        "over-unlearns."
    )
    return notes


def _comparison_table(records: Sequence[dict[str, Any]]) -> str:
    cmps = comparisons(records)
    if not cmps:
        return ""
    floor = noise_floor(records)
    floor_txt = (
        "; ".join(f"{STATS[k]} {v:.4f}" for k, v in floor.items())
        if floor is not None
        else "not measured (one oracle per seed)"
    )
    n_tested = sum(not math.isnan(c.p_holm) for c in cmps)
    out = (
        "\n\nPaired comparisons with plain, per seed: the learning rate and stopping step "
        "chosen on the validation halves, the value read on the held-out halves; "
        "arm − plain as the mean over seeds with its 95% t interval (n − 1 degrees of "
        f"freedom), the paired t test's p and Holm's adjusted p over all {n_tested} tested "
        f"comparisons. A call needs Holm's p < {ALPHA} and |arm − plain| above the noise "
        f"floor (two oracles' difference on the same statistic: {floor_txt}). n: seeds where "
        "both reached the level on validation.\n\n"
        "| method | arm | statistic | n | plain | arm | arm − plain (95% CI) | p | Holm p "
        "| call |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for c in cmps:
        t = c.test
        ci = "" if math.isnan(t.low) else f" ({t.low:+.3f} to {t.high:+.3f})"
        diff = "n/a" if t.n == 0 else f"{t.mean:+.3f}{ci}"
        p = "" if math.isnan(t.p) else f"{t.p:.3g}"
        ph = "" if math.isnan(c.p_holm) else f"{c.p_holm:.3g}"
        cells = [
            c.method,
            arm_label(c.arm),
            STATS[c.stat],
            str(t.n),
            "n/a" if math.isnan(c.plain_mean) else f"{c.plain_mean:.3f}",
            "n/a" if math.isnan(c.arm_mean) else f"{c.arm_mean:.3f}",
            diff,
            p,
            ph,
            c.call,
        ]
        out += "| " + " | ".join(cells) + " |\n"
    return out


def markdown_table(
    records: Sequence[dict[str, Any]],
    config: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> str:
    """The markdown tables: the reference models (mean ± std over seeds), each method,
    arm and learning rate at the last step, every paired comparison, and the notes on
    definitions (``config``: the study's configuration as a dict, ``meta``: the run's
    :func:`write_report` meta). Every number is on the held-out halves."""
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

    lines.append(line("target", "", "", "0", [r for r in records if r["method"] == "target"]))
    oracles = distinct_oracles(records)
    ref = [o for o in oracles if o.get("index", o["seed"]) == 0]
    other = [o for o in oracles if o.get("index", o["seed"]) != 0]
    if ref:
        lines.append(line("oracle (reference)", "", "", "", ref))
    if other:
        lines.append(line("oracle (second: the noise floor)", "", "", "", other))
    last, groups = _last_groups(records)
    order = _order(records)
    for (m, a, lr), rows in sorted(
        groups.items(), key=lambda kv: (order.index(kv[0][:2]), kv[0][2])
    ):
        lines.append(line(m, a, f"{lr:g}", str(last), rows))
    out = "\n".join(lines) + _comparison_table(records)
    out += "\n" + "\n\n".join(_notes(config, meta)) + "\n"
    return out


def _num(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else v


def statistics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Everything the verdict is decided by, as plain JSON (``stats.json``): the levels,
    whether selection used validation metrics, the noise floor, every arm's per-seed
    outcome (value, learning rate and step chosen) and every comparison (per-seed
    differences, mean, 95% interval, p, Holm's p, call)."""
    return {
        "fp_levels": list(FP_LEVELS),
        "fq_level": FQ_LEVEL,
        "alpha": ALPHA,
        "selected_on_validation": validated(records),
        "statistics": STATS,
        "noise_floor": noise_floor(records),
        "outcomes": [
            {
                "method": m,
                "arm": a,
                "seed": s,
                "stat": k,
                "value": o.value,
                "lr": o.lr,
                "step": o.step,
            }
            for (m, a, s), res in seed_outcomes(records).items()
            for k, o in res.items()
        ],  # fmt: skip
        "comparisons": [
            {
                "method": c.method,
                "arm": c.arm,
                "stat": c.stat,
                "diffs": {str(s): d for s, d in c.diffs.items()},
                "n": c.test.n,
                "mean": _num(c.test.mean),
                "low": _num(c.test.low),
                "high": _num(c.test.high),
                "p": _num(c.test.p),
                "p_holm": _num(c.p_holm),
                "noise_floor": c.floor,
                "call": c.call,
            }
            for c in comparisons(records)
        ],
    }


def write_report(
    records: Sequence[dict[str, Any]], out_dir: Path, meta: dict[str, Any]
) -> dict[str, Path]:
    """Write ``summary.json`` (the records), ``summary.csv``, ``table.md`` (tables, notes
    and the verdict), ``tradeoff.png``, ``stats.json`` (:func:`statistics`),
    ``meta.json`` (config, versions, wall time) and ``README.md`` (how it was made) under
    ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "summary.json",
        "csv": out_dir / "summary.csv",
        "table": out_dir / "table.md",
        "plot": out_dir / "tradeoff.png",
        "meta": out_dir / "meta.json",
        "stats": out_dir / "stats.json",
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
    paths["stats"].write_text(json.dumps(statistics(records), indent=1))
    runs = run_records(records)
    if cfg.get("model_path"):
        trained = (
            f"; the target `{cfg['model_path']}` and the oracles "
            + ", ".join(f"`{p}`" for p in cfg.get("oracle_paths", []))
            + f" ran on `{cfg.get('device', '?')}` in {cfg.get('dtype', '?')}."
        )
    elif meta.get("models_cached"):
        trained = "; the target and the oracles came from the cache."
    elif "train_seconds" in meta:
        trained = (
            f"; training the models not in the cache took {meta['train_seconds']:.0f} s of it."
        )
    else:
        trained = "."
    arms_by_method = {
        m: list(dict.fromkeys(arm_of(r) for r in runs if r["method"] == m))
        for m in dict.fromkeys(r["method"] for r in runs)
    }
    n_lrs, n_seeds = len({r["lr"] for r in runs}), len({r["seed"] for r in runs})
    lines = [
        f"Preset `{meta.get('preset', '?')}`,"
        f" made by `{meta.get('command', 'python -m gru_optim.demo')}`"
        f" in {meta.get('wall_seconds', float('nan')):.0f} s wall time"
        f" (torch {meta.get('torch', '?')},"
        f" {meta.get('threads', cfg.get('threads', '?'))} CPU thread(s); the saved runs"
        f" took {meta.get('run_seconds', float('nan')):.0f} s of unlearning and evaluation"
        " in all, over however many calls made them)" + trained,
        (
            f"{len({(r['method'], arm_of(r), r['lr'], r['seed']) for r in runs})} unlearning runs"
            " ("
            + "; ".join(f"{m}: {', '.join(a)}" for m, a in arms_by_method.items())
            + f"; × {n_lrs} learning rates × {n_seeds} seeds, {cfg.get('steps', '?')} steps each,"
            " evaluated every"
            f" {cfg.get('eval_every', '?')}),"
            f" {len(distinct_oracles(records))} oracles"
            + (
                " (each seed its own split of the authors, target and oracles);"
                if cfg.get("resplit")
                else " (every seed its own target, one split and its oracles shared);"
            )
            + f" forget split `{cfg.get('split', '?')}`"
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
