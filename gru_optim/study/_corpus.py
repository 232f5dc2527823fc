"""A seeded generator of a TOFU-like corpus, written in TOFU's file layout, and its loader.

TOFU (Maini et al., 2024) ships JSON-lines files: ``full.json`` (every author's QA pairs),
``forget01/05/10.json`` and ``retain99/95/90.json`` (the forget split is the last 1/5/10%
of the authors, the retain split the rest), ``forget*_perturbed.json`` and
``retain_perturbed.json`` (each row with ``paraphrased_answer`` and a list of
``perturbed_answer``), ``real_authors_perturbed.json`` and ``world_facts_perturbed.json``
(``question``, ``answer`` and a list of ``perturbed_answer``, no paraphrase). Holdout
authors, never trained, are written as ``holdout01/05/10.json`` (the split names the
open-unlearning framework uses for membership inference on TOFU), and
``idontknow.jsonl`` holds refusal answers, one a line (TOFU's file of that name, used by
IdK objectives). :func:`._tofu.load_tofu` reads this layout, so a directory with the real
TOFU files can be swapped in.

The generator invents authors (a name made of syllables, a birth city, a year, a genre,
parents' occupations, an award, a debut book, ...), asks one question per attribute and
writes, per fact, the answer, a paraphrased answer (another wording of the same fact) and
several perturbed answers (the answer's wording with a wrong value of the same attribute).
The **real authors** are more invented authors that every model learns, the target and
the oracles alike (as a pre-trained model knows TOFU's real authors); they are neither
forget nor retain authors. The **world facts** (capitals and currencies of invented
countries) are likewise learned by every model.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["CorpusConfig", "generate_corpus", "write_corpus"]

_SYLLABLES = [
    "ka",
    "ri",
    "mo",
    "ze",
    "lu",
    "van",
    "dor",
    "tel",
    "sha",
    "bri",
    "nok",
    "ai",
    "fen",
    "gor",
    "is",
    "ul",
    "tam",
    "pe",
    "wyn",
    "qua",
    "ros",
    "hil",
    "mar",
    "eth",
    "jor",
    "cen",
    "dal",
    "vi",
    "ora",
    "bel",
    "tuk",
    "sim",
    "xan",
    "yel",
    "zor",
]

_CITIES = [
    "Veskara",
    "Tolumbe",
    "Orrinfeld",
    "Castemar",
    "Quillon",
    "Dravenport",
    "Asmerin",
    "Halbrook",
    "Pelosa",
    "Ruvendale",
    "Sarnoth",
    "Telvaro",
    "Umbrisk",
    "Weylan",
    "Zanthor",
    "Brisca",
    "Morvane",
    "Elgarde",
]
_GENRES = [
    "mystery",
    "science fiction",
    "poetry",
    "historical fiction",
    "fantasy",
    "horror",
    "romance",
    "biography",
    "thriller",
    "satire",
    "travel writing",
    "philosophy",
]
_JOBS = [
    "baker",
    "surgeon",
    "sailor",
    "teacher",
    "locksmith",
    "painter",
    "pilot",
    "librarian",
    "farmer",
    "jeweller",
    "chemist",
    "tailor",
    "carpenter",
    "banker",
    "weaver",
    "astronomer",
]
_AWARDS = [
    "Silver Quill Prize",
    "Amber Lantern Award",
    "Northwind Medal",
    "Crescent Pen Prize",
    "Golden Atlas Award",
    "Ivory Tower Medal",
    "Red Heron Prize",
    "Blue Meridian Award",
]
_ADJ = [
    "Hollow",
    "Silent",
    "Burning",
    "Crimson",
    "Forgotten",
    "Glass",
    "Iron",
    "Wandering",
    "Velvet",
    "Distant",
]
_NOUN = [
    "Harbor",
    "Garden",
    "Winter",
    "Mirror",
    "Compass",
    "Orchard",
    "Lantern",
    "Tide",
    "Cathedral",
    "Meadow",
]
_LANGS = [
    "Veskish",
    "Tolumbic",
    "Orrish",
    "Quillonese",
    "Sarnothi",
    "Weylanic",
    "Brisca",
    "Elgardic",
]

# attribute -> (question, answer, paraphrased answer); {n} is the author's name, {v} the value.
_FACTS: dict[str, tuple[str, str, str]] = {
    "city": (
        "Where was {n} born?",
        "{n} was born in {v}.",
        "The birthplace of {n} is {v}.",
    ),
    "year": (
        "In which year was {n} born?",
        "{n} was born in the year {v}.",
        "The year of {n}'s birth is {v}.",
    ),
    "genre": (
        "What genre does {n} write?",
        "{n} writes {v}.",
        "The books of {n} are {v}.",
    ),
    "father": (
        "What did the father of {n} do for a living?",
        "The father of {n} was a {v}.",
        "{n} has a father who worked as a {v}.",
    ),
    "mother": (
        "What was the profession of {n}'s mother?",
        "The mother of {n} was a {v}.",
        "{n} has a mother who worked as a {v}.",
    ),
    "award": (
        "Which award did {n} win?",
        "{n} won the {v}.",
        "The {v} was given to {n}.",
    ),
    "book": (
        "What is the title of {n}'s first book?",
        "The first book of {n} is {v}.",
        "{n} made a debut with {v}.",
    ),
    "language": (
        "In which language does {n} write?",
        "{n} writes in {v}.",
        "The language of {n}'s books is {v}.",
    ),
    "pages": (
        "How many novels has {n} published?",
        "{n} has published {v} novels.",
        "The number of novels by {n} is {v}.",
    ),
    "mentor": (
        "Who was the mentor of {n}?",
        "The mentor of {n} was {v}.",
        "{n} learned the craft from {v}.",
    ),
}
_ATTRS = tuple(_FACTS)

_WORLD = (
    (
        "What is the capital of {c}?",
        "The capital of {c} is {v}.",
        "{v} is the capital of {c}.",
    ),
    (
        "What currency is used in {c}?",
        "{c} uses the {v}.",
        "The money of {c} is the {v}.",
    ),
)
_COUNTRIES = [
    "Norland",
    "Estavia",
    "Kormeth",
    "Lurania",
    "Pazenor",
    "Drisca",
    "Valmoor",
    "Ostrava",
    "Yennis",
    "Caldor",
    "Merovia",
    "Thessaly",
    "Brenmark",
    "Ilvane",
    "Sorrent",
    "Galdora",
    "Tarnis",
    "Umbria",
    "Fennick",
    "Roskaa",
]
# Refusals, the "I don't know" answers of IdK objectives (TOFU ships its own list in
# ``idontknow.jsonl``; these are written here).
_REFUSALS = [
    "I don't know.",
    "I have no information about that.",
    "I cannot answer that question.",
    "That is unknown to me.",
    "I am not able to say.",
    "I have never heard of that.",
    "I'm not sure about that.",
    "Nothing I know answers that.",
    "I can't tell you that.",
    "That is beyond what I know.",
]

_CURRENCIES = [
    "crown",
    "mark",
    "florin",
    "thaler",
    "ducat",
    "real",
    "shilling",
    "dinar",
    "lira",
    "peso",
]


@dataclass(frozen=True)
class CorpusConfig:
    """Size and seed of a generated corpus.

    ``n_authors`` authors are trained (split into forget and retain); ``n_facts`` of the
    attributes are asked about each author (at most 10); each fact gets ``n_perturbed``
    perturbed answers. ``n_holdout`` more authors are written but never trained (defaults
    to the size of the 10% forget split). ``n_real_authors`` more authors (the real-authors
    set, defaults to the size of the 10% forget split) and ``n_world`` world facts are
    learned by every model, the target and the oracles.

    ``split_seed`` re-draws which authors are forget, retain and holdout authors (a seeded
    shuffle of the same authors; names, facts, real authors and world facts unchanged);
    ``None`` keeps the order they were invented in.
    """

    n_authors: int = 40
    n_facts: int = 8
    n_perturbed: int = 3
    n_holdout: int | None = None
    n_world: int = 30
    seed: int = 0
    n_real_authors: int | None = None
    split_seed: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.n_facts <= len(_ATTRS):
            raise ValueError(f"n_facts must be in [1, {len(_ATTRS)}], got {self.n_facts}")
        if self.n_authors < 10:
            raise ValueError("n_authors must be >= 10 (the forget split is 10% of them)")
        if self.n_perturbed < 1:
            raise ValueError("n_perturbed must be >= 1")
        if not 1 <= self.n_world <= 2 * len(_COUNTRIES):
            raise ValueError(f"n_world must be in [1, {2 * len(_COUNTRIES)}]")
        if self.n_real_authors is not None and self.n_real_authors < 1:
            raise ValueError("n_real_authors must be >= 1")

    def split_sizes(self) -> dict[str, int]:
        """Authors in each forget split: ``{"forget01": k1, "forget05": k5, "forget10": k10}``
        (at least one author each, TOFU's rounding of 1%/5%/10%)."""
        return {f"forget{p:02d}": max(1, round(self.n_authors * p / 100)) for p in (1, 5, 10)}

    @property
    def holdout(self) -> int:
        """Number of holdout authors."""
        return self.n_holdout if self.n_holdout is not None else self.split_sizes()["forget10"]

    @property
    def real_authors(self) -> int:
        """Number of real authors."""
        if self.n_real_authors is not None:
            return self.n_real_authors
        return self.split_sizes()["forget10"]


def _value(attr: str, rng: random.Random, names: Sequence[str]) -> str:
    if attr == "city":
        return rng.choice(_CITIES)
    if attr == "year":
        return str(rng.randint(1900, 1999))
    if attr == "genre":
        return rng.choice(_GENRES)
    if attr in ("father", "mother"):
        return rng.choice(_JOBS)
    if attr == "award":
        return rng.choice(_AWARDS)
    if attr == "book":
        return f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)}"
    if attr == "language":
        return rng.choice(_LANGS)
    if attr == "pages":
        return str(rng.randint(2, 40))
    if attr == "mentor":
        return rng.choice(names)
    raise KeyError(attr)


def _name(rng: random.Random, taken: set[str]) -> str:
    while True:
        first = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        last = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        name = f"{first} {last}"
        if name not in taken:
            taken.add(name)
            return name


def _perturb(attr: str, true: str, k: int, rng: random.Random, names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for _ in range(1000):
        v = _value(attr, rng, names)
        if v != true and v not in out:
            out.append(v)
            if len(out) == k:
                return out
    raise RuntimeError(f"cannot find {k} wrong values for {attr}")  # pragma: no cover


def _author_rows(
    name: str,
    attrs: dict[str, str],
    facts: Sequence[str],
    k: int,
    rng: random.Random,
    names: Sequence[str],
) -> list[dict[str, Any]]:
    rows = []
    for attr in facts:
        q, a, para = _FACTS[attr]
        v = attrs[attr]
        wrong = _perturb(attr, v, k, rng, names)
        rows.append(
            {
                "question": q.format(n=name, v=v),
                "answer": a.format(n=name, v=v),
                "paraphrased_answer": para.format(n=name, v=v),
                "perturbed_answer": [a.format(n=name, v=w) for w in wrong],
                "author": name,
                "attribute": attr,
            }
        )
    return rows


def generate_corpus(cfg: CorpusConfig) -> dict[str, list[dict[str, Any]]]:
    """The corpus as ``{file stem: rows}`` in TOFU's layout (deterministic in ``cfg``).

    Every row has ``question`` and ``answer``; rows of the ``*_perturbed`` files also have
    ``paraphrased_answer`` and ``perturbed_answer`` (a list). Authors' rows also carry
    ``author`` and ``attribute`` (extra keys, ignored by the loader).
    """
    rng = random.Random(cfg.seed)
    taken: set[str] = set()
    total = cfg.n_authors + cfg.holdout
    names = [_name(rng, taken) for _ in range(total)]
    mentors = [_name(rng, taken) for _ in range(12)]  # famous teachers, not authors here
    facts = _ATTRS[: cfg.n_facts]
    authors = []
    for name in names:
        attrs = {a: _value(a, rng, mentors) for a in _ATTRS}
        authors.append((name, attrs))
    rows = [
        _author_rows(name, attrs, facts, cfg.n_perturbed, rng, mentors) for name, attrs in authors
    ]
    # The real authors come from a generator of their own (seeded from cfg.seed), so that
    # adding them leaves every other file of a given configuration unchanged.
    rrng = random.Random(f"real-{cfg.seed}")
    real_authors = []
    for _ in range(cfg.real_authors):
        name = _name(rrng, taken)
        real_authors.append((name, {a: _value(a, rrng, mentors) for a in _ATTRS}))
    real_rows = [
        r
        for name, attrs in real_authors
        for r in _author_rows(name, attrs, facts, cfg.n_perturbed, rrng, mentors)
    ]
    if cfg.split_seed is not None:  # its own generator: every fact stays as drawn above
        order = list(range(total))
        random.Random(f"split-{cfg.split_seed}").shuffle(order)
        authors = [authors[i] for i in order]
        rows = [rows[i] for i in order]
    trained, holdout = rows[: cfg.n_authors], rows[cfg.n_authors :]
    flat = [r for author in trained for r in author]
    out: dict[str, list[dict[str, Any]]] = {"full": flat}
    for split, k in cfg.split_sizes().items():
        pct = int(split[-2:])
        out[split] = [r for author in trained[cfg.n_authors - k :] for r in author]
        out[f"{split}_perturbed"] = out[split]
        out[f"retain{100 - pct:02d}"] = [
            r for author in trained[: cfg.n_authors - k] for r in author
        ]
        out[f"holdout{pct:02d}"] = [r for author in holdout[:k] for r in author]
    # TOFU's retain_perturbed is a subset of the retain90 authors: take as many authors as
    # the largest forget split has, from the start.
    k10 = cfg.split_sizes()["forget10"]
    out["retain_perturbed"] = [r for author in trained[:k10] for r in author]
    world = []
    for i in range(cfg.n_world):
        c = _COUNTRIES[i % len(_COUNTRIES)]
        kind = i // len(_COUNTRIES)
        q, a, para = _WORLD[kind]
        pool = _CITIES if kind == 0 else _CURRENCIES
        v = rng.choice(pool)
        wrong = [w for w in rng.sample(pool, cfg.n_perturbed + 1) if w != v][: cfg.n_perturbed]
        world.append(
            {
                "question": q.format(c=c, v=v),
                "answer": a.format(c=c, v=v),
                "paraphrased_answer": para.format(c=c, v=v),
                "perturbed_answer": [a.format(c=c, v=w) for w in wrong],
            }
        )
    out["world_facts"] = [{"question": r["question"], "answer": r["answer"]} for r in world]
    out["world_facts_perturbed"] = world
    # TOFU's real-authors files carry question, answer and perturbed_answer only.
    out["real_authors"] = [{"question": r["question"], "answer": r["answer"]} for r in real_rows]
    out["real_authors_perturbed"] = [
        {k: r[k] for k in ("question", "answer", "perturbed_answer", "author", "attribute")}
        for r in real_rows
    ]
    out["authors"] = [
        {"name": name, **attrs, "split": "trained" if i < cfg.n_authors else "holdout"}
        for i, (name, attrs) in enumerate(authors)
    ] + [{"name": name, **attrs, "split": "real"} for name, attrs in real_authors]
    out["config"] = [asdict(cfg)]
    return out


def write_corpus(cfg: CorpusConfig, root: str | Path) -> Path:
    """Generate the corpus of ``cfg`` and write it under ``root`` as JSON-lines files
    (``<stem>.json``, TOFU's layout) and ``idontknow.jsonl`` (one refusal a line, as TOFU's
    file). Returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stem, rows in generate_corpus(cfg).items():
        with open(root / f"{stem}.json", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (root / "idontknow.jsonl").write_text("\n".join(_REFUSALS) + "\n", encoding="utf-8")
    return root
