"""TOFU's file layout read into the splits one study needs (:func:`load_tofu`): the
generated corpus (:mod:`._corpus`) and a folder of the real TOFU files load the same way."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TofuData", "load_tofu"]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8").strip()
    if text.startswith("["):  # some copies of TOFU are JSON arrays
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass
class TofuData:
    """The splits one study needs, as lists of rows.

    ``forget``/``retain`` are the training QA pairs of the forget and retain authors;
    ``forget_eval``/``retain_eval``/``real_eval``/``world_eval`` are the ``*_perturbed``
    rows the metrics use (TOFU's four evaluation sets: forget, retain, real authors, world
    facts); ``holdout`` rows (authors never trained) are the non-members of membership
    inference. ``real`` and ``world`` (the real authors' and the world facts' QA pairs) are
    trained into every model of the generated corpus, standing in for the pre-training
    knowledge that TOFU's real-authors and world-facts sets probe. ``idk`` holds refusal
    answers (empty when the folder has no ``idontknow.jsonl``).
    """

    forget: list[dict[str, Any]]
    retain: list[dict[str, Any]]
    forget_eval: list[dict[str, Any]]
    retain_eval: list[dict[str, Any]]
    world_eval: list[dict[str, Any]]
    holdout: list[dict[str, Any]]
    world: list[dict[str, Any]]
    split: str
    real_eval: list[dict[str, Any]] = field(default_factory=list)
    real: list[dict[str, Any]] = field(default_factory=list)
    idk: list[str] = field(default_factory=list)


def _check_rows(stem: str, rows: list[dict[str, Any]], keys: Sequence[str]) -> None:
    for i, r in enumerate(rows):
        missing = [k for k in keys if k not in r]
        if missing:
            raise KeyError(f"{stem}.json row {i} lacks {', '.join(missing)}")
        if "perturbed_answer" in keys and not isinstance(r["perturbed_answer"], list):
            raise TypeError(f"{stem}.json row {i}: perturbed_answer must be a list")


def load_tofu(root: str | Path, split: str = "forget10") -> TofuData:
    """Read TOFU's file layout under ``root`` for forget split ``split``
    (``forget01``, ``forget05`` or ``forget10``).

    Reads ``{split}.json``, ``retain{100-p}.json``, ``{split}_perturbed.json``,
    ``retain_perturbed.json``, ``real_authors_perturbed.json``,
    ``world_facts_perturbed.json`` and, when present, ``holdout{p}.json`` (otherwise the
    holdout is empty and membership inference is skipped), ``real_authors.json`` and
    ``world_facts.json`` (the QA pairs trained into generated models; otherwise taken from
    the ``*_perturbed`` files) and ``idontknow.jsonl``. The fields used are TOFU's:
    ``question`` and ``answer`` everywhere, ``paraphrased_answer`` and ``perturbed_answer``
    (a list) in the forget and retain ``*_perturbed`` files, ``perturbed_answer`` in the
    real-authors and world-facts ones (TOFU's have no paraphrase); other fields are
    ignored. A missing required file or field raises an error naming it.
    """
    root = Path(root)
    if split not in ("forget01", "forget05", "forget10"):
        raise ValueError(f"split must be forget01, forget05 or forget10, got {split!r}")
    pct = int(split[-2:])

    def read(stem: str, keys: Sequence[str], required: bool = True) -> list[dict[str, Any]]:
        path = root / f"{stem}.json"
        if not path.exists():
            if required:
                raise FileNotFoundError(f"{path} is missing: not a TOFU directory?")
            return []
        rows = _read_jsonl(path)
        _check_rows(stem, rows, keys)
        return rows

    qa = ("question", "answer")
    tofu_eval = ("question", "answer", "paraphrased_answer", "perturbed_answer")
    options = ("question", "answer", "perturbed_answer")
    world_eval = read("world_facts_perturbed", options)
    real_eval = read("real_authors_perturbed", options)
    world = read("world_facts", qa, required=False) or [
        {"question": r["question"], "answer": r["answer"]} for r in world_eval
    ]
    real = read("real_authors", qa, required=False) or [
        {"question": r["question"], "answer": r["answer"]} for r in real_eval
    ]
    idk_path = root / "idontknow.jsonl"
    idk = (
        [line.strip() for line in idk_path.read_text(encoding="utf-8").splitlines()]
        if idk_path.exists()
        else []
    )
    return TofuData(
        forget=read(split, qa),
        retain=read(f"retain{100 - pct:02d}", qa),
        forget_eval=read(f"{split}_perturbed", tofu_eval),
        retain_eval=read("retain_perturbed", tofu_eval),
        world_eval=world_eval,
        holdout=read(f"holdout{pct:02d}", qa, required=False),
        world=world,
        split=split,
        real_eval=real_eval,
        real=real,
        idk=[line for line in idk if line],
    )
