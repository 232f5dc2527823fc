"""Token masks, per-token and per-sequence NLL and the reductions every objective shares
(the conventions are in :mod:`gru_optim.objectives`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "Count", "sequence_nll", "token_counts", "token_mask", "token_nll"]

IGNORE_INDEX = -100
"""Label value of positions that are not answer tokens (prompt, padding)."""

Count = int | float | Tensor


# --------------------------------------------------------------------------- helpers
def _check(logits: Tensor, labels: Tensor, name: str = "logits") -> None:
    if logits.dim() != 3:
        raise ValueError(f"{name} must have shape (B, T, V), got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must have shape (B, T) = {tuple(logits.shape[:2])} to match {name}, "
            f"got {tuple(labels.shape)}"
        )


def token_mask(labels: Tensor) -> Tensor:
    """``(B, T - 1)`` boolean mask of the answer tokens after the causal shift
    (``labels[:, 1:] != -100``)."""
    return labels[:, 1:] != IGNORE_INDEX


def token_counts(labels: Tensor) -> Tensor:
    """``(B,)`` number of answer tokens of each sequence (labels other than ``-100`` after
    the causal shift; the first label is never predicted and never counts)."""
    return token_mask(labels).sum(-1)


def token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """``(B, T - 1)`` per-token negative log-likelihood ``-log p_t`` in float32, ``0`` at
    masked positions. Position ``t`` is the NLL of ``labels[:, t + 1]``."""
    _check(logits, labels)
    b, t, v = logits.shape
    shift_logits = logits[:, :-1, :].reshape(-1, v).float()
    shift_labels = labels[:, 1:].reshape(-1)
    nll = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(b, t - 1)


def sequence_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """``(B,)`` summed token NLL of each sequence's answer, ``NLL_i = -log p_theta(y_i|x_i)``
    (``0`` for a sequence without answer tokens)."""
    return token_nll(logits, labels).sum(-1)


def _denominator(num_items: Count | None, default: Tensor) -> Tensor:
    n = default if num_items is None else torch.as_tensor(num_items, device=default.device)
    return n.to(torch.float32).clamp_min(1.0)


def _token_mean(per_token: Tensor, labels: Tensor, num_items: Count | None) -> Tensor:
    """Sum of ``per_token`` over answer tokens / (answer tokens, or ``num_items``)."""
    mask = token_mask(labels)
    total = torch.where(mask, per_token, 0.0).sum()
    return total / _denominator(num_items, mask.sum())


def _sequence_mean(per_seq: Tensor, num_items: Count | None) -> Tensor:
    """Sum of ``per_seq`` / (sequences, or ``num_items``)."""
    default = torch.tensor(per_seq.shape[0], device=per_seq.device)
    return per_seq.sum() / _denominator(num_items, default)


def _ref_nll(ref_logits: Tensor, labels: Tensor) -> Tensor:
    with torch.no_grad():
        return sequence_nll(ref_logits.detach(), labels)
