"""TOFU and MUSE metrics: pure functions of per-sequence scores, and a batched evaluator.

Definitions (``P̄(a|q) = P(a|q)^(1/|a|)``, the length-normalised answer probability):

- **probability** of a set: mean of ``P̄(a|q)`` over its rows (TOFU's *Prob.* on the
  forget and retain sets); on world facts the probability normalised over the options,
  ``P̄(a) / (P̄(a) + sum_k P̄(perturbed_k))``, as TOFU does for its multiple-choice sets.
- **ROUGE-L recall** of the greedy answer against the reference answer (``rouge-score``).
- **truth ratio** of a row: ``R = exp(mean_k log P̄(perturbed_k) - log P̄(reference))``, the
  geometric mean over the perturbed answers of their probability relative to the
  reference answer. TOFU's reference is the *paraphrased* answer; a tiny model trained
  from scratch never generalises to a wording it has not seen, so with
  ``reference="answer"`` (the default of this study) the reference is the trained answer
  and the perturbed answers share its wording with a wrong value (so ``R`` asks: does the
  model prefer the true value to wrong ones in the same sentence?). Reported on the
  forget set as ``mean(min(R, 1/R))``; the truth score of the utility sets is
  ``mean(max(0, 1 - R))``.
- **forget quality**: the p-value of the two-sample Kolmogorov-Smirnov test between the
  truth ratios of the forget rows under the unlearned model and under the oracle
  (``scipy.stats.ks_2samp``); the statistic and both sample sizes are kept.
- **model utility**: harmonic mean of probability, ROUGE-L and truth score on the retain
  and world-facts sets (six numbers; ``0`` if any is ``0``).
- **membership inference** (forget rows are members, holdout rows non-members): AUC
  (``sklearn.metrics.roc_auc_score``) of LOSS (``-mean token NLL``), Min-K% (mean of the
  ``k`` lowest token log-probabilities) and Min-K%++ (the same on token log-probabilities
  standardised by the mean and standard deviation of ``log p`` under the model's own
  next-token distribution). ``mia_auc`` is Min-K%, MUSE's choice.
- **privleak** (MUSE): ``100 * (AUC_unlearned - AUC_oracle) / AUC_oracle``; ``0`` is the
  oracle's privacy, positive values leak membership, negative ones over-unlearn.
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
    "Evaluator",
    "SequenceScores",
    "forget_quality",
    "harmonic_mean",
    "mia_auc",
    "min_k",
    "privleak",
    "truth_ratio",
    "truth_score",
]


# --------------------------------------------------------------------------- pure metrics
def truth_ratio(ref_logp: np.ndarray, pert_logp: np.ndarray) -> np.ndarray:
    """Per-row truth ratio ``exp(mean_k pert_logp[:, k] - ref_logp)`` from length-normalised
    log-probabilities (``ref_logp``: ``(N,)``, ``pert_logp``: ``(N, K)``)."""
    ref = np.asarray(ref_logp, dtype=np.float64)
    pert = np.asarray(pert_logp, dtype=np.float64)
    if pert.ndim != 2 or pert.shape[0] != ref.shape[0]:
        raise ValueError("pert_logp must be (N, K) with N = len(ref_logp)")
    ratio: np.ndarray = np.exp(pert.mean(axis=1) - ref)
    return ratio


def truth_score(ratios: np.ndarray) -> float:
    """``mean(max(0, 1 - R))``: TOFU's truth score on retain/world sets (higher: the model
    prefers the true answers)."""
    return float(np.mean(np.maximum(0.0, 1.0 - np.asarray(ratios, dtype=np.float64))))


def forget_quality(unlearned: Sequence[float], oracle: Sequence[float]) -> dict[str, float]:
    """KS two-sample test between truth-ratio samples: ``{"p": p-value, "stat": D,
    "n": len(unlearned), "n_oracle": len(oracle)}``. A high p-value means the unlearned
    model's truth ratios are indistinguishable from the oracle's."""
    from scipy.stats import ks_2samp

    res = ks_2samp(np.asarray(unlearned, float), np.asarray(oracle, float))
    return {
        "p": float(res.pvalue),
        "stat": float(res.statistic),
        "n": len(unlearned),
        "n_oracle": len(oracle),
    }


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean, ``0`` when any value is ``<= 0``."""
    vals = [float(v) for v in values]
    if not vals or min(vals) <= 0:
        return 0.0
    from scipy.stats import hmean

    return float(hmean(vals))


def mia_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of a membership score (higher: more likely a member) separating members
    from non-members; ``0.5`` is chance."""
    from sklearn.metrics import roc_auc_score

    m = np.asarray(member_scores, float)
    n = np.asarray(nonmember_scores, float)
    labels = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    return float(roc_auc_score(labels, np.concatenate([m, n])))


def privleak(auc: float, auc_oracle: float) -> float:
    """MUSE's privacy leakage ``100 * (auc - auc_oracle) / auc_oracle``."""
    return 100.0 * (auc - auc_oracle) / auc_oracle


def min_k(values: Tensor, mask: Tensor, k: float) -> Tensor:
    """Per-row mean of the ``ceil(k * n_i)`` smallest ``values`` among the ``n_i`` masked-in
    positions of row ``i`` (``values``, ``mask``: ``(B, T)``). Batched, no Python loop."""
    if not 0 < k <= 1:
        raise ValueError("k must be in (0, 1]")
    big = torch.finfo(values.dtype).max
    v = torch.where(mask, values, torch.full_like(values, big))
    srt = v.sort(dim=1).values
    n = mask.sum(1)
    take = torch.clamp(torch.ceil(k * n.to(values.dtype)), min=1).to(torch.long)
    rank = torch.arange(values.shape[1], device=values.device).unsqueeze(0)
    sel = rank < take.unsqueeze(1)
    return torch.where(sel, srt, torch.zeros_like(srt)).sum(1) / take.to(values.dtype)


# --------------------------------------------------------------------------- model scoring
@dataclass
class SequenceScores:
    """Per-sequence scores of one teacher-forced pass."""

    logp: np.ndarray  # length-normalised log-probability of the answer, mean token log p
    mink: np.ndarray  # Min-K% of token log p
    minkpp: np.ndarray  # Min-K%++ of token log p


@torch.no_grad()
def score_sequences(model: Any, batch: Any, chunk: int = 128, k: float = 0.4) -> SequenceScores:
    """Teacher-forced scores of every row of an ``EncodedBatch``, ``chunk`` rows per
    forward pass."""
    from ..objectives import token_mask

    out: dict[str, list[Tensor]] = {"logp": [], "mink": [], "minkpp": []}
    for s in range(0, len(batch), chunk):
        b = batch.select(range(s, min(s + chunk, len(batch))))
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
        logprobs = F.log_softmax(logits[:, :-1], dim=-1)
        mask = token_mask(b.labels)
        target = b.labels[:, 1:].clamp(min=0)
        tok = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        probs = logprobs.exp()
        mu = (probs * logprobs).sum(-1)
        var = (probs * logprobs.square()).sum(-1) - mu.square()
        z = (tok - mu) / var.clamp(min=1e-12).sqrt()
        n = mask.sum(1).clamp(min=1)
        out["logp"].append(torch.where(mask, tok, 0.0).sum(1) / n)
        out["mink"].append(min_k(tok, mask, k))
        out["minkpp"].append(min_k(z, mask, k))
    return SequenceScores(
        **{key: torch.cat(v).numpy().astype(np.float64) for key, v in out.items()}
    )


@torch.no_grad()
def greedy_generate(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    chunk: int = 128,
) -> list[list[int]]:
    """Greedy continuation of left-padded prompts, a whole chunk per forward pass (no
    key/value cache: the sequences are a few dozen tokens)."""
    results: list[list[int]] = []
    for s in range(0, input_ids.shape[0], chunk):
        ids = input_ids[s : s + chunk]
        mask = attention_mask[s : s + chunk]
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        new: list[Tensor] = []
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            new.append(nxt)
            done |= nxt == eos_id
            ids = torch.cat([ids, nxt.unsqueeze(1)], 1)
            mask = torch.cat([mask, (~done | (nxt == eos_id)).long().unsqueeze(1)], 1)
            if bool(done.all()):
                break
        gen = torch.stack(new, 1).tolist()
        for row in gen:
            cut = row.index(eos_id) if eos_id in row else len(row)
            results.append([t for t in row[:cut] if t != pad_id])
    return results


class _EvalSet:
    """One set's encoded answers, perturbed answers and prompts."""

    def __init__(self, tok: Any, rows: Sequence[dict[str, Any]], reference: str, perturbed: bool):
        from ._lm import encode_prompts, encode_qa

        self.rows = list(rows)
        qs = [r["question"] for r in self.rows]
        ref_key = "answer" if reference == "answer" else "paraphrased_answer"
        self.answers = [r["answer"] for r in self.rows]
        self.answer = encode_qa(tok, qs, self.answers)
        self.reference = (
            self.answer if ref_key == "answer" else encode_qa(tok, qs, [r[ref_key] for r in rows])
        )
        self.k = 0
        self.perturbed = None
        if perturbed and self.rows:
            self.k = min(len(r["perturbed_answer"]) for r in self.rows)
            pq = [q for q in qs for _ in range(self.k)]
            pa = [a for r in self.rows for a in r["perturbed_answer"][: self.k]]
            self.perturbed = encode_qa(tok, pq, pa)
        self.prompt_ids, self.prompt_mask = encode_prompts(tok, qs)


class Evaluator:
    """Every metric of one model, with all forward passes batched.

    Built once per study from the tokenizer and the :class:`~._corpus.TofuData`; call
    :meth:`raw` per model (teacher-forced scores, truth ratios, generations), then
    :meth:`summarise` against the oracle's raw results.
    """

    def __init__(
        self,
        tok: Any,
        data: Any,
        reference: str = "answer",
        rouge_rows: int | None = None,
        max_new_tokens: int = 24,
        k: float = 0.4,
    ) -> None:
        from rouge_score import rouge_scorer

        from ._lm import EOS, PAD

        self.tok = tok
        self.k = k
        self.max_new_tokens = max_new_tokens
        self.eos = tok.token_to_id(EOS)
        self.pad = tok.token_to_id(PAD)
        retain_rows = data.retain_eval[:rouge_rows] if rouge_rows else data.retain_eval
        self.sets = {
            "forget": _EvalSet(tok, data.forget_eval, reference, True),
            "retain": _EvalSet(tok, retain_rows, reference, True),
            "world": _EvalSet(tok, data.world_eval, reference, True),
            "holdout": _EvalSet(tok, data.holdout, reference, False),
        }
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    @torch.no_grad()
    def raw(self, model: Any) -> dict[str, Any]:
        """Per-row scores of ``model`` on every set."""
        model.eval()
        out: dict[str, Any] = {}
        for name, es in self.sets.items():
            if not es.rows:
                continue
            ans = score_sequences(model, es.answer, k=self.k)
            r: dict[str, Any] = {"answer": ans}
            if es.perturbed is not None:
                ref = ans if es.reference is es.answer else score_sequences(model, es.reference)
                pert = score_sequences(model, es.perturbed).logp.reshape(len(es.rows), es.k)
                r["ratio"] = truth_ratio(ref.logp, pert)
                r["pert_logp"] = pert
                gen = greedy_generate(
                    model,
                    es.prompt_ids,
                    es.prompt_mask,
                    self.max_new_tokens,
                    self.eos,
                    self.pad,
                )
                texts = self.tok.decode_batch(gen)
                r["rouge"] = np.array(
                    [
                        self.scorer.score(a, t.strip())["rougeL"].recall
                        for a, t in zip(es.answers, texts)
                    ]
                )
                r["generated"] = texts
            out[name] = r
        return out

    @staticmethod
    def summarise(raw: dict[str, Any], oracle: dict[str, Any]) -> dict[str, float]:
        """The scalar metrics of one model from its :meth:`raw` results and the oracle's."""
        f, rt, w = raw["forget"], raw["retain"], raw["world"]
        world_opt = np.exp(w["answer"].logp) / (
            np.exp(w["answer"].logp) + np.exp(w["pert_logp"]).sum(1)
        )
        m: dict[str, float] = {
            "forget_prob": float(np.exp(f["answer"].logp).mean()),
            "forget_rouge": float(f["rouge"].mean()),
            "forget_truth_ratio": float(np.minimum(f["ratio"], 1 / f["ratio"]).mean()),
            "retain_prob": float(np.exp(rt["answer"].logp).mean()),
            "retain_rouge": float(rt["rouge"].mean()),
            "retain_truth": truth_score(rt["ratio"]),
            "world_prob": float(world_opt.mean()),
            "world_rouge": float(w["rouge"].mean()),
            "world_truth": truth_score(w["ratio"]),
        }
        m["model_utility"] = harmonic_mean(
            [
                m[k]
                for k in (
                    "retain_prob",
                    "retain_rouge",
                    "retain_truth",
                    "world_prob",
                    "world_rouge",
                    "world_truth",
                )
            ]
        )
        fq = forget_quality(f["ratio"], oracle["forget"]["ratio"])
        m["forget_quality"] = fq["p"]
        m["ks_stat"] = fq["stat"]
        m["ks_n"] = fq["n"]
        m["ks_n_oracle"] = fq["n_oracle"]
        if "holdout" in raw:
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
        else:  # pragma: no cover - real TOFU without holdout files
            m["mia_auc"] = m["privleak"] = math.nan
        return m
