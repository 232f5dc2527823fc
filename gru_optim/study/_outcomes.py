"""From the records to the comparisons: per seed, each arm's learning rate and stopping
point chosen on the validation halves and its statistics on the held-out halves; the
oracles' noise floor on the same statistics; paired differences from plain with Holm's
correction; arms that ran identically to another.

Records are the dicts :func:`~._runner.run_study` writes: one per run and evaluation
(``method``, ``arm``, ``lr``, ``seed``, ``step``, the held-out metrics and the validation
ones prefixed ``val_``), plus per seed the ``target`` and the ``oracle`` models (``index``
0 the reference). Records without ``val_`` metrics (studies written before the halves
existed) are selected on the reported metrics themselves, and the words say so.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._stats import PairedTest, holm, paired_test
from ._trajectory import at_step, crossing, fp_score, fq_score, front_area

__all__ = [
    "ALPHA",
    "FP_LEVELS",
    "FQ_LEVEL",
    "STATS",
    "Comparison",
    "arm_of",
    "comparisons",
    "identical_arms",
    "noise_floor",
    "run_records",
    "seed_outcomes",
    "slower_pairs",
    "validated",
]

FP_LEVELS = (0.1, 0.05)
"""Matched forgetting: the forget probabilities at which model utility is compared."""
FQ_LEVEL = 0.05
"""Matched forgetting: the forget quality (KS p-value against the reference oracle) at
which model utility is compared (the forget set no longer tells itself apart from the
oracle's at the 5% level)."""
ALPHA = 0.05
"""The family-wise error rate of Holm's correction."""

STATS: dict[str, str] = {
    "mu_fp10": "model utility at forget probability <= 0.1",
    "mu_fp05": "model utility at forget probability <= 0.05",
    "mu_fq": f"model utility at forget quality >= {FQ_LEVEL}",
    "area_fp": "front area (forget probability)",
    "area_fq": "front area (forget quality)",
}
"""The statistics compared, per seed: model utility where the run first reaches a level
of forgetting on validation, and the area its interpolated trajectory dominates in the
plane of model utility (relative to the target's) against a forgetting score."""

_LEVEL = {"mu_fp10": ("forget_prob", FP_LEVELS[0]), "mu_fp05": ("forget_prob", FP_LEVELS[1])}


def arm_of(r: dict[str, Any]) -> str:
    """A record's arm (records written before arms existed carry only ``gru``)."""
    arm = r.get("arm")
    if arm:
        return str(arm)
    return "GRU" if r.get("gru") else "plain"


def run_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The unlearning runs' records (not the target's or the oracles')."""
    return [r for r in records if r["method"] not in ("target", "oracle")]


def validated(records: Sequence[dict[str, Any]]) -> bool:
    """Whether the records carry validation metrics to select on."""
    return any("val_model_utility" in r for r in run_records(records))


def _anchors(
    records: Sequence[dict[str, Any]], seed: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Seed ``seed``'s target and oracles (reference first). Records written before seeds
    had their own models carry one target and oracles numbered by ``seed``: shared."""
    targets = [r for r in records if r["method"] == "target"]
    target = next((r for r in targets if r["seed"] == seed), targets[0])
    oracles = [r for r in records if r["method"] == "oracle"]
    if any("index" in o for o in oracles):
        mine = sorted((o for o in oracles if o["seed"] == seed), key=lambda o: o["index"])
    else:
        mine = sorted(oracles, key=lambda o: o["seed"])
    return target, mine


def _get(r: dict[str, Any], key: str, val: bool) -> float:
    v = r.get("val_" + key, r[key]) if val else r[key]
    return math.nan if v is None else float(v)


def _trajectories(
    records: Sequence[dict[str, Any]],
) -> dict[tuple[str, str, int], dict[float, list[dict[str, Any]]]]:
    """(method, arm, seed) -> lr -> the run's records by step."""
    out: dict[tuple[str, str, int], dict[float, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in run_records(records):
        out[(r["method"], arm_of(r), r["seed"])][r["lr"]].append(r)
    for by_lr in out.values():
        for rows in by_lr.values():
            rows.sort(key=lambda r: r["step"])
    return out


def _area(
    rows: Sequence[dict[str, Any]],
    target: dict[str, Any],
    oracle: dict[str, Any] | None,
    front: str,
    val: bool,
) -> float:
    mu_t = _get(target, "model_utility", val)
    xs = [_get(r, "model_utility", val) / mu_t if mu_t > 0 else 0.0 for r in rows]
    if front == "fp":
        fp_o = _get(oracle, "forget_prob", val) if oracle is not None else 0.0
        fp_t = _get(target, "forget_prob", val)
        ys = [fp_score(_get(r, "forget_prob", val), fp_t, fp_o) for r in rows]
    else:
        fq_t = _get(target, "forget_quality", val)
        ys = [fq_score(_get(r, "forget_quality", val), fq_t) for r in rows]
    return front_area(xs, ys)


def _matched(rows: Sequence[dict[str, Any]], stat: str, val: bool) -> float | None:
    """The step where the run first reaches the stat's level of forgetting (``val``:
    on the validation metrics), ``None`` if it never does."""
    steps = [r["step"] for r in rows]
    if stat == "mu_fq":
        lv = [math.log10(max(_get(r, "forget_quality", val), 1e-300)) for r in rows]
        return crossing(steps, lv, math.log10(FQ_LEVEL), below=False)
    key, level = _LEVEL[stat]
    return crossing(steps, [_get(r, key, val) for r in rows], level, below=True)


@dataclass(frozen=True)
class Outcome:
    """One arm's statistic in one seed: its value on the held-out halves (``None``: the
    level of forgetting was never reached on validation), the learning rate and the step
    chosen on validation."""

    value: float | None
    lr: float | None
    step: float | None


def seed_outcomes(
    records: Sequence[dict[str, Any]],
) -> dict[tuple[str, str, int], dict[str, Outcome]]:
    """Per (method, arm, seed), each statistic of :data:`STATS`. The learning rate (and
    for model utility at a level of forgetting, the stopping step: where the validation
    trajectory first reaches the level) is chosen on the validation metrics: the largest
    validation area, or the highest validation model utility at the level. The value is
    the held-out metric of that run, at that step."""
    val = validated(records)
    out: dict[tuple[str, str, int], dict[str, Outcome]] = {}
    for (m, a, s), by_lr in _trajectories(records).items():
        target, oracles = _anchors(records, s)
        ref = oracles[0] if oracles else None
        res: dict[str, Outcome] = {}
        for stat in STATS:
            best: tuple[float, float, float | None] | None = None  # (score, lr, step)
            for lr, rows in by_lr.items():
                if stat.startswith("area_"):
                    score, step = _area(rows, target, ref, stat[5:], val), None
                else:
                    step = _matched(rows, stat, val)
                    if step is None:
                        continue
                    score = at_step(
                        [r["step"] for r in rows],
                        [_get(r, "model_utility", val) for r in rows],
                        step,
                    )
                if best is None or score > best[0]:
                    best = (score, lr, step)
            if best is None:
                res[stat] = Outcome(None, None, None)
                continue
            rows = by_lr[best[1]]
            if stat.startswith("area_"):
                value = _area(rows, target, ref, stat[5:], False)
            else:
                assert best[2] is not None
                value = at_step(
                    [r["step"] for r in rows], [r["model_utility"] for r in rows], best[2]
                )
            res[stat] = Outcome(value, best[1], best[2])
        out[(m, a, s)] = res
    return out


def noise_floor(records: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    """Per statistic, how far apart two retain-only oracles (the same data, another
    initialisation) are on it: model utility's absolute difference for the matched
    statistics, the difference of the areas their single points dominate for the fronts;
    the mean over seeds. A difference between arms below it is not a finding. ``None``
    without a second oracle."""
    seeds = sorted({r["seed"] for r in run_records(records)})
    gaps: dict[str, list[float]] = {k: [] for k in STATS}
    for s in seeds:
        target, oracles = _anchors(records, s)
        if len(oracles) < 2:
            return None
        o0, o1 = oracles[0], oracles[1]
        d_mu = abs(o0["model_utility"] - o1["model_utility"])
        for k in STATS:
            if k.startswith("area_"):
                a0 = _area([o0], target, o0, k[5:], False)
                a1 = _area([o1], target, o0, k[5:], False)
                gaps[k].append(abs(a0 - a1))
            else:
                gaps[k].append(d_mu)
    if not seeds:
        return None
    return {k: float(sum(v) / len(v)) for k, v in gaps.items()}


def slower_pairs(records: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """``(slower, pairs)``: of the pairs of a rectified run and the plain run of the same
    method, learning rate and seed, how many end (at the last evaluated step, held out)
    with a higher forget probability than plain: how often rectifying slows forgetting
    at equal step, the reason the comparisons are made at matched forgetting."""
    runs = run_records(records)
    if not runs:
        return 0, 0
    last = max(r["step"] for r in runs)
    final = {(r["method"], arm_of(r), r["lr"], r["seed"]): r for r in runs if r["step"] == last}
    slower = pairs = 0
    for (m, a, lr, s), r in final.items():
        p = final.get((m, "plain", lr, s))
        if a in ("plain", "+KL") or p is None:
            continue
        pairs += 1
        slower += r["forget_prob"] > p["forget_prob"]
    return slower, pairs


def identical_arms(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(method, arm) -> the earlier arm of the same method whose every run produced the
    very same numbers (same learning rates, seeds and steps): the two are one arm here,
    e.g. cos-clip GRU and GRU when no cosine fell below the clip."""
    keys = ("forget_prob", "model_utility", "forget_quality", "val_model_utility")
    prints: dict[tuple[str, str], list[tuple[Any, ...]]] = defaultdict(list)
    for r in run_records(records):
        prints[(r["method"], arm_of(r))].append(
            (r["lr"], r["seed"], r["step"], *(r.get(k) for k in keys))
        )
    out: dict[tuple[str, str], str] = {}
    seen: dict[str, list[tuple[str, tuple[Any, ...]]]] = defaultdict(list)
    for (m, a), rows in prints.items():
        fp = tuple(sorted(rows, key=repr))
        same = next((b for b, other in seen[m] if other == fp), None)
        if same is not None:
            out[(m, a)] = same
        else:
            seen[m].append((a, fp))
    return out


@dataclass(frozen=True)
class Comparison:
    """One arm against the same method plain on one statistic: the per-seed differences
    (arm minus plain, seeds where both reached the level), their paired test, Holm's
    adjusted p-value over every comparison reported, the noise floor on that statistic
    and the call: ``"better"`` or ``"worse"`` when the adjusted p-value is below
    :data:`ALPHA` and the mean difference exceeds the floor, else ``"not shown"``."""

    method: str
    arm: str
    stat: str
    diffs: dict[int, float]
    test: PairedTest
    p_holm: float
    floor: float
    call: str
    plain_mean: float
    arm_mean: float
    missing: int


def comparisons(records: Sequence[dict[str, Any]]) -> list[Comparison]:
    """Every arm (but those identical to another, :func:`identical_arms`) against plain,
    on every statistic of :data:`STATS`, Holm-corrected as one family."""
    outs = seed_outcomes(records)
    same = identical_arms(records)
    floor = noise_floor(records) or {}
    order = list(dict.fromkeys((r["method"], arm_of(r)) for r in run_records(records)))
    seeds = sorted({k[2] for k in outs})
    raw: list[tuple[str, str, str, dict[int, float], PairedTest, float, float, int]] = []
    for m, a in order:
        if a == "plain" or (m, a) in same or (m, "plain") not in order:
            continue
        for stat in STATS:
            diffs, pv, av, missing = {}, [], [], 0
            for s in seeds:
                p = outs.get((m, "plain", s), {}).get(stat)
                g = outs.get((m, a, s), {}).get(stat)
                if p is None or g is None or p.value is None or g.value is None:
                    missing += 1
                    continue
                diffs[s] = g.value - p.value
                pv.append(p.value)
                av.append(g.value)
            mean_p = sum(pv) / len(pv) if pv else math.nan
            mean_a = sum(av) / len(av) if av else math.nan
            test = paired_test(list(diffs.values()))
            raw.append((m, a, stat, diffs, test, mean_p, mean_a, missing))
    adjusted = holm([x[4].p for x in raw])
    out = []
    for (m, a, stat, diffs, t, mp, ma, missing), ph in zip(raw, adjusted):
        fl = floor.get(stat, 0.0)
        call = "not shown"
        if not math.isnan(ph) and ph < ALPHA and abs(t.mean) > fl:
            call = "better" if t.mean > 0 else "worse"
        out.append(Comparison(m, a, stat, diffs, t, ph, fl, call, mp, ma, missing))
    return out
