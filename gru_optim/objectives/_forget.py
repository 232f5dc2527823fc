"""Forget objectives: the unlearning losses (conventions: :mod:`._tokens`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._retain import nll_loss
from ._tokens import (
    Count,
    _ref_nll,
    _sequence_mean,
    _token_mean,
    sequence_nll,
    token_counts,
    token_nll,
)

__all__ = [
    "ga_loss",
    "idk_dpo_loss",
    "idk_nll_loss",
    "npo_loss",
    "satimp_loss",
    "simnpo_loss",
    "wga_loss",
]


def ga_loss(logits: Tensor, labels: Tensor, *, num_items: Count | None = None) -> Tensor:
    r"""Gradient ascent: ``-sum_{i,t} -log p_t / N`` = ``-nll_loss`` (token-level).

    Minimising it raises the NLL of the forget answers, without bound.
    """
    return -nll_loss(logits, labels, num_items=num_items)


def npo_loss(
    logits: Tensor,
    labels: Tensor,
    ref_logits: Tensor,
    beta: float = 0.1,
    *,
    num_items: Count | None = None,
) -> Tensor:
    r"""Negative Preference Optimization (Zhang et al., 2024) (sequence-level).

    ``(2/beta) * sum_i log(1 + (pi_theta(y_i|x_i) / pi_ref(y_i|x_i))^beta) / B``
    ``= -(2/beta) * sum_i log sigmoid(-beta * (NLL_ref,i - NLL_i)) / B``,
    with sequence log-probabilities (sums over answer tokens). At ``theta = ref`` each term
    is ``(2/beta) log 2`` and its gradient is that of gradient ascent on the summed NLL;
    the weight ``sigmoid(beta * log ratio)`` fades as the forget answers become unlikely.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    log_ratio = _ref_nll(ref_logits, labels) - sequence_nll(logits, labels)
    per_seq = -(2.0 / beta) * F.logsigmoid(-beta * log_ratio)
    return _sequence_mean(per_seq, num_items)


def simnpo_loss(
    logits: Tensor,
    labels: Tensor,
    beta: float = 2.5,
    delta: float = 0.0,
    *,
    num_items: Count | None = None,
) -> Tensor:
    r"""SimNPO (Fan et al., 2024): reference-free, length-normalised NPO (sequence-level).

    ``-(2/beta) * sum_i log sigmoid(beta * (NLL_i / |y_i| - delta)) / B``.
    The margin ``delta`` is subtracted after length normalisation (the paper's
    ``gamma = beta * delta``). A sequence without answer tokens contributes a constant.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    lengths = token_counts(labels).to(torch.float32).clamp_min(1.0)
    avg_nll = sequence_nll(logits, labels) / lengths
    per_seq = -(2.0 / beta) * F.logsigmoid(beta * (avg_nll - delta))
    return _sequence_mean(per_seq, num_items)


def wga_loss(
    logits: Tensor, labels: Tensor, beta: float = 1.0, *, num_items: Count | None = None
) -> Tensor:
    r"""Weighted gradient ascent (Wang et al., 2025) (token-level).

    ``-sum_{i,t} w_t * (-log p_t) / N`` with ``w_t = sg(p_t)^beta`` (``sg``: no gradient).
    Tokens the model already finds unlikely get little weight, which stops GA's runaway
    on them. ``beta = 0`` is gradient ascent.
    """
    nll = token_nll(logits, labels)
    weight = torch.exp(-nll.detach()).pow(beta)
    return -_token_mean(weight * nll, labels, num_items)


def satimp_loss(
    logits: Tensor,
    labels: Tensor,
    beta1: float = 5.0,
    beta2: float = 1.0,
    *,
    num_items: Count | None = None,
) -> Tensor:
    r"""SatImp: saturation x importance token weighting (Yang et al., 2025) (token-level).

    ``-sum_{i,t} w_t * (-log p_t) / N`` with ``w_t = sg(p_t)^beta1 * (1 - sg(p_t))^beta2``.
    ``beta1 = beta2 = 0`` is gradient ascent; ``beta2 = 0`` is WGA with ``beta = beta1``.
    """
    nll = token_nll(logits, labels)
    p = torch.exp(-nll.detach())
    weight = p.pow(beta1) * (1.0 - p).pow(beta2)
    return -_token_mean(weight * nll, labels, num_items)


def idk_nll_loss(
    idk_logits: Tensor, idk_labels: Tensor, *, num_items: Count | None = None
) -> Tensor:
    r"""IdK-NLL: NLL of "I don't know"-style answers to the forget prompts (token-level).

    ``sum_{i,t} -log p_theta(idk_{i,t} | ...) / N`` over the tokens of the refusal answers.
    The model is trained to refuse rather than pushed away from the true answer.
    """
    return nll_loss(idk_logits, idk_labels, num_items=num_items)


def idk_dpo_loss(
    idk_logits: Tensor,
    idk_labels: Tensor,
    forget_logits: Tensor,
    forget_labels: Tensor,
    ref_idk_logits: Tensor,
    ref_forget_logits: Tensor,
    beta: float = 0.1,
    *,
    num_items: Count | None = None,
) -> Tensor:
    r"""IdK-DPO: DPO preferring the refusal (win) to the true forget answer (lose)
    (sequence-level; pairs ``i`` share the prompt).

    ``-sum_i log sigmoid(beta * [(NLL_ref(idk_i) - NLL(idk_i)) - (NLL_ref(y_i) - NLL(y_i))]) / B``,
    the standard DPO loss of Rafailov et al. (some frameworks scale it by ``2/beta``).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if idk_logits.shape[0] != forget_logits.shape[0]:
        raise ValueError("idk and forget batches must pair one to one (same batch size)")
    win = _ref_nll(ref_idk_logits, idk_labels) - sequence_nll(idk_logits, idk_labels)
    lose = _ref_nll(ref_forget_logits, forget_labels) - sequence_nll(forget_logits, forget_labels)
    per_seq = -F.logsigmoid(beta * (win - lose))
    return _sequence_mean(per_seq, num_items)
