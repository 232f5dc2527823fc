"""Retain objectives: what GRU's retain closure minimises (conventions: :mod:`._tokens`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._tokens import (
    Count,
    _check,
    _denominator,
    _token_mean,
    token_mask,
    token_nll,
)

__all__ = ["nll_loss", "retain_kl_loss"]


def nll_loss(logits: Tensor, labels: Tensor, *, num_items: Count | None = None) -> Tensor:
    r"""Retain objective: mean token NLL, ``sum_{i,t} -log p_t / N`` (token-level).

    ``N`` is the number of answer tokens in the batch (or ``num_items``). This is the
    ``loss`` a Hugging Face causal LM returns for these labels, and GRU's retain loss.
    """
    return _token_mean(token_nll(logits, labels), labels, num_items)


def retain_kl_loss(
    logits: Tensor, ref_logits: Tensor, labels: Tensor, *, num_items: Count | None = None
) -> Tensor:
    r"""Retain objective: KL from the reference model, on answer tokens only (token-level).

    ``sum_{i,t in answer} KL(p_ref(.|ctx_t) || p_theta(.|ctx_t)) / N`` over the positions
    that predict an answer token, ``N`` their number (or ``num_items``). Prompt and padding
    positions are excluded from both the sum and ``N`` (averaging over them, as some
    frameworks do, dilutes the term by the prompt length and lets padding count).
    """
    _check(logits, labels)
    _check(ref_logits, labels, "ref_logits")
    mask = token_mask(labels)
    cur = logits[:, :-1, :][mask].float()
    with torch.no_grad():
        ref_logp = F.log_softmax(ref_logits.detach()[:, :-1, :][mask].float(), dim=-1)
    cur_logp = F.log_softmax(cur, dim=-1)
    kl = F.kl_div(cur_logp, ref_logp, reduction="none", log_target=True).sum(-1)
    return kl.sum() / _denominator(num_items, mask.sum())
