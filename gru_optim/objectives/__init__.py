r"""Unlearning objectives (GA, NPO, SimNPO, WGA, SatImp, IdK-NLL, IdK-DPO), retain
objectives (NLL, answer-masked KL) and their combinations, as pure functions of logits,
labels and reference-model logits in the Hugging Face causal-LM convention.

Pick one by name with :func:`get_objective`; its :class:`Objective` computes the loss to
minimise and is GRU's forget closure, :func:`nll_loss` being GRU's retain closure.

Conventions (those of Hugging Face causal language models):

- ``logits`` has shape ``(B, T, V)`` and ``labels`` shape ``(B, T)``, aligned as for
  ``model(input_ids, labels=labels)``: the functions shift internally, so position ``t`` of
  the logits predicts ``labels[:, t + 1]``.
- Labels equal to ``-100`` (:data:`IGNORE_INDEX`) are masked: prompt and padding positions
  contribute nothing. The remaining positions are the *answer tokens*.
- ``ref_*`` logits come from a frozen reference model (usually the model before
  unlearning); they are detached, so no gradient ever flows into them.
- Every loss is *the quantity to minimise*: minimising :func:`ga_loss` raises the NLL of
  the forget answers.
- Log-probabilities are computed in float32 whatever the logits' dtype; losses are
  float32 scalars.

Reductions. A *token-level* objective is a sum over answer tokens divided by the number
of answer tokens in the batch (the Hugging Face ``loss`` convention, not a mean of
per-sequence means). A *sequence-level* objective is a sum over sequences divided by the
number of sequences. Each function takes ``num_items`` to override that denominator: under
gradient accumulation pass the count over all micro-batches of the optimizer step
(:func:`token_counts` summed for token-level objectives, the number of sequences for
sequence-level ones), so that the micro-batch losses add up to the full-batch loss. A
denominator of zero is treated as one (the loss is then ``0``).

Notation: for sequence ``i``, ``y_i`` are its answer tokens, ``|y_i|`` their number,
``NLL_i = -sum_t log p_theta(y_{i,t} | y_{i,<t}, x_i)`` (:func:`sequence_nll`) and
``p_t = p_theta(y_t | ...)`` the model's probability of answer token ``t``.

Modules, one concern each: ``_tokens`` (masks, NLL, reductions), ``_retain``, ``_forget``,
``_combined`` (the baselines' sums), ``_objective`` (:class:`Objective`), ``_registry``.
"""

from ._combined import ga_kl_loss, grad_diff_loss, npo_rt_loss, simnpo_rt_loss
from ._forget import (
    ga_loss,
    idk_dpo_loss,
    idk_nll_loss,
    npo_loss,
    satimp_loss,
    simnpo_loss,
    wga_loss,
)
from ._objective import LossInputs, Objective
from ._registry import OBJECTIVES, get_objective
from ._retain import nll_loss, retain_kl_loss
from ._tokens import IGNORE_INDEX, sequence_nll, token_counts, token_mask, token_nll

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
