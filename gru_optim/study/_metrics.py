"""TOFU and MUSE metrics: pure functions of per-sequence scores, and a batched evaluator.

Each function's docstring names the definition it follows (TOFU: ``locuslab/tofu``,
``aggregate_eval_stat.py`` and ``evaluate_util.py``; open-unlearning:
``locuslab/open-unlearning``, ``src/evals/metrics/``; MUSE: ``jaechan-repo/muse_bench``,
``privleak/``). With ``P̄(a|q) = P(a|q)^(1/|a|)`` the length-normalised probability of an
answer (its ``|a|`` tokens include the end of sequence, as TOFU's and open-unlearning's
labels do):

- **probability** of the forget and retain sets: mean ``P̄(a|q)``; of the real-authors
  and world-facts sets: ``P̄(a) / (P̄(a) + sum_k P̄(perturbed_k))``, normalised over the
  options (TOFU's *Prob.*).
- **ROUGE-L recall** of the greedy answer against the answer (``rouge-score``).
- **truth ratio** ``R = exp(mean_k log P̄(perturbed_k) - log P̄(reference))``; on the
  forget set ``mean(min(R, 1/R))``, elsewhere the truth score ``mean(max(0, 1 - R))``.
  TOFU's reference is the paraphrased answer on the forget and retain sets and the answer
  itself on the real-authors and world-facts sets (``reference="paraphrase"``, TOFU's
  mode). A tiny model trained from scratch never generalises to a wording it has not
  seen, so the study's default (``reference="answer"``) uses the trained answer on every
  set: a deliberate difference, reported next to the numbers.
- **forget quality**: the p-value of the two-sample Kolmogorov-Smirnov test between the
  forget-set truth ratios of the model and of the retained (oracle) model.
- **model utility**: harmonic mean of the nine numbers probability, ROUGE-L and truth
  score on the retain, real-authors and world-facts sets (``0`` if any is ``0``).
- **membership inference** (forget rows members, holdout rows non-members): AUC of LOSS,
  Min-K% (k = 0.4) and Min-K%++ (k = 0.4), open-unlearning's convention (1: the forget
  rows look far more likely than the holdout rows); ``mia_auc`` is Min-K%.
- **privleak**: MUSE's, on the Min-K% AUC, in MUSE's convention (the AUC with the forget
  set labelled 0, one minus the above): ``0`` is the retrained model's privacy, ``-100``
  a model that tells every forget row from every holdout row, positive values
  over-unlearn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GENERATION_MAX_LENGTH",
    "MINK_K",
    "MINKPP_VAR_FLOOR",
    "UTILITY_KEYS",
    "Evaluator",
    "SequenceScores",
    "forget_quality",
    "forget_truth_ratio",
    "harmonic_mean",
    "mia_auc",
    "min_k",
    "min_k_plus_plus",
    "option_probability",
    "privleak",
    "truth_ratio",
    "truth_score",
]

MINK_K = 0.4
"""The ``k`` of Min-K% and Min-K%++ (open-unlearning's TOFU configuration
``configs/eval/tofu_metrics/mia_min_k.yaml``; MUSE's Min-40%)."""

MINKPP_VAR_FLOOR = 1e-6
"""Floor of the variance in Min-K%++ (open-unlearning
``src/evals/metrics/mia/min_k_plus_plus.py``, ``compute_score``)."""

GENERATION_MAX_LENGTH = 200
"""TOFU's generation length: greedy decoding stops at the end-of-sequence token or when
the (left-padded) prompt plus the generated tokens reach 200 tokens
(``config/eval_everything.yaml``, ``generation.max_length``)."""

UTILITY_KEYS = (
    "retain_prob",
    "retain_rouge",
    "retain_truth",
    "real_prob",
    "real_rouge",
    "real_truth",
    "world_prob",
    "world_rouge",
    "world_truth",
)
"""The nine numbers of TOFU's model utility (``aggregate_eval_stat.py``,
``get_model_utility``: Prob., ROUGE and Truth Ratio of Retain, Real Authors, Real World)."""


# --------------------------------------------------------------------------- pure metrics
def truth_ratio(ref_logp: np.ndarray, pert_logp: np.ndarray) -> np.ndarray:
    """Per-row truth ratio ``R = exp(mean_k pert_logp[:, k] - ref_logp)`` from
    length-normalised log-probabilities (``ref_logp``: ``(N,)``, ``pert_logp``:
    ``(N, K)``): the geometric mean of the perturbed answers' ``P̄`` over the reference's.

    TOFU ``evaluate_util.py``, ``eval_perturbation_ratio`` (``truth_ratio =
    exp(gt_loss_per_token - perturb_loss_per_token.mean(-1))``); open-unlearning
    ``memorization.py``, ``truth_ratio`` (``wrong_prob / correct_prob`` of the mean
    losses).
    """
    ref = np.asarray(ref_logp, dtype=np.float64)
    pert = np.asarray(pert_logp, dtype=np.float64)
    if pert.ndim != 2 or pert.shape[0] != ref.shape[0]:
        raise ValueError("pert_logp must be (N, K) with N = len(ref_logp)")
    ratio: np.ndarray = np.exp(pert.mean(axis=1) - ref)
    return ratio


def forget_truth_ratio(ratios: np.ndarray) -> float:
    """``mean(min(R, 1/R))``, the forget set's truth ratio (1: true and false answers
    equally likely). TOFU ``aggregate_eval_stat.py``, ``get_model_utility`` (the
    ``forget`` branch, on ``1/R``, which gives the same number); open-unlearning
    ``truth_ratio`` with ``aggregator: closer_to_1_better``."""
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.minimum(r, 1.0 / r)))


def truth_score(ratios: np.ndarray) -> float:
    """``mean(max(0, 1 - R))``: the truth score of the retain, real-authors and
    world-facts sets (higher: the model prefers the true answers). TOFU
    ``aggregate_eval_stat.py``, ``get_model_utility`` (``max(0, 1 - 1/curr_stat_1)`` with
    ``curr_stat_1 = 1/R``); open-unlearning ``truth_ratio`` with ``aggregator:
    true_better``."""
    return float(np.mean(np.maximum(0.0, 1.0 - np.asarray(ratios, dtype=np.float64))))


def option_probability(answer_logp: np.ndarray, pert_logp: np.ndarray) -> float:
    """Mean over rows of ``P̄(a) / (P̄(a) + sum_k P̄(perturbed_k))`` from length-normalised
    log-probabilities (``(N,)`` and ``(N, K)``): the probability of the real-authors and
    world-facts sets. TOFU ``aggregate_eval_stat.py``, ``get_model_utility`` (files other
    than ``eval_log*``); open-unlearning ``memorization.py``, ``probability_w_options``."""
    true = np.exp(np.asarray(answer_logp, dtype=np.float64))
    wrong = np.exp(np.asarray(pert_logp, dtype=np.float64)).sum(axis=1)
    return float(np.mean(true / (true + wrong)))


def forget_quality(unlearned: Sequence[float], oracle: Sequence[float]) -> dict[str, float]:
    """KS two-sample test between truth-ratio samples: ``{"p": p-value, "stat": D,
    "n": len(unlearned), "n_oracle": len(oracle)}``. A high p-value means the unlearned
    model's truth ratios are indistinguishable from the oracle's.

    TOFU ``aggregate_eval_stat.py``, ``get_forget_quality`` (``ks_2samp`` of ``1/R``: the
    test is the same for ``R``, ``1/x`` being strictly monotone); open-unlearning
    ``privacy.py``, ``ks_test``."""
    from scipy.stats import ks_2samp

    res = ks_2samp(np.asarray(unlearned, float), np.asarray(oracle, float))
    return {
        "p": float(res.pvalue),
        "stat": float(res.statistic),
        "n": len(unlearned),
        "n_oracle": len(oracle),
    }


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean, ``0`` when any value is ``<= 0`` (TOFU's and open-unlearning's
    ``scipy.stats.hmean``: ``aggregate_eval_stat.py``; ``utility.py``,
    ``hm_aggregate``)."""
    vals = [float(v) for v in values]
    if not vals or min(vals) <= 0:
        return 0.0
    from scipy.stats import hmean

    return float(hmean(vals))


def mia_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of a membership score (higher: more likely a member) separating members
    from non-members; ``0.5`` is chance, ``1`` every member scores above every
    non-member.

    open-unlearning ``src/evals/metrics/mia/utils.py``, ``mia_auc``: its scores are
    higher for non-members (a loss) and it labels the forget rows 0, the holdout rows 1;
    with the score's sign and the labels both flipped, this is the same number ("auc is
    1 when the forget data is much more likely than the holdout data")."""
    from sklearn.metrics import roc_auc_score

    m = np.asarray(member_scores, float)
    n = np.asarray(nonmember_scores, float)
    labels = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    return float(roc_auc_score(labels, np.concatenate([m, n])))


def privleak(auc: float, auc_oracle: float) -> float:
    """MUSE's privacy leakage from AUCs in :func:`mia_auc`'s convention.

    MUSE computes the AUC with the forget rows labelled 0 and the holdout rows 1 (so its
    AUC is ``1 - auc``) and normalises by the retrained model's value of that:
    ``100 * ((1 - auc) - (1 - auc_oracle)) / (1 - auc_oracle)``. ``0`` is the retrained
    model; a model that ranks every forget row above every holdout row (``auc = 1``)
    scores ``-100``; positive values over-unlearn (the forget rows look less likely than
    unseen ones). MUSE ``privleak/scripts/get_ppl.py`` (``main``: ``forget_holdout``
    labels, ``sweep``: ROC of ``-score``) and the MUSE paper's PrivLeak; open-unlearning
    ``src/evals/metrics/privacy.py``, ``privleak`` (``score = 1 - score``, ``ref = 1 -
    ref``, whose ``1e-10`` in the denominator is kept here too)."""
    ours, ref = 1.0 - auc, 1.0 - auc_oracle
    return 100.0 * (ours - ref) / (ref + 1e-10)


def _answer_mask(mask: Tensor) -> Tensor:
    """``mask`` without each row's last masked-in position (the end-of-sequence token)."""
    pos = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    last = torch.where(mask, pos, torch.full_like(pos, -1)).max(dim=1, keepdim=True).values
    return mask & (pos != last)


def min_k(values: Tensor, mask: Tensor, k: float = MINK_K) -> Tensor:
    """Per row, the mean of the ``max(1, int(k * n_i))`` smallest ``values`` among the
    ``n_i`` masked-in positions of row ``i`` (``values``, ``mask``: ``(B, T)``); ``0`` for a
    row with no position. Batched, no Python loop.

    open-unlearning ``src/evals/metrics/mia/min_k.py``, ``compute_score`` (which returns
    the negative, a non-member score, and ``0`` for an empty row); the count is computed
    in float64 as Python computes ``int(len(lp) * k)``."""
    if not 0 < k <= 1:
        raise ValueError("k must be in (0, 1]")
    big = torch.finfo(values.dtype).max
    v = torch.where(mask, values, torch.full_like(values, big))
    srt = v.sort(dim=1).values
    n = mask.sum(1)
    take = torch.clamp(torch.floor(n.to(torch.float64) * k), min=1).to(torch.long)
    take = torch.where(n > 0, take, torch.zeros_like(take))
    rank = torch.arange(values.shape[1], device=values.device).unsqueeze(0)
    sel = rank < take.unsqueeze(1)
    total = torch.where(sel, srt, torch.zeros_like(srt)).sum(1)
    return total / take.clamp(min=1).to(values.dtype)


def min_k_plus_plus(
    token_logp: Tensor, logprobs: Tensor, mask: Tensor, k: float = MINK_K
) -> Tensor:
    """Min-K%++ per row: :func:`min_k` of ``(log p(x_t) - mu_t) / sqrt(max(var_t, 1e-6))``,
    with ``mu_t`` and ``var_t`` the mean and variance of ``log p`` under the model's own
    next-token distribution at position ``t`` (``token_logp``, ``mask``: ``(B, T)``;
    ``logprobs``: ``(B, T, V)`` log-softmax). open-unlearning
    ``src/evals/metrics/mia/min_k_plus_plus.py``, ``compute_score`` (Zhang et al., 2024)."""
    probs = logprobs.exp()
    mu = (probs * logprobs).sum(-1)
    var = (probs * logprobs.square()).sum(-1) - mu.square()
    z = (token_logp - mu) / var.clamp(min=MINKPP_VAR_FLOOR).sqrt()
    return min_k(z, mask, k)


# --------------------------------------------------------------------------- model scoring
@dataclass
class SequenceScores:
    """Per-sequence scores of one teacher-forced pass."""

    logp: np.ndarray  # length-normalised log-probability of the answer, mean token log p
    mink: np.ndarray  # Min-K% of the answer's token log p, end of sequence excluded
    minkpp: np.ndarray  # Min-K%++ of the same tokens


@torch.no_grad()
def score_sequences(
    model: Any, batch: Any, chunk: int = 128, k: float = MINK_K, mia: bool = True
) -> SequenceScores:
    """Teacher-forced scores of every row of an ``EncodedBatch``, ``chunk`` rows per
    forward pass.

    ``logp`` is the mean log-probability of every labelled token (the answer and the end
    of sequence: minus open-unlearning's ``avg_loss``, ``evaluate_probability``, and
    TOFU's ``avg_gt_loss``); Min-K% and Min-K%++ (when ``mia``; zeros otherwise) use the
    answer's tokens without the end of sequence, as open-unlearning's
    ``tokenwise_logprobs`` ("-1 to ignore eos prediction")."""
    from ..objectives import token_mask

    device = next(model.parameters()).device
    out: dict[str, list[Tensor]] = {"logp": [], "mink": [], "minkpp": []}
    for s in range(0, len(batch), chunk):
        b = batch.select(range(s, min(s + chunk, len(batch)))).to(device)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
        logprobs = F.log_softmax(logits[:, :-1], dim=-1)
        mask = token_mask(b.labels)
        target = b.labels[:, 1:].clamp(min=0)
        tok = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        n = mask.sum(1).clamp(min=1)
        out["logp"].append((torch.where(mask, tok, 0.0).sum(1) / n).cpu())
        if mia:
            answer = _answer_mask(mask)
            out["mink"].append(min_k(tok, answer, k).cpu())
            out["minkpp"].append(min_k_plus_plus(tok, logprobs, answer, k).cpu())
        else:
            out["mink"].append(torch.zeros(len(b)))
            out["minkpp"].append(torch.zeros(len(b)))
    return SequenceScores(
        **{key: torch.cat(v).numpy().astype(np.float64) for key, v in out.items()}
    )


@torch.no_grad()
def greedy_generate(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_length: int,
    eos_id: int,
    pad_id: int,
    chunk: int = 128,
) -> list[list[int]]:
    """Greedy continuation of left-padded prompts, ``chunk`` prompts per
    ``model.generate`` call, as TOFU generates (``evaluate_util.py``,
    ``run_generation``: ``do_sample=False``, ``max_length``, the key/value cache): each
    continuation stops at the end-of-sequence token or when the chunk's padded prompt
    plus the new tokens reach ``max_length`` tokens (capped at the model's context).
    Returns the new tokens of each prompt, cut before the end of sequence."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    context = getattr(model.config, "max_position_embeddings", None) or max_length
    cap = min(max_length, int(context))
    results: list[list[int]] = []
    for s in range(0, input_ids.shape[0], chunk):
        ids = input_ids[s : s + chunk].to(device)
        mask = attention_mask[s : s + chunk].to(device)
        width = ids.shape[1]
        new = cap - width
        if new <= 0:
            results.extend([] for _ in range(ids.shape[0]))
            continue
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=False,
            max_new_tokens=new,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row in out[:, width:].tolist():
            cut = row.index(eos_id) if eos_id in row else len(row)
            results.append(row[:cut])
    return results


class _EvalSet:
    """One set's encoded answers, reference answers, perturbed answers and prompts."""

    def __init__(
        self,
        codec: Any,
        rows: Sequence[dict[str, Any]],
        ref_key: str,
        perturbed: bool,
    ) -> None:
        from ._lm import encode_prompts, encode_qa

        self.rows = list(rows)
        qs = [r["question"] for r in self.rows]
        self.answers = [r["answer"] for r in self.rows]
        self.ref_key = ref_key
        self.answer = encode_qa(codec, qs, self.answers) if self.rows else None
        self.reference = (
            self.answer
            if ref_key == "answer" or not self.rows
            else encode_qa(codec, qs, [r[ref_key] for r in self.rows])
        )
        self.k = 0
        self.perturbed = None
        if perturbed and self.rows:
            self.k = min(len(r["perturbed_answer"]) for r in self.rows)
            if self.k == 0:
                raise ValueError("every evaluation row needs at least one perturbed answer")
            pq = [q for q in qs for _ in range(self.k)]
            pa = [a for r in self.rows for a in r["perturbed_answer"][: self.k]]
            self.perturbed = encode_qa(codec, pq, pa)
            self.prompt_ids, self.prompt_mask = encode_prompts(codec, qs)


REFERENCES = ("answer", "paraphrase")
"""``truth_reference`` values: the trained answer on every set (the study's default), or
TOFU's paraphrase on the forget and retain sets."""


class Evaluator:
    """Every metric of one model, with all forward passes batched.

    Built once per study from the codec (or a tokenizer trained here) and the
    :class:`~._corpus.TofuData`; call :meth:`raw` per model (teacher-forced scores, truth
    ratios, generations), then :meth:`summarise` against the oracle's raw results. Every
    row of every set is evaluated: forget, retain, real authors and world facts (TOFU's
    four sets) and the holdout (membership inference).

    ``reference``: ``"paraphrase"`` (TOFU's mode) takes the truth ratio of the forget and
    retain sets against ``paraphrased_answer`` and of the real-authors and world-facts
    sets against the answer, as TOFU's ``base_answer_key`` (``config/eval_everything.yaml``)
    and open-unlearning's ``*_Truth_Ratio`` configurations do; ``"answer"`` takes every
    truth ratio against the answer. ``max_length``: the generation length
    (:data:`GENERATION_MAX_LENGTH`). ``batch_size``: rows per forward pass.
    """

    def __init__(
        self,
        tok: Any,
        data: Any,
        reference: str = "answer",
        max_length: int = GENERATION_MAX_LENGTH,
        k: float = MINK_K,
        batch_size: int = 128,
    ) -> None:
        from rouge_score import rouge_scorer

        from ._lm import as_codec

        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        self.codec = as_codec(tok)
        self.k = k
        self.max_length = max_length
        self.batch_size = batch_size
        self.reference = reference
        tofu_ref = "paraphrased_answer" if reference == "paraphrase" else "answer"
        if not data.real_eval:
            raise ValueError("the data has no real-authors rows (real_authors_perturbed.json)")
        self.sets = {
            "forget": _EvalSet(self.codec, data.forget_eval, tofu_ref, True),
            "retain": _EvalSet(self.codec, data.retain_eval, tofu_ref, True),
            "real": _EvalSet(self.codec, data.real_eval, "answer", True),
            "world": _EvalSet(self.codec, data.world_eval, "answer", True),
            "holdout": _EvalSet(self.codec, data.holdout, "answer", False),
        }
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def sizes(self) -> dict[str, int]:
        """Rows per set."""
        return {name: len(es.rows) for name, es in self.sets.items()}

    @torch.no_grad()
    def raw(self, model: Any) -> dict[str, Any]:
        """Per-row scores of ``model`` on every set."""
        model.eval()
        out: dict[str, Any] = {}
        bs = self.batch_size
        for name, es in self.sets.items():
            if not es.rows:
                continue
            mia = name in ("forget", "holdout")
            ans = score_sequences(model, es.answer, chunk=bs, k=self.k, mia=mia)
            r: dict[str, Any] = {"answer": ans}
            if es.perturbed is not None:
                ref = (
                    ans
                    if es.reference is es.answer
                    else score_sequences(model, es.reference, chunk=bs, mia=False)
                )
                pert = score_sequences(model, es.perturbed, chunk=bs, mia=False)
                pert_logp = pert.logp.reshape(len(es.rows), es.k)
                r["ratio"] = truth_ratio(ref.logp, pert_logp)
                r["pert_logp"] = pert_logp
                gen = greedy_generate(
                    model,
                    es.prompt_ids,
                    es.prompt_mask,
                    self.max_length,
                    self.codec.eos_id,
                    self.codec.pad_id,
                    chunk=bs,
                )
                texts = self.codec.decode(gen)
                r["rouge"] = np.array(
                    [
                        self.scorer.score(a, t.strip())["rougeL"].recall
                        for a, t in zip(es.answers, texts)
                    ]
                )
                r["generated"] = texts
                r["generated_tokens"] = np.array([len(g) for g in gen])
            out[name] = r
        return out

    @staticmethod
    def summarise(raw: dict[str, Any], oracle: dict[str, Any]) -> dict[str, float]:
        """The scalar metrics of one model from its :meth:`raw` results and the oracle's."""
        f, rt = raw["forget"], raw["retain"]
        m: dict[str, float] = {
            "forget_prob": float(np.exp(f["answer"].logp).mean()),
            "forget_rouge": float(f["rouge"].mean()),
            "forget_truth_ratio": forget_truth_ratio(f["ratio"]),
            "retain_prob": float(np.exp(rt["answer"].logp).mean()),
            "retain_rouge": float(rt["rouge"].mean()),
            "retain_truth": truth_score(rt["ratio"]),
        }
        for name in ("real", "world"):
            s = raw[name]
            m[f"{name}_prob"] = option_probability(s["answer"].logp, s["pert_logp"])
            m[f"{name}_rouge"] = float(s["rouge"].mean())
            m[f"{name}_truth"] = truth_score(s["ratio"])
        m["model_utility"] = harmonic_mean([m[k] for k in UTILITY_KEYS])
        fq = forget_quality(f["ratio"], oracle["forget"]["ratio"])
        m["forget_quality"] = fq["p"]
        m["ks_stat"] = fq["stat"]
        m["ks_n"] = fq["n"]
        m["ks_n_oracle"] = fq["n_oracle"]
        m["gen_tokens"] = float(
            np.mean(np.concatenate([raw[s]["generated_tokens"] for s in ("forget", "retain")]))
        )
        if "holdout" in raw and "holdout" in oracle:
            h = raw["holdout"]["answer"]
            for name, attr in (
                ("loss", "logp"),
                ("mink", "mink"),
                ("minkpp", "minkpp"),
            ):
                auc = mia_auc(getattr(f["answer"], attr), getattr(h, attr))
                m[f"mia_auc_{name}"] = auc
                ref = mia_auc(
                    getattr(oracle["forget"]["answer"], attr),
                    getattr(oracle["holdout"]["answer"], attr),
                )
                m[f"privleak_{name}"] = privleak(auc, ref)
            m["mia_auc"] = m["mia_auc_mink"]
            m["privleak"] = m["privleak_mink"]
        else:  # a TOFU folder without holdout files: no membership inference
            for name in ("loss", "mink", "minkpp"):
                m[f"mia_auc_{name}"] = m[f"privleak_{name}"] = math.nan
            m["mia_auc"] = m["privleak"] = math.nan
        return m
