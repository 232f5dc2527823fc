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
    at_step,
    build_model,
    comparisons,
    crossing,
    encode_qa,
    forget_quality,
    forget_truth_ratio,
    front_area,
    generate_corpus,
    harmonic_mean,
    holm,
    load_tofu,
    mia_auc,
    min_k,
    min_k_plus_plus,
    noise_floor,
    option_probability,
    paired_test,
    privleak,
    report_from_dir,
    run_study,
    seed_outcomes,
    train_tokenizer,
    truth_ratio,
    truth_score,
    verdict,
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


# --------------------------------------------------------------------------- statistics


def test_front_area_of_interpolated_trajectories_by_hand() -> None:
    assert front_area([0.5], [0.8]) == pytest.approx(0.4)  # one point: its rectangle
    # the segment from (1, 0) to (0, 1) dominates the triangle under it
    assert front_area([1.0, 0.0], [0.0, 1.0]) == pytest.approx(0.5)
    # (1, 0.5) -> (0.5, 1): the rectangle [0, 0.5] x [0, 1] and the trapezoid under the
    # segment, 0.5 + 0.375; the two checkpoints alone would give 0.75
    assert front_area([1.0, 0.5], [0.5, 1.0]) == pytest.approx(0.875)
    # a segment that improves both: only its best end counts
    assert front_area([0.2, 0.8], [0.2, 0.8]) == pytest.approx(0.64)
    # against a fine grid for a random polyline
    rng = np.random.default_rng(0)
    xs, ys = rng.uniform(0, 1, 6), rng.uniform(0, 1, 6)
    t = np.linspace(0, 1, 4001)
    px = np.concatenate([x0 + (x1 - x0) * t for x0, x1 in zip(xs[:-1], xs[1:])])
    py = np.concatenate([y0 + (y1 - y0) * t for y0, y1 in zip(ys[:-1], ys[1:])])
    grid = np.linspace(0, 1, 4001)
    env = [py[px >= g].max() if (px >= g).any() else 0.0 for g in grid]
    assert front_area(xs, ys) == pytest.approx(np.trapezoid(env, grid), abs=2e-3)


def test_crossing_and_interpolation_between_evaluations() -> None:
    steps = [0, 5, 10]
    assert crossing(steps, [1.0, 0.5, 0.0], 0.1) == pytest.approx(9.0)  # 5 + 5 * 0.4 / 0.5
    assert crossing(steps, [1.0, 0.5, 0.3], 0.1) is None
    assert crossing(steps, [0.05, 0.5, 0.3], 0.1) == 0.0
    assert crossing(steps, [-4.0, -2.0, 0.0], -1.0, below=False) == pytest.approx(7.5)
    assert at_step(steps, [0.8, 0.6, 0.2], 7.5) == pytest.approx(0.4)


def test_paired_test_by_hand_and_against_scipy() -> None:
    from scipy import stats

    t = paired_test([1.0, 2.0, 3.0])  # mean 2, sd 1, se 1/sqrt(3), 2 degrees of freedom
    assert (t.n, t.mean) == (3, 2.0)
    half = 4.302652729911275 / math.sqrt(3)
    assert (t.low, t.high) == pytest.approx((2 - half, 2 + half))
    assert t.p == pytest.approx(2 * stats.t.sf(2 * math.sqrt(3), 2))
    a = np.array([0.61, 0.55, 0.70, 0.64, 0.58])
    b = np.array([0.52, 0.56, 0.61, 0.60, 0.50])
    t = paired_test(list(a - b))
    ref = stats.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert t.p == pytest.approx(ref.pvalue) and (t.low, t.high) == pytest.approx((ci.low, ci.high))
    assert paired_test([0.0, 0.0, 0.0]).p == 1.0  # identical arms: nothing to find
    assert paired_test([0.1, 0.1]).p == 0.0 and paired_test([0.1, 0.1]).low == 0.1
    assert math.isnan(paired_test([0.3]).p) and paired_test([]).n == 0


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1 -> 0.04, 0.09, 0.08 -> 0.09 (monotone), 0.5
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    out = holm([0.2, math.nan, 0.01])  # NaN: untested, not counted
    assert math.isnan(out[1]) and out[0] == pytest.approx(0.2) and out[2] == pytest.approx(0.02)
    assert holm([0.6, 0.7]) == [1.0, 1.0]


def _rec(
    method: str, arm: str, seed: int, step: int, lr: float = 0.0, **m: float
) -> dict[str, Any]:
    """A record; ``m``: held-out metrics, ``val=`` shifts the validation ones."""
    shift = m.pop("val", 0.0)
    base = {"model_utility": 1.0, "forget_quality": 1e-4, "forget_prob": 1.0, **m}
    return {
        "method": method, "arm": arm, "gru": arm not in ("plain", ""), "seed": seed,
        "index": m.get("index", 0), "lr": lr, "step": step, **base,
        **{f"val_{k}": v + (shift if k == "model_utility" else 0.0) for k, v in base.items()},
        **{k: 0.5 for k in ("retain_prob", "forget_rouge", "forget_truth_ratio", "mia_auc")},
        "privleak": 0.5,
    }  # fmt: skip


def _toy_study() -> list[dict[str, Any]]:
    """4 seeds; per seed a target (utility 1, forget probability 1), two oracles 0.02
    apart in utility; GA plain, GRU (+0.2 at matched forgetting, every seed),
    cos-clip (the very numbers of GRU) and update (+0.01: below the noise floor) at two
    learning rates; the validation halves prefer lr 1e-3, the held-out ones 2e-3."""
    recs = []
    for s in range(4):
        recs.append(_rec("target", "", s, 0))
        recs.append({**_rec("oracle", "", s, 0, model_utility=1.0, forget_prob=0.01,
                            forget_quality=1.0), "index": 0})  # fmt: skip
        recs.append({**_rec("oracle", "", s, 0, model_utility=0.98, forget_prob=0.01,
                            forget_quality=0.5), "index": 1})  # fmt: skip
        for arm, gain in (("plain", 0.0), ("GRU", 0.2), ("cos-clip", 0.2), ("update", 0.01)):
            for lr, val in ((1e-3, 0.1), (2e-3, -0.1)):
                g = gain + 0.001 * s if arm == "GRU" or arm == "cos-clip" else gain
                for step, fp, mu in ((0, 1.0, 1.0), (5, 0.5, 0.6 + g), (10, 0.0, 0.2 + g)):
                    mu_t = mu + (0.05 if lr == 2e-3 and step else 0.0)
                    recs.append(_rec("GA", arm, s, step, lr, model_utility=mu_t, forget_prob=fp,
                                     forget_quality=1e-4 if step < 10 else 0.2,
                                     val=val if step else 0.0))  # fmt: skip
    return recs


def test_selection_on_validation_and_matched_forgetting() -> None:
    out = seed_outcomes(_toy_study())
    o = out[("GA", "plain", 0)]["mu_fp10"]
    # validation prefers lr 1e-3; its validation forget probability reaches 0.1 at step 9,
    # where the held-out utility interpolates 0.6 -> 0.2 to 0.28 (not lr 2e-3's 0.33)
    assert (o.lr, o.step) == (1e-3, pytest.approx(9.0))
    assert o.value == pytest.approx(0.28)
    assert out[("GA", "GRU", 2)]["mu_fp10"].value == pytest.approx(0.28 + 0.202)
    # forget quality reaches 0.05 between steps 5 (1e-4) and 10 (0.2), in log10
    fq = out[("GA", "plain", 0)]["mu_fq"]
    frac = (math.log10(0.05) + 4) / (math.log10(0.2) + 4)
    assert fq.step == pytest.approx(5 + 5 * frac)


def test_comparisons_noise_floor_and_verdict_by_hand() -> None:
    recs = _toy_study()
    floor = noise_floor(recs)
    assert floor is not None and floor["mu_fp10"] == pytest.approx(0.02)
    cmps = {(c.arm, c.stat): c for c in comparisons(recs)}
    assert ("cos-clip", "mu_fp10") not in cmps  # the same numbers as GRU: one arm
    g = cmps[("GRU", "mu_fp10")]
    assert g.diffs == pytest.approx({s: 0.2 + 0.001 * s for s in range(4)})
    assert g.test.n == 4 and g.call == "better" and g.p_holm < 0.05
    ref = paired_test([0.2 + 0.001 * s for s in range(4)])
    tested = [c for c in cmps.values() if not math.isnan(c.p_holm)]
    assert g.p_holm == pytest.approx(min(1.0, holm([c.test.p for c in tested])[tested.index(g)]))
    assert g.test.p == pytest.approx(ref.p)
    u = cmps[("update", "mu_fp10")]
    assert u.test.p == 0.0 and u.test.mean == pytest.approx(0.01)
    assert u.call == "not shown"  # significant, but inside the 0.02 noise floor
    text = verdict(recs)
    assert "GRU raises GA's model utility at forget probability <= 0.1 by 0.201 (95% CI" in text
    assert "and front area (forget quality) by 0.166" in text
    assert "cos-clip GRU produced the same numbers as GRU in every run of GA" in text
    assert "0.020 in model utility" in text and "held-out halves" in text
    assert "update-space GRU raises" not in text
    assert text.count("cos-clip") == 1


def test_headline_counts_what_survives_and_names_the_arms() -> None:
    from gru_optim.study import headline

    recs = _toy_study()
    cmps = comparisons(recs)
    tested = [c for c in cmps if not math.isnan(c.p_holm)]
    better = [c for c in tested if c.call == "better"]
    assert better and all(c.arm == "GRU" for c in better)
    text = headline(recs)
    assert text.startswith(f"Over 4 seeds, {len(better)} of {len(tested)} paired comparisons")
    assert f"Better: GRU on GA ({len(better)} statistic" in text and "none shows it worse" in text
    assert "update-space" not in text  # inside the noise floor: not claimed
    assert f"The other {len(tested) - len(better)} differences are not shown" in text
    # the same records with GRU's gain turned into a loss: the count moves to "worse"
    flipped = [
        {**r, "model_utility": r["model_utility"] - 2 * (0.2 + 0.001 * r["seed"])}
        if r["method"] == "GA" and r["arm"] in ("GRU", "cos-clip") and r["step"]
        else r
        for r in recs
    ]
    worse = [c for c in comparisons(flipped) if c.call == "worse"]
    assert worse and all(c.arm == "GRU" for c in worse)
    text = headline(flipped)
    assert f"0 of {len(tested)} paired comparisons" in text
    assert f"and {len(worse)} show{'s' if len(worse) == 1 else ''} it worse." in text
    assert "Worse: GRU on GA" in text and "Better:" not in text


def test_slower_pairs_count_rectified_runs_that_forget_less_at_equal_step() -> None:
    from gru_optim.study._outcomes import slower_pairs

    recs = _toy_study()
    # GRU, cos-clip and update against plain, 2 learning rates x 4 seeds; every arm ends
    # at forget probability 0, as plain does: none is slower
    assert slower_pairs(recs) == (0, 24)
    slowed = [
        {**r, "forget_prob": 0.3} if r["arm"] == "GRU" and r["step"] == 10 and r["seed"] < 3 else r
        for r in recs
    ]
    assert slower_pairs(slowed) == (6, 24)
    assert "higher forget probability than plain in 6 of 24 pairs" in verdict(slowed)


def test_rederive_brief_prints_one_sentence_per_study(tmp_path, capsys) -> None:
    from gru_optim.study import headline
    from gru_optim.study.rederive import main

    d = tmp_path / "study_x"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps(_toy_study()))
    (d / "meta.json").write_text(json.dumps({"preset": "x"}))
    assert main([str(d / "summary.json"), "--brief"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == "The `x` preset: " + headline(_toy_study())
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.json")])


def test_readme_results_paragraph_is_generated_from_the_published_records() -> None:
    """The README's results paragraphs are :func:`verdict` of the published per-run
    records of both presets (regenerate them with ``python -m gru_optim.study.rederive``),
    and ``make demo`` prints their headlines."""
    from pathlib import Path

    from gru_optim.study.rederive import label_of, paragraph

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = readme.split("<!-- study-results: generated, do not edit by hand -->")[1]
    block = block.split("<!-- /study-results -->")[0].strip()
    texts = []
    for preset in ("full", "large"):
        source = f"docs/results/study_{preset}/summary.json"
        records = json.loads((root / source).read_text())
        text = paragraph(records, source, label_of(root / source))
        assert text.startswith(f"**The `{preset}` preset.** Over 5 seeds")
        assert "validation halves" in text and "Holm" in text
        texts.append(text)
    assert block == "\n\n".join(texts)
    make = (root / "Makefile").read_text()
    assert "gru_optim.study.rederive --brief $(STUDIES)" in make
    assert "docs/results/study_full/summary.json docs/results/study_large/summary.json" in make


def test_study_guide_facts_are_those_of_the_published_records() -> None:
    """The descriptive facts the study guide quotes are read off the published records."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    guide = " ".join((root / "docs/guides/study.md").read_text().split())
    targets, lines = [], []
    for preset in ("full", "large"):
        recs = json.loads((root / f"docs/results/study_{preset}/summary.json").read_text())
        tg = [r for r in recs if r["method"] == "target"]
        orc = [r for r in recs if r["method"] == "oracle"]
        assert len(tg) == 5 and len(orc) == 10
        targets += tg

        def span(rs: list, key: str) -> str:
            return f"{min(r[key] for r in rs):.3f}-{max(r[key] for r in rs):.3f}"

        mu = f"{span(tg, 'model_utility')} against {span(orc, 'model_utility')}"
        lines.append(f"`{preset}`: {mu}")
    assert f"was {min(r['forget_prob'] for r in targets):.3f}-" in guide
    assert f"-{max(r['forget_prob'] for r in targets):.3f}, forget quality" in guide
    fq = max(r["forget_quality"] for r in targets)
    assert f"at most {fq / 10 ** math.floor(math.log10(fq)):.1f} × 10⁻" in guide
    assert all(round(r["privleak"]) == -100 for r in targets)
    for line in lines:
        assert line in guide, line
    favour = []
    for preset in ("large", "full"):
        recs = json.loads((root / f"docs/results/study_{preset}/summary.json").read_text())
        clean = [{k: (math.nan if v is None else v) for k, v in r.items()} for r in recs]
        tested = [c for c in comparisons(clean) if not math.isnan(c.p_holm)]
        favour.append((sum(c.test.mean > 0 for c in tested), len(tested)))
    (big, n_big), (small, n_small) = favour
    assert big == n_big == 30 and f"all {n_big} mean differences favour" in guide
    assert f"against {small} of {n_small} in `full`" in guide


def test_rederive_writes_the_readme_block_and_refuses_a_page_without_one(tmp_path) -> None:
    from gru_optim.study.rederive import END, START, write_readme

    page = tmp_path / "README.md"
    page.write_text(f"# t\n\n{START}\nold words\n{END}\n\nafter\n")
    write_readme(page, "new words")
    assert page.read_text() == f"# t\n\n{START}\nnew words\n{END}\n\nafter\n"
    bare = tmp_path / "bare.md"
    bare.write_text("# no block\n")
    with pytest.raises(ValueError, match="no <!-- study-results"):
        write_readme(bare, "x")
    assert bare.read_text() == "# no block\n"


# --------------------------------------------------------------------------- end to end

REQUIRED = {
    "method", "arm", "gru", "seed", "lr", "step", "forget_quality", "model_utility",
    "forget_prob", "retain_prob", "mia_auc", "privleak", "ks_stat", "ks_n", "ks_n_oracle",
    "mia_auc_loss", "mia_auc_minkpp", "forget_rouge", "forget_truth_ratio",
    "val_model_utility", "val_forget_prob", "val_forget_quality", *UTILITY_KEYS,
}  # fmt: skip


def test_halves_are_disjoint_and_cut_every_per_row_result() -> None:
    from gru_optim.study._halves import halves, take

    parts = halves({"forget": 7, "holdout": 1}, seed=3)
    f = parts["forget"]
    assert len(f["val"]) == 3 and len(f["test"]) == 4
    assert sorted([*f["val"], *f["test"]]) == list(range(7))
    assert (
        len(parts["holdout"]["val"]) == 0
        and halves({"forget": 7}, 3)["forget"]["val"].tolist() == f["val"].tolist()
    )
    raw = {
        "forget": {
            "answer": SequenceScores(np.arange(7.0), np.arange(7.0), np.arange(7.0)),
            "rouge": np.arange(7.0) / 10,
            "generated": [str(i) for i in range(7)],
        },
        "holdout": {"answer": SequenceScores(np.zeros(1), np.zeros(1), np.zeros(1))},
    }
    val = take(raw, parts, "val")
    assert "holdout" not in val  # an empty half: left out
    assert val["forget"]["answer"].logp.tolist() == f["val"].tolist()
    assert val["forget"]["generated"] == [str(i) for i in f["val"]]


def test_split_seed_redraws_the_forget_authors_only() -> None:
    base = CorpusConfig(n_authors=20, n_facts=2)
    a, b = generate_corpus(base), generate_corpus(replace(base, split_seed=1))
    assert {r["author"] for r in a["forget10"]} != {r["author"] for r in b["forget10"]}
    assert sorted(r["question"] for r in a["full"] + a["holdout10"]) == sorted(
        r["question"] for r in b["full"] + b["holdout10"]
    )
    assert a["world_facts"] == b["world_facts"] and a["real_authors"] == b["real_authors"]


def test_arms_and_presets() -> None:
    assert METHOD_ARMS["GradDiff-KL"] == ("plain", "+KL")
    assert METHOD_ARMS["NPO+GD"] == ("plain", "GRU", "GRU-k", "update", "cos-clip")
    full = PRESETS["full"]
    assert set(full.methods) >= {"GA", "GradDiff", "GradDiff-KL", "NPO", "NPO+GD", "SimNPO"}
    assert set(full.arms) == set(ARMS) and full.resplit and full.n_oracles == 2
    assert (len(full.seeds), full.eval_every) == (5, 5)
    assert len(full.runs()) == 3 * 5 * (5 * (len(full.methods) - 1) + 2)
    large = PRESETS["large"]
    n_params = sum(p.numel() for p in build_model(large.model, 0).parameters())
    assert n_params >= 1_000_000 and set(large.methods) == {"GA", "NPO", "NPO+GD"}
    assert (len(large.seeds), large.eval_every, len(large.lrs)) == (5, 5, 2)
    demo = PRESETS["demo"]
    assert len(demo.seeds) >= 3 and demo.eval_every == 5
    # forget quality is a KS test on the held-out half of the forget set: 15 rows, not 3
    assert demo.corpus.split_sizes()["forget10"] * demo.corpus.n_facts // 2 >= 15
    with pytest.raises(ValueError, match="unknown arm"):
        StudyConfig(arms=("GRU-9",))
    with pytest.raises(ValueError, match="oracle_paths"):
        StudyConfig(model_path="some/model")


def _micro(**kw: Any) -> StudyConfig:
    return replace(
        PRESETS["demo"],
        name="micro",
        corpus=CorpusConfig(n_authors=10, n_facts=4, n_perturbed=2, n_world=4),
        model=ModelConfig(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=128),
        train=TrainConfig(epochs=3, batch_size=16, lr=1e-2),
        methods=("GA", "GradDiff-KL", "IdK-DPO", "NPO+GD"),
        arms=("plain", "GRU", "+KL"),
        lrs=(1e-3,),
        seeds=(0, 1),
        steps=2,
        eval_every=1,
        n_oracles=2,
        resplit=True,
        generation_max_length=40,
        **kw,
    )


def test_micro_study_end_to_end_and_resumable(tmp_path) -> None:
    cfg = _micro()
    out = tmp_path / "out"
    records = run_study(cfg, out_dir=out, cache_dir=tmp_path / "cache", log=lambda s: None)
    runs = [r for r in records if r["method"] not in ("target", "oracle")]
    pairs = {(r["method"], r["arm"]) for r in runs}
    assert pairs == {
        ("GA", "plain"), ("GA", "GRU"), ("GradDiff-KL", "plain"), ("GradDiff-KL", "+KL"),
        ("IdK-DPO", "plain"), ("IdK-DPO", "GRU"), ("NPO+GD", "plain"), ("NPO+GD", "GRU"),
    }  # fmt: skip
    assert len(runs) == len(pairs) * 2 * 3  # 2 seeds, evaluations at steps 0, 1, 2
    for r in records:
        assert REQUIRED <= r.keys()
        assert 0.0 <= r["forget_quality"] <= 1.0 and 0.0 <= r["model_utility"] <= 1.0
    # each seed has its own target (another initialisation, another split) and oracles
    targets = {r["seed"]: r for r in records if r["method"] == "target"}
    assert set(targets) == {0, 1} and targets[0]["forget_prob"] != targets[1]["forget_prob"]
    ref = [r for r in records if r["method"] == "oracle" and r["index"] == 0]
    assert len(ref) == 2 and all(r["forget_quality"] == 1.0 for r in ref)
    last = {(r["method"], r["arm"], r["seed"]): r for r in runs if r["step"] == 2}
    assert all(r["forget_prob"] != targets[r["seed"]]["forget_prob"] for r in last.values())
    assert last[("NPO+GD", "GRU", 0)]["forget_prob"] != last[("NPO+GD", "plain", 0)]["forget_prob"]
    for name in ("summary.csv", "table.md", "tradeoff.png", "meta.json", "README.md"):
        assert (out / name).stat().st_size > 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["selected_on_validation"] and stats["noise_floor"] is not None
    first = stats["comparisons"][0]
    assert set(first["diffs"]) <= {"0", "1"} and first["call"] in ("better", "worse", "not shown")
    table = (out / "table.md").read_text()
    assert "Holm" in table and "| GradDiff-KL | +KL |" in table and "Over 2 seeds" in table
    meta = json.loads((out / "meta.json").read_text())
    assert meta["eval_rows"]["forget"] == {"val": 2, "test": 2}
    assert len(list((out / "runs").glob("*.json"))) == 2 + len(pairs) * 2
    # resumed: every run is on disk, nothing runs again, the same records come back
    logs: list[str] = []
    again = run_study(cfg, out_dir=out, cache_dir=tmp_path / "cache", log=logs.append)
    assert logs == [f"seed {s}: every run already in {out / 'runs'}" for s in (0, 1)]
    assert [r["forget_prob"] for r in again] == pytest.approx(
        [r["forget_prob"] for r in json.loads((out / "summary.json").read_text())]
    )
    # a missing run is run alone; another configuration is refused before any work
    victim = out / "runs" / "GA__GRU__lr0.001__seed1.json"
    victim.unlink()
    logs.clear()
    run_study(cfg, out_dir=out, cache_dir=tmp_path / "cache", log=logs.append)
    assert logs[0] == "seed 0: every run already in " + str(out / "runs") and victim.exists()
    with pytest.raises(ValueError, match="another study configuration"):
        run_study(replace(cfg, steps=3), out_dir=out, cache_dir=tmp_path / "cache")
    # the report is rebuilt from summary.json alone
    (out / "table.md").unlink()
    report_from_dir(out)
    assert (out / "table.md").read_text() == table
