"""Unlearning objectives (GA, NPO, SimNPO, WGA, SatImp, IdK-NLL, IdK-DPO), retain
objectives (NLL, answer-masked KL) and their combinations, as pure functions of logits,
labels and reference-model logits in the Hugging Face causal-LM convention.

Pick one by name with :func:`get_objective`; its :class:`Objective` computes the loss to
minimise and is GRU's forget closure, :func:`nll_loss` being GRU's retain closure.
"""

from ._objectives import (
    IGNORE_INDEX,
    OBJECTIVES,
    LossInputs,
    Objective,
    ga_kl_loss,
    ga_loss,
    get_objective,
    grad_diff_loss,
    idk_dpo_loss,
    idk_nll_loss,
    nll_loss,
    npo_loss,
    npo_rt_loss,
    retain_kl_loss,
    satimp_loss,
    sequence_nll,
    simnpo_loss,
    simnpo_rt_loss,
    token_counts,
    token_mask,
    token_nll,
    wga_loss,
)

__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVES",
    "LossInputs",
    "Objective",
    "ga_kl_loss",
    "ga_loss",
    "get_objective",
    "grad_diff_loss",
    "idk_dpo_loss",
    "idk_nll_loss",
    "nll_loss",
    "npo_loss",
    "npo_rt_loss",
    "retain_kl_loss",
    "satimp_loss",
    "sequence_nll",
    "simnpo_loss",
    "simnpo_rt_loss",
    "token_counts",
    "token_mask",
    "token_nll",
    "wga_loss",
]
