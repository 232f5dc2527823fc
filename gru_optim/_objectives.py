r"""Unlearning objectives: pure functions of logits, labels and reference-model logits.

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

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


# --------------------------------------------------------------------------- retain
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


# --------------------------------------------------------------------------- forget
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


# --------------------------------------------------------------------------- combinations
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


# --------------------------------------------------------------------------- registry
class LossInputs(NamedTuple):
    """The logits of one batch, its labels and (when the objective needs them) the
    reference model's logits on the same batch."""

    logits: Tensor
    labels: Tensor
    ref_logits: Tensor | None = None


Level = Literal["token", "sequence"]
RetainTerm = Literal["nll", "kl"]
_ForgetFn = Callable[[LossInputs | None, LossInputs | None, Mapping[str, float], Any], Tensor]


def _need(x: LossInputs | None, what: str, name: str, ref: bool = False) -> LossInputs:
    if x is None:
        raise ValueError(f"objective {name!r} needs the {what} batch's logits and labels")
    if ref and x.ref_logits is None:
        raise ValueError(
            f"objective {name!r} needs the reference model's logits on the {what} batch"
        )
    return x


def _ga(f: LossInputs | None, i: LossInputs | None, hp: Mapping[str, float], n: Any) -> Tensor:
    f = _need(f, "forget", "ga")
    return ga_loss(f.logits, f.labels, num_items=n)


def _npo(f: LossInputs | None, i: LossInputs | None, hp: Mapping[str, float], n: Any) -> Tensor:
    f = _need(f, "forget", "npo", ref=True)
    return npo_loss(f.logits, f.labels, f.ref_logits, hp["beta"], num_items=n)  # type: ignore[arg-type]


def _simnpo(f: LossInputs | None, i: LossInputs | None, hp: Mapping[str, float], n: Any) -> Tensor:
    f = _need(f, "forget", "simnpo")
    return simnpo_loss(f.logits, f.labels, hp["beta"], hp["delta"], num_items=n)


def _wga(f: LossInputs | None, i: LossInputs | None, hp: Mapping[str, float], n: Any) -> Tensor:
    f = _need(f, "forget", "wga")
    return wga_loss(f.logits, f.labels, hp["beta"], num_items=n)


def _satimp(f: LossInputs | None, i: LossInputs | None, hp: Mapping[str, float], n: Any) -> Tensor:
    f = _need(f, "forget", "satimp")
    return satimp_loss(f.logits, f.labels, hp["beta1"], hp["beta2"], num_items=n)


def _idk_nll(f: LossInputs | None, i: LossInputs | None, hp: Mapping[str, float], n: Any) -> Tensor:
    i = _need(i, "idk", "idk_nll")
    return idk_nll_loss(i.logits, i.labels, num_items=n)


def _idk_dpo(f: LossInputs | None, i: LossInputs | None, hp: Mapping[str, float], n: Any) -> Tensor:
    f = _need(f, "forget", "idk_dpo", ref=True)
    i = _need(i, "idk", "idk_dpo", ref=True)
    assert i.ref_logits is not None and f.ref_logits is not None  # checked by _need(ref=True)
    return idk_dpo_loss(
        i.logits,
        i.labels,
        f.logits,
        f.labels,
        i.ref_logits,
        f.ref_logits,
        hp["beta"],
        num_items=n,
    )


@dataclasses.dataclass(frozen=True)
class Objective:
    r"""A named unlearning objective with a uniform call signature.

    ``objective(forget, retain=None, idk=None, num_items=None)`` takes :class:`LossInputs`
    for the forget batch, the retain batch and the "I don't know" batch (only those the
    objective uses, see :attr:`batches`) and returns the loss to minimise:

        ``forget_term(forget, idk) + alpha * retain_term(retain)``

    The retain term is absent when :attr:`retain_term` is ``None``. ``num_items`` maps
    ``"forget"`` and ``"retain"`` to the denominators of the two terms (see
    :meth:`item_counts`; for gradient accumulation pass their totals over the step).

    Used as GRU's *forget* closure (the retain NLL, :func:`nll_loss`, being GRU's retain
    closure). Build one with :func:`get_objective`.
    """

    name: str
    forget_level: Level
    """``"token"``: the forget term is a mean over answer tokens; ``"sequence"``: over
    sequences."""
    forget_needs_reference: bool
    """Whether the forget term needs the reference model's logits on the forget/idk
    batches."""
    retain_term: RetainTerm | None
    """``None``, ``"nll"`` (:func:`nll_loss`) or ``"kl"`` (:func:`retain_kl_loss`)."""
    uses_forget: bool
    """Whether the forget batch (the true answers) enters the loss."""
    uses_idk: bool
    """Whether an "I don't know" batch (refusals to the forget prompts) enters the loss."""
    hparams: Mapping[str, float]
    """Hyperparameters of the forget term (``beta``, ``delta``, ...) and ``alpha``, the
    retain term's coefficient when there is one."""
    description: str
    _forget_fn: _ForgetFn = dataclasses.field(repr=False, compare=False)

    @property
    def needs_reference(self) -> bool:
        """Whether a frozen reference model is needed (by the forget term, or by a KL
        retain term)."""
        return self.forget_needs_reference or self.retain_term == "kl"

    @property
    def includes_retain(self) -> bool:
        """Whether the loss contains a retain term (GradDiff, NPO+RT, ...)."""
        return self.retain_term is not None

    @property
    def retain_needs_reference(self) -> bool:
        """Whether the retain batch needs reference logits (a KL retain term)."""
        return self.retain_term == "kl"

    @property
    def batches(self) -> tuple[str, ...]:
        """The batches the loss reads, among ``"forget"``, ``"idk"``, ``"retain"``."""
        out = []
        if self.uses_forget:
            out.append("forget")
        if self.uses_idk:
            out.append("idk")
        if self.includes_retain:
            out.append("retain")
        return tuple(out)

    @property
    def forget_count_key(self) -> str:
        """Which batch's labels define the forget term's denominator."""
        return "forget" if self.uses_forget else "idk"

    def with_params(self, **hparams: float) -> Objective:
        """A copy with some hyperparameters changed (unknown names raise ``TypeError``)."""
        unknown = set(hparams) - set(self.hparams)
        if unknown:
            raise TypeError(
                f"objective {self.name!r} has no hyperparameter(s) {sorted(unknown)}; "
                f"it has {sorted(self.hparams)}"
            )
        new = dict(self.hparams)
        new.update({k: float(v) for k, v in hparams.items()})
        return dataclasses.replace(self, hparams=MappingProxyType(new))

    def item_counts(
        self,
        forget_labels: Tensor | None = None,
        retain_labels: Tensor | None = None,
        idk_labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The denominators of this batch's terms: ``{"forget": ..., "retain": ...}``.

        ``"forget"`` counts answer tokens (token-level forget term) or sequences
        (sequence-level) of the forget batch, or of the idk batch for IdK-NLL; ``"retain"``
        counts answer tokens of the retain batch. Summed over the micro-batches of a step,
        they make the micro-batch losses add up to the full-batch loss.
        """
        out: dict[str, Tensor] = {}
        labels = forget_labels if self.uses_forget else idk_labels
        if labels is not None:
            if self.forget_level == "token":
                out["forget"] = token_mask(labels).sum()
            else:
                out["forget"] = torch.tensor(labels.shape[0], device=labels.device)
        if retain_labels is not None and self.includes_retain:
            out["retain"] = token_mask(retain_labels).sum()
        return out

    def __call__(
        self,
        forget: LossInputs | None,
        retain: LossInputs | None = None,
        idk: LossInputs | None = None,
        *,
        num_items: Mapping[str, Count] | None = None,
    ) -> Tensor:
        num_items = num_items or {}
        loss = self._forget_fn(forget, idk, self.hparams, num_items.get("forget"))
        if self.retain_term is not None:
            r = _need(retain, "retain", self.name, ref=self.retain_term == "kl")
            n = num_items.get("retain")
            if self.retain_term == "nll":
                term = nll_loss(r.logits, r.labels, num_items=n)
            else:
                term = retain_kl_loss(r.logits, r.ref_logits, r.labels, num_items=n)  # type: ignore[arg-type]
            loss = loss + self.hparams["alpha"] * term
        return loss

    def model_loss(
        self,
        model: Callable[..., Any],
        forget_batch: Mapping[str, Tensor] | None,
        retain_batch: Mapping[str, Tensor] | None = None,
        idk_batch: Mapping[str, Tensor] | None = None,
        *,
        ref_model: Callable[..., Any] | None = None,
        num_items: Mapping[str, Count] | None = None,
    ) -> Tensor:
        """Run the forward passes this objective needs and return its loss.

        Batches are mappings with ``input_ids``, ``labels`` and optionally
        ``attention_mask`` (any other keys are passed to the model too). The model is
        called without ``labels`` and must return an object with ``.logits`` (a Hugging
        Face causal LM) or the logits themselves. ``ref_model`` runs under ``no_grad``.
        Batches the objective does not use are not forwarded.
        """
        if self.needs_reference and ref_model is None:
            raise ValueError(f"objective {self.name!r} needs a reference model (ref_model=...)")

        def run(batch: Mapping[str, Tensor] | None, what: str, ref: bool) -> LossInputs | None:
            if batch is None:
                raise ValueError(f"objective {self.name!r} needs a {what} batch")
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = _logits(model(**inputs))
            ref_logits = None
            if ref:
                with torch.no_grad():
                    ref_logits = _logits(ref_model(**inputs))  # type: ignore[misc]
            return LossInputs(logits, batch["labels"], ref_logits)

        ref = self.forget_needs_reference
        f = run(forget_batch, "forget", ref) if self.uses_forget else None
        i = run(idk_batch, "idk", ref) if self.uses_idk else None
        r = (
            run(retain_batch, "retain", self.retain_needs_reference)
            if self.includes_retain
            else None
        )
        return self(f, r, i, num_items=num_items)


def _logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits: Tensor | None = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None:
        raise TypeError("the model must return logits or an output with .logits")
    return logits


def _make(
    name: str,
    fn: _ForgetFn,
    level: Level,
    needs_ref: bool,
    retain: RetainTerm | None,
    hparams: dict[str, float],
    description: str,
    uses_forget: bool = True,
    uses_idk: bool = False,
) -> Objective:
    hp = dict(hparams)
    if retain is not None:
        hp["alpha"] = 1.0
    return Objective(
        name=name,
        forget_level=level,
        forget_needs_reference=needs_ref,
        retain_term=retain,
        uses_forget=uses_forget,
        uses_idk=uses_idk,
        hparams=MappingProxyType(hp),
        description=description,
        _forget_fn=fn,
    )


def _registry() -> dict[str, Objective]:
    base: list[tuple[str, _ForgetFn, Level, bool, dict[str, float], str, bool, bool]] = [
        ("ga", _ga, "token", False, {}, "gradient ascent", True, False),
        ("npo", _npo, "sequence", True, {"beta": 0.1}, "NPO", True, False),
        ("simnpo", _simnpo, "sequence", False, {"beta": 2.5, "delta": 0.0}, "SimNPO", True, False),
        ("wga", _wga, "token", False, {"beta": 1.0}, "weighted GA", True, False),
        ("satimp", _satimp, "token", False, {"beta1": 5.0, "beta2": 1.0}, "SatImp", True, False),
        ("idk_nll", _idk_nll, "token", False, {}, "NLL on I-don't-know answers", False, True),
        (
            "idk_dpo",
            _idk_dpo,
            "sequence",
            True,
            {"beta": 0.1},
            "DPO: IdK over the answer",
            True,
            True,
        ),
    ]
    out: dict[str, Objective] = {}
    for name, fn, level, ref, hp, desc, uf, ui in base:
        out[name] = _make(name, fn, level, ref, None, hp, desc, uf, ui)
        out[f"{name}_rt"] = _make(
            f"{name}_rt", fn, level, ref, "nll", hp, desc + " + retain NLL", uf, ui
        )
        out[f"{name}_kl"] = _make(
            f"{name}_kl", fn, level, ref, "kl", hp, desc + " + retain KL", uf, ui
        )
    out["graddiff"] = dataclasses.replace(out["ga_rt"], name="graddiff")
    return out


OBJECTIVES: Mapping[str, Objective] = MappingProxyType(_registry())
"""All named objectives. ``<base>`` is the forget term alone, ``<base>_rt`` adds
``alpha *`` retain NLL and ``<base>_kl`` adds ``alpha *`` KL to the reference on the retain
answers, for base in ``ga, npo, simnpo, wga, satimp, idk_nll, idk_dpo``; ``graddiff`` is
``ga_rt`` (gradient difference) and ``ga_kl`` is TOFU's "KL" method."""

_ALIASES = {"grad_diff": "graddiff", "gd": "graddiff", "gradient_ascent": "ga", "kl": "ga_kl"}


def get_objective(name: str, **hparams: float) -> Objective:
    """The objective registered under ``name`` (case-insensitive; see :data:`OBJECTIVES`),
    with ``hparams`` overriding its defaults (e.g. ``get_objective("npo", beta=0.05)``)."""
    key = name.lower().replace("-", "_").replace("+", "_")
    key = _ALIASES.get(key, key)
    if key not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    obj = OBJECTIVES[key]
    return obj.with_params(**hparams) if hparams else obj
