"""The unlearning study: corpus generator, metrics against hand-computed values, and a
micro end-to-end run of the pipeline with every arm."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from gru_optim.study import (
    ARMS,
    METHOD_ARMS,
    PRESETS,
    CorpusConfig,
    ModelConfig,
    StudyConfig,
    TrainConfig,
    build_model,
    encode_qa,
    forget_quality,
    forget_truth_ratio,
    generate_corpus,
    harmonic_mean,
    hypervolume,
    load_tofu,
    mia_auc,
    min_k,
    min_k_plus_plus,
    option_probability,
    privleak,
    report_from_dir,
    run_study,
    train_tokenizer,
    truth_ratio,
    truth_score,
    write_corpus,
)
from gru_optim.study._lm import encode_prompts
from gru_optim.study._metrics import (
    UTILITY_KEYS,
    Evaluator,
    SequenceScores,
    greedy_generate,
    score_sequences,
)

# --------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_seeded() -> None:
    a = generate_corpus(CorpusConfig(n_authors=20, seed=3))
    b = generate_corpus(CorpusConfig(n_authors=20, seed=3))
    c = generate_corpus(CorpusConfig(n_authors=20, seed=4))
    assert a == b
    assert a["full"] != c["full"]
    assert a["real_authors_perturbed"] != c["real_authors_perturbed"]


def _authors(rows: list[dict[str, Any]]) -> set[str]:
    return {r["author"] for r in rows}


def test_corpus_splits_are_disjoint_and_nested() -> None:
    cfg = CorpusConfig(n_authors=40, n_facts=6, n_perturbed=4)
    c = generate_corpus(cfg)
    sizes = cfg.split_sizes()
    assert sizes == {"forget01": 1, "forget05": 2, "forget10": 4}
    full = _authors(c["full"])
    assert len(full) == 40 and len(c["full"]) == 40 * 6
    for split, k in sizes.items():
        pct = int(split[-2:])
        forget, retain = _authors(c[split]), _authors(c[f"retain{100 - pct:02d}"])
        assert len(forget) == k
        assert not forget & retain and forget | retain == full
        holdout = _authors(c[f"holdout{pct:02d}"])
        assert len(holdout) == k and not holdout & full
    assert _authors(c["forget01"]) <= _authors(c["forget05"]) <= _authors(c["forget10"])
    assert not _authors(c["retain_perturbed"]) & _authors(c["forget10"])
    for row in c["forget10_perturbed"] + c["world_facts_perturbed"]:
        assert len(row["perturbed_answer"]) == 4
        assert row["answer"] not in row["perturbed_answer"]
        assert row["paraphrased_answer"] != row["answer"]
    questions = [r["question"] for r in c["full"]]
    assert len(set(questions)) == len(questions)


def test_real_authors_are_their_own_authors_in_tofu_fields() -> None:
    cfg = CorpusConfig(n_authors=20, n_facts=5, n_perturbed=3, n_real_authors=3)
    c = generate_corpus(cfg)
    real = c["real_authors_perturbed"]
    assert len(real) == 3 * 5 and len(_authors(real)) == 3
    # neither forget, retain nor holdout authors, and no mentor's name either
    assert not _authors(real) & (_authors(c["full"]) | _authors(c["holdout10"]))
    for row in real:
        # TOFU's real-authors file: question, answer, perturbed_answer (no paraphrase)
        assert "paraphrased_answer" not in row
        assert len(row["perturbed_answer"]) == 3 and row["answer"] not in row["perturbed_answer"]
    assert [r["question"] for r in c["real_authors"]] == [r["question"] for r in real]
    # adding real authors leaves every other file as it was
    fewer = generate_corpus(replace(cfg, n_real_authors=1))
    assert all(
        fewer[k] == c[k]
        for k in c
        if k not in ("real_authors", "real_authors_perturbed", "authors", "config")
    )
    assert CorpusConfig(n_authors=40).real_authors == 4


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
        "real_authors",
        "real_authors_perturbed",
        "world_facts",
        "world_facts_perturbed",
        "holdout10",
    ):
        lines = (tmp_path / f"{stem}.json").read_text().splitlines()
        assert lines and all("question" in json.loads(x) for x in lines)
    data = load_tofu(tmp_path, "forget05")
    assert len(data.forget) == 1 * 4 and len(data.retain) == 19 * 4
    assert data.forget_eval[0]["perturbed_answer"]
    assert len(data.real_eval) == 2 * 4 and len(data.real) == 2 * 4
    assert data.idk and all(data.idk)
    # a JSON-array copy of the same file loads identically (some TOFU mirrors ship arrays)
    rows = [json.loads(x) for x in (tmp_path / "forget05.json").read_text().splitlines()]
    (tmp_path / "forget05.json").write_text(json.dumps(rows))
    assert load_tofu(tmp_path, "forget05").forget == data.forget
    with pytest.raises(ValueError):
        load_tofu(tmp_path, "forget20")
    # a missing field or file is named
    bad = [{k: v for k, v in r.items() if k != "paraphrased_answer"} for r in data.retain_eval]
    (tmp_path / "retain_perturbed.json").write_text("\n".join(json.dumps(r) for r in bad))
    with pytest.raises(KeyError, match="retain_perturbed.json row 0 lacks paraphrased_answer"):
        load_tofu(tmp_path, "forget05")
    (tmp_path / "real_authors_perturbed.json").unlink()
    with pytest.raises(FileNotFoundError, match="real_authors_perturbed"):
        load_tofu(tmp_path, "forget05")


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


def test_truth_ratio_and_scores_by_hand() -> None:
    # P(true) = 0.5, perturbed 0.25 and 0.0625 -> geometric mean 0.125 -> R = 0.25
    ref = np.log([0.5, 0.1])
    pert = np.log([[0.25, 0.0625], [0.1, 0.4]])
    r = truth_ratio(ref, pert)
    assert r == pytest.approx([0.25, 2.0])
    assert truth_score(r) == pytest.approx((0.75 + 0.0) / 2)
    # forget: min(R, 1/R) = 0.25 and 0.5
    assert forget_truth_ratio(r) == pytest.approx((0.25 + 0.5) / 2)
    # options: 0.5 / (0.5 + 0.25 + 0.0625) and 0.1 / (0.1 + 0.1 + 0.4)
    assert option_probability(ref, pert) == pytest.approx((0.5 / 0.8125 + 0.1 / 0.6) / 2)


def test_forget_quality_is_ks_test() -> None:
    same = forget_quality([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
    assert same["p"] == pytest.approx(1.0) and same["stat"] == 0.0
    apart = forget_quality([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    # D = 1; exact two-sided p for n = m = 5 is 2 / C(10, 5) = 2 / 252
    assert apart["stat"] == 1.0
    assert apart["p"] == pytest.approx(2 / 252)
    assert (apart["n"], apart["n_oracle"]) == (5, 5)
    # TOFU tests 1/R: the same p-value
    a, b = [0.2, 0.5, 0.9, 1.3], [0.4, 0.6, 2.0, 3.0, 0.1]
    assert forget_quality(a, b)["p"] == forget_quality(1 / np.array(a), 1 / np.array(b))["p"]


def test_auc_and_muses_privleak_by_hand() -> None:
    assert mia_auc([3, 4], [1, 2]) == 1.0
    assert mia_auc([1, 2], [3, 4]) == 0.0
    # pairs (m, n): (2,1) win, (2,3) loss, (4,1) win, (4,3) win -> 3/4
    assert mia_auc([2, 4], [1, 3]) == pytest.approx(0.75)
    # MUSE's score is a loss (Min-40%: minus the mean of the lowest log-probabilities);
    # it labels the forget rows 0, the holdout rows 1 and ranks by minus the loss: 1 - AUC
    from sklearn.metrics import roc_auc_score

    loss = -np.array([2.0, 4.0, 1.0, 3.0])  # forget, forget, holdout, holdout
    muse = roc_auc_score([0, 0, 1, 1], -loss)
    assert muse == pytest.approx(1 - 0.75)
    # privleak = 100 (AUC_muse - AUC_muse_oracle) / AUC_muse_oracle
    assert privleak(0.75, 0.5) == pytest.approx(100 * (0.25 - 0.5) / 0.5)  # -50: leaks
    assert privleak(0.25, 0.5) == pytest.approx(50.0)  # over-unlearns
    assert privleak(0.449, 0.449) == pytest.approx(0.0)
    # the target of the full preset: usual AUC 1.0 against an oracle at 0.449
    assert privleak(1.0, 0.449) == pytest.approx(-100.0)
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([1.0, 0.0]) == 0.0


def test_min_k_counts_as_open_unlearning() -> None:
    v = torch.tensor([[-1.0, -5.0, -3.0, -2.0, -4.0], [-1.0, -2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    # n = 5: int(0.4 * 5) = 2 -> mean(-5, -4); n = 2: int(0.8) = 0 -> at least 1 -> -2
    assert min_k(v, mask, 0.4).tolist() == pytest.approx([-4.5, -2.0])
    # an empty row scores 0, as open-unlearning's
    assert min_k(v, torch.zeros_like(mask), 0.4).tolist() == [0.0, 0.0]
    torch.manual_seed(0)
    for k in (0.4, 0.29, 0.2):
        v = torch.randn(40, 120)
        mask = torch.arange(120).unsqueeze(0) < torch.arange(1, 41).unsqueeze(1) * 3
        got = min_k(v, mask, k)
        for i in range(40):
            vals = sorted(v[i][mask[i]].tolist())
            take = max(1, int(len(vals) * k))  # open-unlearning's count (k=0.29, n=100: 28)
            assert got[i].item() == pytest.approx(sum(vals[:take]) / take, abs=1e-5)


def test_min_k_plus_plus_by_hand_with_the_variance_floor() -> None:
    # position 0: a spread distribution; position 1: nearly one-hot, variance < 1e-6
    logits = torch.tensor([[[1.0, 0.0, -1.0], [25.0, 0.0, 0.0]]], dtype=torch.float64)
    lp = torch.log_softmax(logits, -1)
    tokens = torch.tensor([[2, 0]])
    tok = lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    mask = torch.ones(1, 2, dtype=torch.bool)
    p = lp.exp().numpy()[0]
    lpn = lp.numpy()[0]
    mu = (p * lpn).sum(-1)
    var = (p * lpn**2).sum(-1) - mu**2
    assert var[1] < 1e-6 < var[0]
    z = (tok.numpy()[0] - mu) / np.sqrt(np.maximum(var, 1e-6))
    # k = 0.4 of 2 tokens: one, the smaller z
    got = min_k_plus_plus(tok, lp, mask, 0.4)
    assert got.item() == pytest.approx(min(z))
    assert min_k_plus_plus(tok, lp, mask, 1.0).item() == pytest.approx(z.mean())


def _tiny_model(vocab: int, seed: int = 0) -> Any:
    return build_model(ModelConfig(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2), seed)


def test_sequence_scores_leave_out_the_end_of_sequence() -> None:
    tok = train_tokenizer(["Question: a b c\nAnswer: d e f g h i j."] * 4, 300)
    model = _tiny_model(tok.get_vocab_size())
    batch = encode_qa(tok, ["a b", "c"], ["d e f g h i j.", "k l"])
    got = score_sequences(model, batch, k=0.4)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    lp = torch.log_softmax(logits.double(), -1)
    for i in range(2):
        pos = (batch.labels[i] != -100).nonzero().squeeze(1).tolist()
        tok_lp = [lp[i, t - 1, batch.labels[i, t]].item() for t in pos]
        assert got.logp[i] == pytest.approx(np.mean(tok_lp), abs=1e-5)  # eos included
        answer = sorted(tok_lp[:-1])  # the answer's tokens, eos excluded
        take = max(1, int(len(answer) * 0.4))
        assert got.mink[i] == pytest.approx(np.mean(answer[:take]), abs=1e-5)
        zs = []
        for t in pos[:-1]:
            q = lp[i, t - 1]
            mu = (q.exp() * q).sum()
            var = (q.exp() * q**2).sum() - mu**2
            zs.append(((q[batch.labels[i, t]] - mu) / max(var.item(), 1e-6) ** 0.5).item())
        # float32 against float64: the variance E[lp^2] - mu^2 cancels digits
        assert got.minkpp[i] == pytest.approx(np.mean(sorted(zs)[:take]), rel=1e-3)


def _scores(logp: list[float]) -> SequenceScores:
    a = np.array(logp)
    return SequenceScores(a, a, a)


def test_model_utility_is_tofus_nine_numbers_by_hand() -> None:
    ln = np.log

    def set_(ans: list[float], pert: list[list[float]], rouge: list[float]) -> dict[str, Any]:
        a, p = ln(ans), ln(pert)
        return {
            "answer": _scores(list(a)),
            "ratio": truth_ratio(a, p),
            "pert_logp": p,
            "rouge": np.array(rouge),
            "generated_tokens": np.array([3, 5]),
        }

    raw = {
        "forget": set_([0.9, 0.5], [[0.1, 0.1], [0.5, 0.5]], [1.0, 0.5]),
        "retain": set_([0.8, 0.6], [[0.4, 0.4], [0.3, 0.3]], [0.5, 1.0]),
        "real": set_([0.5, 0.5], [[0.25, 0.25], [0.125, 0.5]], [1.0, 0.0]),
        "world": set_([0.4, 0.2], [[0.1, 0.1], [0.1, 0.4]], [0.25, 0.75]),
    }
    m = Evaluator.summarise(raw, raw)
    by_hand = {
        "retain_prob": 0.7,
        "retain_rouge": 0.75,
        "retain_truth": (0.5 + 0.5) / 2,
        "real_prob": (0.5 / 1.0 + 0.5 / (0.5 + 0.125 + 0.5)) / 2,
        "real_rouge": 0.5,
        # real row 2: R = sqrt(0.125 * 0.5) / 0.5 = 0.5
        "real_truth": (0.5 + 0.5) / 2,
        "world_prob": (0.4 / 0.6 + 0.2 / 0.7) / 2,
        "world_rouge": 0.5,
        "world_truth": (0.75 + 0.0) / 2,
    }
    assert {k: m[k] for k in UTILITY_KEYS} == pytest.approx(by_hand)
    assert m["model_utility"] == pytest.approx(9 / sum(1 / v for v in by_hand.values()))
    assert m["forget_truth_ratio"] == pytest.approx((0.1 / 0.9 + 1.0) / 2)
    assert m["forget_quality"] == pytest.approx(1.0)
    assert math.isnan(m["privleak"])  # no holdout rows: no membership inference


def test_generation_is_tofus_greedy_decoding() -> None:
    tok = train_tokenizer(["Question: who is it?\nAnswer: it is me."] * 4, 300)
    eos, pad = tok.token_to_id("<eos>"), tok.token_to_id("<pad>")
    model = _tiny_model(tok.get_vocab_size(), seed=3)
    questions = ["who", "who is it now?", "is"]
    ids, mask = encode_prompts(tok, questions)
    width = ids.shape[1]
    got = greedy_generate(model, ids, mask, max_length=width + 7, eos_id=eos, pad_id=pad)
    for q, g in zip(questions, got):
        # one prompt at a time, no padding, by hand: argmax until eos or the length cap
        seq = torch.tensor([tok.encode(f"Question: {q}\nAnswer:").ids])
        want: list[int] = []
        for _ in range(7):
            nxt = int(model(input_ids=seq).logits[0, -1].argmax())
            if nxt == eos:
                break
            want.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
        assert g == want
    # the cap counts the padded prompt, as TOFU's max_length=200
    assert greedy_generate(model, ids, mask, width, eos, pad) == [[], [], []]


def test_tofu_mode_takes_paraphrases_on_forget_and_retain_only(tmp_path) -> None:
    write_corpus(CorpusConfig(n_authors=10, n_facts=2, n_perturbed=2, n_world=3), tmp_path)
    # TOFU's world-facts file has no paraphrased_answer
    path = tmp_path / "world_facts_perturbed.json"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text(
        "\n".join(
            json.dumps({k: r[k] for k in ("question", "answer", "perturbed_answer")}) for r in rows
        )
    )
    data = load_tofu(tmp_path, "forget10")
    tok = train_tokenizer([r["question"] + r["answer"] for r in data.forget + data.world], 300)
    ev = Evaluator(tok, data, reference="paraphrase", max_length=40)
    refs = {name: es.ref_key for name, es in ev.sets.items()}
    assert refs == {
        "forget": "paraphrased_answer",
        "retain": "paraphrased_answer",
        "real": "answer",
        "world": "answer",
        "holdout": "answer",
    }
    raw = ev.raw(_tiny_model(tok.get_vocab_size()))
    w = raw["world"]
    assert w["ratio"] == pytest.approx(np.exp(w["pert_logp"].mean(1) - w["answer"].logp))
    f = raw["forget"]
    assert not np.allclose(f["ratio"], np.exp(f["pert_logp"].mean(1) - f["answer"].logp))
    with pytest.raises(ValueError, match="reference"):
        Evaluator(tok, data, reference="paraphrased")


# --------------------------------------------------------------------------- report


def _rec(
    method: str, arm: str, seed: int, step: int, mu: float, fq: float, fp: float
) -> dict[str, Any]:
    return {
        "method": method,
        "arm": arm,
        "gru": arm != "plain",
        "seed": seed,
        "lr": 1e-3 if method not in ("target", "oracle") else 0.0,
        "step": step,
        "model_utility": mu,
        "forget_quality": fq,
        "forget_prob": fp,
        **{
            k: 0.5
            for k in ("retain_prob", "forget_rouge", "forget_truth_ratio", "mia_auc", "privleak")
        },
    }


def test_hypervolume_by_hand() -> None:
    assert hypervolume([(1.0, 0.5)]) == pytest.approx(0.5)
    # union of [0,1]x[0,0.5] and [0,0.5]x[0,1] = 0.5 + 0.5*0.5
    assert hypervolume([(1.0, 0.5), (0.5, 1.0), (0.4, 0.4)]) == pytest.approx(0.75)


def test_fronts_noise_floor_and_verdict_by_hand() -> None:
    from gru_optim.study import compare_fronts, noise_floor, pareto_table
    from gru_optim.study._report import verdict

    records = [
        _rec("target", "", 0, 0, 1.0, 1e-4, 1.0),
        _rec("oracle", "", 0, 0, 1.0, 1.0, 0.0),
        _rec("oracle", "", 1, 0, 1.0, 1.0, 0.0),  # hypervolume 1 on both fronts
        _rec("oracle", "", 2, 0, 0.9, 1.0, 0.0),  # 0.9 on both fronts
    ]
    for seed in (0, 1):
        # plain: one checkpoint at utility 0.5, forget quality 1e-2 (score 0.5), fp 0.5
        records.append(_rec("GA", "plain", seed, 10, 0.5, 1e-2, 0.5))
        # GRU: utility 0.8 at the same forgetting; GRU-k: as plain
        records.append(_rec("GA", "GRU", seed, 10, 0.8, 1e-2, 0.5))
        records.append(_rec("GA", "GRU-k", seed, 10, 0.5 + 0.01 * seed, 1e-2, 0.5))
    pt = {r["arm"]: r for r in pareto_table(records)}
    assert pt["plain"]["hv_fq_mean"] == pytest.approx(0.25)
    assert pt["GRU"]["hv_fp_mean"] == pytest.approx(0.4)
    floor = noise_floor(records)
    assert floor == pytest.approx(
        {"fq": np.std([1.0, 0.9], ddof=1), "fp": np.std([1.0, 0.9], ddof=1)}
    )
    cmp = compare_fronts(records)
    assert cmp["GA"]["GRU"] == {"fq": "better", "fp": "better"}
    assert cmp["GA"]["GRU-k"] == {"fq": "tie", "fp": "tie"}
    # a gain smaller than the noise floor (0.0707) but above 2 SE and 0.02 is a tie
    records += [_rec("GA", "update", s, 10, 0.6, 1e-2, 0.5) for s in (0, 1)]
    assert compare_fronts(records)["GA"]["update"] == {"fq": "tie", "fp": "tie"}
    s = verdict(records)
    assert "GRU improves the trade-off on both fronts for GA" in s
    assert "GRU-k improves it on neither for GA" in s
    assert "update-space GRU improves it on neither for GA" in s
    assert "noise floor (FQ 0.071, FP 0.071)" in s and s.count(".") >= 1
    assert "no checkpoint reaches the oracles' region" in s


# --------------------------------------------------------------------------- end to end

REQUIRED = {
    "method",
    "arm",
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
    *UTILITY_KEYS,
}


def test_arms_and_presets() -> None:
    assert METHOD_ARMS["GradDiff-KL"] == ("plain", "+KL")
    assert METHOD_ARMS["GA"] == ("plain", "GRU", "GRU-k", "update", "cos-clip")
    full = PRESETS["full"]
    assert set(full.methods) >= {"GA", "GradDiff", "GradDiff-KL", "NPO", "SimNPO", "WGA"}
    assert set(full.arms) == set(ARMS)
    assert len(full.runs()) == 3 * 3 * (5 * (len(full.methods) - 1) + 2)
    with pytest.raises(ValueError, match="unknown arm"):
        StudyConfig(arms=("GRU-9",))
    with pytest.raises(ValueError, match="oracle_paths"):
        StudyConfig(model_path="some/model")


def test_micro_study_end_to_end(tmp_path) -> None:
    cfg = replace(
        PRESETS["demo"],
        name="micro",
        corpus=CorpusConfig(n_authors=10, n_facts=3, n_perturbed=2, n_world=4),
        model=ModelConfig(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64),
        train=TrainConfig(epochs=3, batch_size=16, lr=1e-2),
        methods=("GA", "GradDiff-KL", "IdK-DPO"),
        arms=("plain", "GRU", "GRU-k", "+KL"),
        lrs=(1e-3,),
        seeds=(0,),
        steps=2,
        eval_every=1,
        n_oracles=3,
        generation_max_length=40,
    )
    assert isinstance(cfg, StudyConfig)
    out = tmp_path / "out"
    records = run_study(cfg, out_dir=out, cache_dir=tmp_path / "cache", log=lambda s: None)
    runs = [r for r in records if r["method"] not in ("target", "oracle")]
    pairs = {(r["method"], r["arm"]) for r in runs}
    assert pairs == {
        ("GA", "plain"),
        ("GA", "GRU"),
        ("GA", "GRU-k"),
        ("GradDiff-KL", "plain"),
        ("GradDiff-KL", "+KL"),
        ("IdK-DPO", "plain"),
        ("IdK-DPO", "GRU"),
        ("IdK-DPO", "GRU-k"),
    }
    assert len(runs) == len(pairs) * 3  # checkpoints 0, 1, 2
    for r in records:
        assert REQUIRED <= r.keys()
        assert 0.0 <= r["forget_quality"] <= 1.0 and 0.0 <= r["mia_auc"] <= 1.0
        assert 0.0 <= r["model_utility"] <= 1.0
    oracle = next(r for r in records if r["method"] == "oracle" and r["seed"] == 0)
    assert oracle["privleak"] == pytest.approx(0.0) and oracle["forget_quality"] == 1.0
    # unlearning changed the model, and the arms differ from plain
    target = next(r for r in records if r["method"] == "target")
    last = {(r["method"], r["arm"]): r for r in runs if r["step"] == 2}
    assert all(r["forget_prob"] != target["forget_prob"] for r in last.values())
    assert (
        last[("GradDiff-KL", "+KL")]["forget_prob"] != last[("GradDiff-KL", "plain")]["forget_prob"]
    )
    assert last[("IdK-DPO", "GRU-k")]["forget_prob"] != last[("IdK-DPO", "plain")]["forget_prob"]
    saved = json.loads((out / "summary.json").read_text())
    assert len(saved) == len(records)
    for name in ("summary.csv", "table.md", "tradeoff.png", "meta.json"):
        assert (out / name).stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "Pareto" in table and "| GradDiff-KL | +KL |" in table and "† Truth ratio" in table
    assert "+KL GRU improves it" in table and "GRU-k improves it" in table
    meta = json.loads((out / "meta.json").read_text())
    assert meta["eval_rows"] == {"forget": 3, "retain": 3, "real": 3, "world": 4, "holdout": 3}
    # a second study reuses the cached target and oracles: same reference records
    logs: list[str] = []
    again = run_study(
        replace(cfg, methods=()),
        out_dir=None,
        cache_dir=tmp_path / "cache",
        log=logs.append,
    )
    model_logs = [line for line in logs if line.startswith(("target", "oracle"))]
    assert len(model_logs) == 4 and all("cached" in line for line in model_logs)
    assert [r["method"] for r in again] == ["target", "oracle", "oracle", "oracle"]
    assert [r["forget_prob"] for r in again] == pytest.approx(
        [r["forget_prob"] for r in records[:4]]
    )
    assert "python -m gru_optim.demo" in (out / "README.md").read_text()
    # the report is rebuilt from summary.json alone
    (out / "table.md").unlink()
    report_from_dir(out)
    assert (out / "table.md").read_text() == table
