"""Words from the numbers: the study's verdict in plain sentences, claiming only the
differences that survive Holm's correction and exceed the oracles' noise floor
(:func:`~._outcomes.comparisons`)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ._outcomes import (
    ALPHA,
    STATS,
    Comparison,
    comparisons,
    identical_arms,
    noise_floor,
    slower_pairs,
    validated,
)

__all__ = ["ARM_LABELS", "arm_label", "headline", "join", "verdict"]

ARM_LABELS = {
    "plain": "plain",
    "GRU": "GRU",
    "GRU-k": "GRU-k",
    "update": "update-space GRU",
    "cos-clip": "cos-clip GRU",
    "+KL": "+KL GRU",
}
"""How the words and the plots name each arm."""


def _verb(n: int, verb: str) -> str:
    """``verb`` agreeing with a count ``n`` ("1 of 30 survives", "2 of 30 survive")."""
    return verb + "s" if n == 1 else verb


def arm_label(arm: str) -> str:
    """The arm's name in prose."""
    return ARM_LABELS.get(arm, arm)


def join(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    items = list(items)
    if not items:
        return ""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _effect(c: Comparison) -> str:
    t = c.test
    return (
        f"{STATS[c.stat]} by {abs(t.mean):.3f} (95% CI {t.low:+.3f} to {t.high:+.3f}, "
        f"n = {t.n}, Holm-adjusted p = {c.p_holm:.2g})"
    )


def _finding(c: Comparison) -> str:
    if c.test.mean == 0:
        return f"{arm_label(c.arm)} leaves {c.method}'s {STATS[c.stat]} unchanged in every seed"
    verb = "raises" if c.test.mean > 0 else "lowers"
    return f"{arm_label(c.arm)} {verb} {c.method}'s {_effect(c)}"


def _findings(cs: Sequence[Comparison]) -> str:
    """One clause per (method, arm, direction): the statistics it moves, with numbers."""
    groups: dict[tuple[str, str, bool], list[Comparison]] = defaultdict(list)
    for c in cs:
        groups[(c.method, c.arm, c.test.mean > 0)].append(c)
    return "; ".join(
        f"{arm_label(a)} {'raises' if up else 'lowers'} {m}'s " + join([_effect(c) for c in g])
        for (m, a, up), g in groups.items()
    )


def _identical(records: Sequence[dict[str, Any]]) -> list[str]:
    by: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (m, a), b in identical_arms(records).items():
        by[(a, b)].append(m)
    out = []
    for (a, b), methods in by.items():
        why = " (no cosine fell below the clip)" if (a, b) == ("cos-clip", "GRU") else ""
        out.append(
            f"{arm_label(a)} produced the same numbers as {arm_label(b)} in every run of "
            f"{join(methods)}{why}, so there it is one arm, reported and drawn once as "
            f"{arm_label(b)}."
        )
    return out


def verdict(records: Sequence[dict[str, Any]]) -> str:
    """What the study shows, in sentences generated from :func:`~._outcomes.comparisons`:
    how the numbers were chosen and tested, the noise floor's value, every difference
    that survives Holm's correction and the floor (or, if none does, the closest one),
    arms that ran identically, and comparisons that could not be made."""
    cmps = comparisons(records)
    n_seeds = len({s for c in cmps for s in c.diffs}) or len(
        {r["seed"] for r in records if r["method"] not in ("target", "oracle")}
    )
    tested = [c for c in cmps if not math.isnan(c.p_holm)]
    if validated(records):
        how = (
            f"Over {n_seeds} seeds, each arm's learning rate and stopping step were chosen on "
            "the validation halves of the evaluation sets and its numbers read on the "
            "held-out halves."
        )
    else:
        how = (
            f"Over {n_seeds} seeds. These records carry no validation metrics, so each arm's "
            "learning rate and stopping step were chosen on the very sets reported, which "
            "flatters every arm."
        )
    if len([r for r in records if r["method"] == "target"]) == 1 and n_seeds > 1:
        how += (
            " The seeds share one target and one split of the authors: they vary the "
            "unlearning batches only."
        )
    floor = noise_floor(records)
    floor_txt = (
        "the noise floor (how far two retain-only oracles differ on the same statistic: "
        f"{floor['mu_fp10']:.3f} in model utility, {floor['area_fp']:.3f} and "
        f"{floor['area_fq']:.3f} in the two front areas)"
        if floor is not None
        else "the noise floor (not measured here: one oracle per seed)"
    )
    s = [
        how,
        f"Each arm is compared with the same method plain by the per-seed paired difference "
        f"(95% t interval, Holm's correction over all {len(tested)} tested comparisons); a "
        f"difference counts when its adjusted p-value is below {ALPHA} and it exceeds "
        f"{floor_txt}.",
    ]
    found = [c for c in cmps if c.call != "not shown"]
    if found:
        better = [c for c in found if c.call == "better"]
        worse = [c for c in found if c.call == "worse"]
        if better:
            s.append(
                f"{len(better)} of the {len(tested)} comparisons {_verb(len(better), 'survive')} "
                "in favour of the "
                "rectified arm: " + _findings(better) + "."
            )
        if worse:
            s.append(
                f"{len(worse)} {_verb(len(worse), 'survive')} against it: " + _findings(worse) + "."
            )
        s.append("No other difference is shown.")
    elif tested:
        best = min(tested, key=lambda c: c.p_holm)
        s.append(
            "No difference from plain survives the correction. The nearest to it: "
            + _finding(best)
            + "."
        )
    else:
        s.append("Nothing could be tested (a paired test needs at least two seeds).")
    if tested:
        pos = sum(c.test.mean > 0 for c in tested)
        s.append(
            f"Before correction, {pos} of the {len(tested)} mean differences "
            f"{_verb(pos, 'favour')} the "
            "rectified arm."
        )
    slower, pairs = slower_pairs(records)
    if pairs:
        s.append(
            f"At equal learning rate and step, the rectified arm ended with a higher forget "
            f"probability than plain in {slower} of {pairs} pairs, which is why arms are "
            "compared at matched forgetting."
        )
    s += _identical(records)
    never: dict[str, list[str]] = defaultdict(list)
    for c in cmps:
        if c.test.n == 0 and not c.stat.startswith("area_"):
            never[c.method].append(STATS[c.stat].replace("model utility at ", ""))
    if never:
        parts = [f"{m} ({join(sorted(set(v)))})" for m, v in never.items()]
        s.append(
            "Not compared, because plain or the arm never reached the level in any seed"
            + (" (on validation)" if validated(records) else "")
            + ": "
            + join(parts)
            + "."
        )
    return " ".join(s)


def _by_arm(cs: Sequence[Comparison]) -> str:
    """``update-space GRU on GA (1 statistic) and NPO (3 statistics); GRU on NPO (2
    statistics)``: the arms and methods of ``cs``, with how many statistics each."""
    arms: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for c in cs:
        arms[c.arm][c.method] += 1
    return "; ".join(
        f"{arm_label(a)} on "
        + join([f"{m} ({n} statistic{'s' if n > 1 else ''})" for m, n in ms.items()])
        for a, ms in arms.items()
    )


def headline(records: Sequence[dict[str, Any]]) -> str:
    """The study's verdict in a few short sentences (the opening of the README's
    paragraph and what ``make demo`` prints): how many paired comparisons with plain
    survive Holm's correction and the noise floor, each way, and for which arms and
    methods."""
    cmps = comparisons(records)
    tested = [c for c in cmps if not math.isnan(c.p_holm)]
    n_seeds = len({s for c in cmps for s in c.diffs})
    if not tested:
        return "Nothing could be tested (a paired test needs at least two seeds)."
    better = [c for c in tested if c.call == "better"]
    worse = [c for c in tested if c.call == "worse"]
    worse_n = str(len(worse)) if worse else "none"
    s = [
        f"Over {n_seeds} seeds, {len(better)} of {len(tested)} paired comparisons with plain "
        f"{_verb(len(better), 'show')} a rectified arm better after Holm's correction and "
        f"{worse_n} {_verb(max(len(worse), 1), 'show')} it worse."
    ]
    if better:
        s.append(f"Better: {_by_arm(better)}.")
    if worse:
        s.append(f"Worse: {_by_arm(worse)}.")
    rest = len(tested) - len(better) - len(worse)
    if rest:
        what = "difference is" if rest == 1 else "differences are"
        s.append(f"The other {rest} {what} not shown by these data.")
    return " ".join(s)
