"""Unlearning Trainer subclasses written in the conventions of locuslab/open-unlearning
(written here from reading that framework, none of its code): a base ``UnlearnTrainer``
taking ``evaluators`` / ``template_args``, and ``GradDiff``, ``NPO`` (frozen reference
model) and ``SimNPO`` whose ``compute_loss(model, inputs, return_outputs=False)`` reads
paired batches ``inputs["forget"]`` / ``inputs["retain"]`` (each ``input_ids``,
``attention_mask``, ``labels``), with the method options as constructor keywords (a Hydra
``method_args`` block): ``gamma`` and ``alpha`` weigh the forget and retain terms.

The tests give them GRU with :class:`gru_optim.hf.GRUMixin` and compare with
``GRUOptimizer.step(forget_closure, retain_closure)`` driven by the same ``compute_loss``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer

IGNORE = -100


def _model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def answer_nll_per_sequence(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Any]:
    """Summed NLL of each sequence's answer tokens (labels other than -100), and the
    model's output."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1, :]
    labels = batch["labels"][:, 1:]
    token_nll = F.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
    )
    return token_nll.sum(dim=-1), out


class UnlearnTrainer(Trainer):
    """The base: what open-unlearning's trainers add to ``transformers.Trainer``."""

    def __init__(
        self, evaluators: Any = None, template_args: Any = None, *args: Any, **kwargs: Any
    ):
        self.evaluators = evaluators
        self.template_args = template_args
        super().__init__(*args, **kwargs)


class GradDiff(UnlearnTrainer):
    """``gamma * (-NLL(forget)) + alpha * NLL(retain)``."""

    def __init__(
        self,
        gamma: float = 1.0,
        alpha: float = 1.0,
        retain_loss_type: str = "NLL",
        *args: Any,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if retain_loss_type != "NLL":
            raise NotImplementedError(f"retain_loss_type={retain_loss_type!r} (only NLL here)")
        self.gamma = gamma
        self.alpha = alpha
        self.retain_loss_type = retain_loss_type
        self.ref_model: nn.Module | None = None

    def make_ref_model(self, model: nn.Module) -> nn.Module:
        ref = copy.deepcopy(model).to(self.args.device)
        ref.eval().requires_grad_(False)
        return ref

    def retain_term(self, model: nn.Module, retain: dict[str, Tensor]) -> Tensor:
        return model(**_model_inputs(retain)).loss

    def compute_loss(self, model, inputs, return_outputs=False):  # type: ignore[no-untyped-def]
        forget_out = model(**_model_inputs(inputs["forget"]))
        loss = -self.gamma * forget_out.loss + self.alpha * self.retain_term(
            model, inputs["retain"]
        )
        return (loss, forget_out) if return_outputs else loss


class NPO(GradDiff):
    """Negative preference optimisation against a frozen copy of the initial model."""

    def __init__(self, beta: float = 1.0, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.beta = beta
        if self.ref_model is None:
            self.ref_model = self.make_ref_model(self.model)

    def compute_loss(self, model, inputs, return_outputs=False):  # type: ignore[no-untyped-def]
        forget = inputs["forget"]
        nll, forget_out = answer_nll_per_sequence(model, forget)
        with torch.no_grad():
            ref_nll, _ = answer_nll_per_sequence(self.ref_model, forget)
        # log pi/pi_ref = ref_nll - nll; NPO: -2/beta * mean log sigmoid(-beta * that)
        forget_loss = -F.logsigmoid(self.beta * (nll - ref_nll)).mean() * 2 / self.beta
        loss = self.gamma * forget_loss + self.alpha * self.retain_term(model, inputs["retain"])
        return (loss, forget_out) if return_outputs else loss


class SimNPO(GradDiff):
    """Reference-free NPO on the length-normalised NLL, with margin ``delta``."""

    def __init__(self, delta: float = 0.0, beta: float = 1.0, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.delta = delta
        self.beta = beta

    def compute_loss(self, model, inputs, return_outputs=False):  # type: ignore[no-untyped-def]
        forget = inputs["forget"]
        nll, forget_out = answer_nll_per_sequence(model, forget)
        lengths = (forget["labels"][:, 1:] != IGNORE).sum(dim=-1)
        margin = nll / lengths - self.delta
        forget_loss = -F.logsigmoid(self.beta * margin).mean() * 2 / self.beta
        loss = self.gamma * forget_loss + self.alpha * self.retain_term(model, inputs["retain"])
        return (loss, forget_out) if return_outputs else loss


TRAINER_REGISTRY: dict[str, type] = {}


def register_trainer(trainer_class: type) -> None:
    """open-unlearning's registry keys a trainer class on its name (the config's
    ``handler``)."""
    TRAINER_REGISTRY[trainer_class.__name__] = trainer_class


for _cls in (GradDiff, NPO, SimNPO):
    register_trainer(_cls)
