"""Evaluation of a causal LM on the forget, retain and holdout rows, with the study's
metric definitions (:mod:`gru_optim.study`: TOFU's, MUSE's and open-unlearning's).

Per set:

- ``nll``: the token-mean NLL of the answers (every labelled token, the end of sequence
  included), over the whole set (:func:`gru_optim.hf.mean_answer_nll`'s number);
- ``prob``: the mean over rows of ``P(a|q)^(1/|a|)``, the length-normalised answer
  probability (TOFU's *Prob.* of the forget and retain sets);
- ``rouge_l``: the mean ROUGE-L recall of the greedy answer against the answer
  (``rouge-score``, stemmed; TOFU's); for ``text`` rows the greedy continuation of the
  first half of each text against its second half (MUSE's verbatim memorisation);
- ``truth_ratio`` (rows with ``perturbed_answer``): ``R = P̄(perturbed) / P̄(reference)``
  per row (geometric mean over the perturbed answers; the reference is
  ``paraphrased_answer`` when every row has one, as TOFU, else the answer), aggregated as
  TOFU does: ``mean(min(R, 1/R))`` on the forget set (1: true and false answers equally
  likely), ``mean(max(0, 1 - R))`` on the others (higher: the true answer is preferred);
- on the forget set with a holdout: ``mia_minkpp_auc`` and ``mia_loss_auc``, the ROC AUC
  of Min-K%++ (k = 0.4) and of the loss separating forget rows (members) from holdout
  rows (non-members); 0.5 is chance, 1 every forget row looks more likely.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import encode_qa_rows, pad_examples, row_kind
from ..objectives import token_mask

__all__ = ["EvalSet", "build_eval_sets", "evaluate"]


@dataclass
class EvalSet:
    """One set's encoded rows: the answers, the truth ratio's reference and perturbed
    answers (``k`` per row), and the prompts and targets of greedy generation."""

    name: str
    kind: str
    answers: list[dict[str, list[int]]]
    prompts: list[list[int]]
    targets: list[str]
    reference: list[dict[str, list[int]]] | None
    perturbed: list[dict[str, list[int]]] | None
    k: int


def _perturbed_lists(rows: Sequence[Mapping[str, Any]]) -> list[list[str]] | None:
    if not all("perturbed_answer" in r for r in rows):
        return None
    out = []
    for r in rows:
        p = r["perturbed_answer"]
        out.append([p] if isinstance(p, str) else [str(x) for x in p])
    return out if min(len(p) for p in out) > 0 else None


def _prompt_length(labels: Sequence[int]) -> int:
    n = 0
    while n < len(labels) and labels[n] == -100:
        n += 1
    return n


def build_eval_sets(
    tokenizer: Any,
    sets: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    prompt_format: Any = "auto",
    max_length: int | None = None,
) -> dict[str, EvalSet]:
    """Encode every set once (the same encoding as training's,
    :func:`gru_optim.data.encode_qa_rows`)."""
    out: dict[str, EvalSet] = {}
    for name, rows in sets.items():
        kind = row_kind(rows, name)
        kw: dict[str, Any] = {"prompt_format": prompt_format, "max_length": max_length}
        answers = encode_qa_rows(tokenizer, rows, name=name, **kw)
        reference = perturbed = None
        k = 0
        if kind == "qa":
            # the prompt is what precedes the first labelled token
            prompts = [e["input_ids"][: _prompt_length(e["labels"])] for e in answers]
            targets = [str(r["answer"]) for r in rows]
            lists = _perturbed_lists(rows)
            if lists is not None:
                k = min(len(p) for p in lists)
                ref_key = (
                    "paraphrased_answer"
                    if all(isinstance(r.get("paraphrased_answer"), str) for r in rows)
                    else "answer"
                )
                reference = (
                    answers
                    if ref_key == "answer"
                    else encode_qa_rows(tokenizer, rows, answer_key=ref_key, name=name, **kw)
                )
                flat = [
                    {"question": r["question"], "answer": a}
                    for r, p in zip(rows, lists)
                    for a in p[:k]
                ]
                perturbed = encode_qa_rows(tokenizer, flat, name=name, **kw)
        else:
            prompts, targets = [], []
            for e in answers:
                ids = e["input_ids"][:-1]  # without the end of sequence
                half = max(1, len(ids) // 2)
                prompts.append(ids[:half])
                targets.append(tokenizer.decode(ids[half:], skip_special_tokens=True))
        out[name] = EvalSet(name, kind, answers, prompts, targets, reference, perturbed, k)
    return out


@dataclass
class _Scores:
    logp_sum: np.ndarray  # per row: sum of the labelled tokens' log p
    count: np.ndarray  # per row: number of labelled tokens
    minkpp: np.ndarray  # per row: Min-K%++ of the answer without the end of sequence

    @property
    def mean_logp(self) -> np.ndarray:
        out: np.ndarray = self.logp_sum / np.maximum(self.count, 1)
        return out


def _answer_mask(mask: Tensor) -> Tensor:
    """``mask`` without each row's last masked-in position (the end of sequence), as the
    study's (open-unlearning's ``tokenwise_logprobs``) Min-K% scores."""
    pos = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    last = torch.where(mask, pos, torch.full_like(pos, -1)).max(dim=1, keepdim=True).values
    return mask & (pos != last)


@torch.no_grad()
def _score(
    model: Any,
    examples: Sequence[Mapping[str, Any]],
    pad_id: int,
    batch_size: int,
    mia: bool,
    bar: Any,
) -> _Scores:
    from ..study import min_k_plus_plus

    device = next(model.parameters()).device
    sums, counts, mkpp = [], [], []
    for s in range(0, len(examples), batch_size):
        batch = pad_examples(examples[s : s + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
        mask = token_mask(batch["labels"])
        target = batch["labels"][:, 1:].clamp(min=0)
        tok = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        sums.append(torch.where(mask, tok, 0.0).sum(1).double().cpu())
        counts.append(mask.sum(1).cpu())
        if mia:
            mkpp.append(min_k_plus_plus(tok, logprobs, _answer_mask(mask)).double().cpu())
        bar.update(1)
    return _Scores(
        torch.cat(sums).numpy(),
        torch.cat(counts).numpy().astype(np.float64),
        torch.cat(mkpp).numpy() if mia else np.zeros(len(examples)),
    )


@torch.no_grad()
def _generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    tokenizer: Any,
    max_length: int,
    batch_size: int,
    bar: Any,
) -> list[str]:
    """Greedy continuations of the prompts (left-padded, ``batch_size`` per call), stopping
    at the end of sequence or at ``max_length`` total tokens (capped at the model's
    context), as the study and TOFU generate."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = int(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    context = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    cap = min(max_length, int(context)) if context else max_length
    texts: list[str] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
        new = cap - width
        if new <= 0 or width == 0:
            texts.extend("" for _ in chunk)
            bar.update(1)
            continue
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=pad
        )
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
        )
        for row in out[:, width:].tolist():
            cut = row.index(eos) if eos in row else len(row)
            texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        bar.update(1)
    return texts


def _batches(n: int, size: int) -> int:
    return -(-n // size)


def evaluate(
    model: Any,
    tokenizer: Any,
    sets: Mapping[str, EvalSet],
    *,
    batch_size: int = 16,
    gen_max_length: int = 200,
    desc: str = "evaluate",
) -> dict[str, dict[str, float]]:
    """The metrics of ``model`` on every set (see the module's docstring), in eval mode
    (restored after), with a progress bar over the forward passes."""
    from rouge_score import rouge_scorer
    from tqdm.auto import tqdm

    from ..study import forget_truth_ratio, mia_auc, truth_ratio, truth_score

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    has_holdout = "holdout" in sets
    total = 0
    for es in sets.values():
        total += 2 * _batches(len(es.answers), batch_size)
        if es.perturbed is not None:
            total += _batches(len(es.perturbed), batch_size)
            if es.reference is not es.answers:
                total += _batches(len(es.answers), batch_size)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    was_training = model.training
    model.eval()
    out: dict[str, dict[str, float]] = {}
    scores: dict[str, _Scores] = {}
    try:
        with tqdm(total=total, desc=desc, leave=False, mininterval=0.5) as bar:
            for name, es in sets.items():
                mia = has_holdout and name in ("forget", "holdout")
                sc = _score(model, es.answers, pad, batch_size, mia, bar)
                scores[name] = sc
                m: dict[str, float] = {
                    "nll": float(-sc.logp_sum.sum() / max(sc.count.sum(), 1.0)),
                    "prob": float(np.exp(sc.mean_logp).mean()),
                }
                texts = _generate(model, es.prompts, tokenizer, gen_max_length, batch_size, bar)
                m["rouge_l"] = float(
                    np.mean(
                        [scorer.score(t, g)["rougeL"].recall for t, g in zip(es.targets, texts)]
                    )
                )
                if es.perturbed is not None:
                    ref = (
                        sc
                        if es.reference is es.answers
                        else _score(model, es.reference or [], pad, batch_size, False, bar)
                    )
                    pert = _score(model, es.perturbed, pad, batch_size, False, bar)
                    ratios = truth_ratio(ref.mean_logp, pert.mean_logp.reshape(-1, es.k))
                    m["truth_ratio"] = (
                        forget_truth_ratio(ratios) if name == "forget" else truth_score(ratios)
                    )
                out[name] = m
        if has_holdout and "forget" in out:
            f, h = scores["forget"], scores["holdout"]
            out["forget"]["mia_minkpp_auc"] = mia_auc(f.minkpp.tolist(), h.minkpp.tolist())
            out["forget"]["mia_loss_auc"] = mia_auc(f.mean_logp.tolist(), h.mean_logp.tolist())
    finally:
        model.train(was_training)
    return out
