"""Forget and retain objectives combined into one loss (the baselines GRU is compared
with)."""

from __future__ import annotations

from torch import Tensor

from ._forget import ga_loss, npo_loss, simnpo_loss
from ._retain import nll_loss, retain_kl_loss

__all__ = ["ga_kl_loss", "grad_diff_loss", "npo_rt_loss", "simnpo_rt_loss"]


def grad_diff_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    alpha: float = 1.0,
) -> Tensor:
    r"""Gradient difference: ``ga_loss(forget) + alpha * nll_loss(retain)`` (both token-level,
    each averaged over its own batch's answer tokens)."""
    return ga_loss(forget_logits, forget_labels) + alpha * nll_loss(retain_logits, retain_labels)


def ga_kl_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    ref_retain_logits: Tensor,
    alpha: float = 1.0,
) -> Tensor:
    r"""GA+KL: ``ga_loss(forget) + alpha * retain_kl_loss(retain)`` (both token-level)."""
    return ga_loss(forget_logits, forget_labels) + alpha * retain_kl_loss(
        retain_logits, ref_retain_logits, retain_labels
    )


def npo_rt_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    ref_forget_logits: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    beta: float = 0.1,
    alpha: float = 1.0,
) -> Tensor:
    r"""NPO+RT: ``npo_loss(forget)`` (per sequence) ``+ alpha * nll_loss(retain)`` (per token)."""
    return npo_loss(forget_logits, forget_labels, ref_forget_logits, beta) + alpha * nll_loss(
        retain_logits, retain_labels
    )


def simnpo_rt_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor,
    retain_labels: Tensor,
    beta: float = 2.5,
    delta: float = 0.0,
    alpha: float = 1.0,
) -> Tensor:
    r"""SimNPO+RT: ``simnpo_loss(forget)`` (per sequence) ``+ alpha * nll_loss(retain)``
    (per token)."""
    return simnpo_loss(forget_logits, forget_labels, beta, delta) + alpha * nll_loss(
        retain_logits, retain_labels
    )
