"""The unlearning study: corpus generator, metrics against hand-computed values, and a
micro end-to-end run of the pipeline."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from gru_optim.study import (
    PRESETS,
    CorpusConfig,
    ModelConfig,
    StudyConfig,
    TrainConfig,
    encode_qa,
    forget_quality,
    generate_corpus,
    harmonic_mean,
    hypervolume,
    load_tofu,
    mia_auc,
    min_k,
    privleak,
    report_from_dir,
    run_study,
    train_tokenizer,
    truth_ratio,
    truth_score,
    write_corpus,
)

# --------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_seeded() -> None:
    a = generate_corpus(CorpusConfig(n_authors=20, seed=3))
    b = generate_corpus(CorpusConfig(n_authors=20, seed=3))
    c = generate_corpus(CorpusConfig(n_authors=20, seed=4))
    assert a == b
    assert a["full"] != c["full"]


def test_corpus_splits_are_disjoint_and_nested() -> None:
    cfg = CorpusConfig(n_authors=40, n_facts=6, n_perturbed=4)
    c = generate_corpus(cfg)
    sizes = cfg.split_sizes()
    assert sizes == {"forget01": 1, "forget05": 2, "forget10": 4}

    def authors(rows: list[dict[str, Any]]) -> set[str]:
        return {r["author"] for r in rows}

    full = authors(c["full"])
    assert len(full) == 40 and len(c["full"]) == 40 * 6
    for split, k in sizes.items():
        pct = int(split[-2:])
        forget, retain = authors(c[split]), authors(c[f"retain{100 - pct:02d}"])
        assert len(forget) == k
        assert not forget & retain and forget | retain == full
        holdout = authors(c[f"holdout{pct:02d}"])
        assert len(holdout) == k and not holdout & full
    assert authors(c["forget01"]) <= authors(c["forget05"]) <= authors(c["forget10"])
    assert not authors(c["retain_perturbed"]) & authors(c["forget10"])
    for row in c["forget10_perturbed"] + c["world_facts_perturbed"]:
        assert len(row["perturbed_answer"]) == 4
        assert row["answer"] not in row["perturbed_answer"]
        assert row["paraphrased_answer"] != row["answer"]
    questions = [r["question"] for r in c["full"]]
    assert len(set(questions)) == len(questions)


def test_corpus_written_in_tofu_layout_and_loaded(tmp_path) -> None:
    cfg = CorpusConfig(n_authors=20, n_facts=4)
    write_corpus(cfg, tmp_path)
    for stem in (
        "full",
        "forget01",
        "forget05",
        "forget10",
        "retain99",
        "retain95",
        "retain90",
        "forget10_perturbed",
        "retain_perturbed",
        "world_facts",
        "world_facts_perturbed",
        "holdout10",
    ):
        lines = (tmp_path / f"{stem}.json").read_text().splitlines()
        assert lines and all("question" in json.loads(x) for x in lines)
    data = load_tofu(tmp_path, "forget05")
    assert len(data.forget) == 1 * 4 and len(data.retain) == 19 * 4
    assert data.forget_eval[0]["perturbed_answer"]
    # a JSON-array copy of the same file loads identically (some TOFU mirrors ship arrays)
    rows = [json.loads(x) for x in (tmp_path / "forget05.json").read_text().splitlines()]
    (tmp_path / "forget05.json").write_text(json.dumps(rows))
    assert load_tofu(tmp_path, "forget05").forget == data.forget
    with pytest.raises(ValueError):
        load_tofu(tmp_path, "forget20")


def test_tokenizer_keeps_every_character() -> None:
    texts = [r["question"] + " " + r["answer"] for r in generate_corpus(CorpusConfig())["full"]]
    tok = train_tokenizer(texts, 300)
    odd = "Ünïcødé ☃ 1999 — naïve"
    assert tok.decode(tok.encode(odd).ids) == odd
    with pytest.raises(ValueError, match="258"):
        train_tokenizer(texts, 258)
    batch = encode_qa(tok, ["Who?", "Where is it?"], ["Me.", "Far away from here."])
    assert batch.input_ids.shape == batch.labels.shape
    # labels: -100 on the prompt and the padding, the answer ids (+ eos) elsewhere
    n_answer = (batch.labels != -100).sum(1)
    assert n_answer.tolist() == [
        len(tok.encode(" Me.").ids) + 1,
        len(tok.encode(" Far away from here.").ids) + 1,
    ]
    assert (batch.labels[batch.attention_mask == 0] == -100).all()


# --------------------------------------------------------------------------- metrics


def test_truth_ratio_and_score_by_hand() -> None:
    # P(true) = 0.5, perturbed 0.25 and 0.0625 -> geometric mean 0.125 -> R = 0.25
    ref = np.log([0.5, 0.1])
    pert = np.log([[0.25, 0.0625], [0.1, 0.4]])
    r = truth_ratio(ref, pert)
    assert r == pytest.approx([0.25, 2.0])
    assert truth_score(r) == pytest.approx((0.75 + 0.0) / 2)


def test_forget_quality_is_ks_test() -> None:
    same = forget_quality([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
    assert same["p"] == pytest.approx(1.0) and same["stat"] == 0.0
    apart = forget_quality([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    # D = 1; exact two-sided p for n = m = 5 is 2 / C(10, 5) = 2 / 252
    assert apart["stat"] == 1.0
    assert apart["p"] == pytest.approx(2 / 252)
    assert (apart["n"], apart["n_oracle"]) == (5, 5)


def test_auc_privleak_hmean_by_hand() -> None:
    assert mia_auc([3, 4], [1, 2]) == 1.0
    assert mia_auc([1, 2], [3, 4]) == 0.0
    # pairs (m, n): (2,1) win, (2,3) loss, (4,1) win, (4,3) win -> 3/4
    assert mia_auc([2, 4], [1, 3]) == pytest.approx(0.75)
    assert privleak(0.75, 0.5) == pytest.approx(50.0)
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([1.0, 0.0]) == 0.0


def test_min_k_batched_matches_loop() -> None:
    torch.manual_seed(0)
    v = torch.randn(5, 9)
    mask = torch.rand(5, 9) > 0.3
    mask[:, 0] = True
    got = min_k(v, mask, 0.4)
    for i in range(5):
        vals = sorted(v[i][mask[i]].tolist())
        k = max(1, math.ceil(0.4 * len(vals)))
        assert got[i].item() == pytest.approx(sum(vals[:k]) / k, abs=1e-5)


def test_hypervolume_by_hand() -> None:
    assert hypervolume([(1.0, 0.5)]) == pytest.approx(0.5)
    # union of [0,1]x[0,0.5] and [0,0.5]x[0,1] = 0.5 + 0.5*0.5
    assert hypervolume([(1.0, 0.5), (0.5, 1.0), (0.4, 0.4)]) == pytest.approx(0.75)


# --------------------------------------------------------------------------- end to end

REQUIRED = {
    "method",
    "gru",
    "seed",
    "lr",
    "step",
    "forget_quality",
    "model_utility",
    "forget_prob",
    "retain_prob",
    "mia_auc",
    "privleak",
    "ks_stat",
    "ks_n",
    "ks_n_oracle",
    "mia_auc_loss",
    "mia_auc_minkpp",
    "forget_rouge",
    "forget_truth_ratio",
}


def test_micro_study_end_to_end(tmp_path) -> None:
    cfg = replace(
        PRESETS["demo"],
        name="micro",
        corpus=CorpusConfig(n_authors=10, n_facts=3, n_perturbed=2, n_world=4),
        model=ModelConfig(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64),
        train=TrainConfig(epochs=3, batch_size=16, lr=1e-2),
        methods=("GA", "NPO"),
        lrs=(1e-3,),
        seeds=(0,),
        steps=2,
        eval_every=1,
        n_oracles=2,
    )
    assert isinstance(cfg, StudyConfig)
    out = tmp_path / "out"
    records = run_study(cfg, out_dir=out, cache_dir=tmp_path / "cache", log=lambda s: None)
    runs = [r for r in records if r["method"] in ("GA", "NPO")]
    # 2 methods x {plain, GRU} x checkpoints {0, 1, 2}
    assert len(runs) == 2 * 2 * 3
    assert {(r["method"], r["gru"]) for r in runs} == {
        ("GA", False),
        ("GA", True),
        ("NPO", False),
        ("NPO", True),
    }
    assert {r["method"] for r in records} >= {"target", "oracle"}
    for r in records:
        assert REQUIRED <= r.keys()
        assert 0.0 <= r["forget_quality"] <= 1.0 and 0.0 <= r["mia_auc"] <= 1.0
        assert 0.0 <= r["model_utility"] <= 1.0
    # unlearning changed the model: the forget probability moved away from the target's
    target = next(r for r in records if r["method"] == "target")
    last = [r for r in runs if r["step"] == 2]
    assert all(r["forget_prob"] != target["forget_prob"] for r in last)
    saved = json.loads((out / "summary.json").read_text())
    assert len(saved) == len(records)
    for name in ("summary.csv", "table.md", "tradeoff.png", "meta.json"):
        assert (out / name).stat().st_size > 0
    assert "Pareto" in (out / "table.md").read_text()
    # a second study reuses the cached target and oracles: same reference records
    logs: list[str] = []
    again = run_study(
        replace(cfg, methods=()),
        out_dir=None,
        cache_dir=tmp_path / "cache",
        log=logs.append,
    )
    assert logs and all("cached" in line for line in logs)
    assert [r["method"] for r in again] == ["target", "oracle", "oracle"]
    assert [r["forget_prob"] for r in again] == pytest.approx(
        [r["forget_prob"] for r in records[:3]]
    )
    assert "python -m gru_optim.demo" in (out / "README.md").read_text()
    # the report is rebuilt from summary.json alone
    table = (out / "table.md").read_text()
    (out / "table.md").unlink()
    report_from_dir(out)
    assert (out / "table.md").read_text() == table
