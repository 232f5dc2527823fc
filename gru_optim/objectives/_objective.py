"""One named objective with a uniform call signature (:class:`Objective`) and its
inputs (:class:`LossInputs`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from ._retain import nll_loss, retain_kl_loss
from ._tokens import (
    Count,
    token_mask,
)

__all__ = ["Level", "LossInputs", "Objective", "RetainTerm"]


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
