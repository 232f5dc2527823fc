"""The library's objective trainer and :class:`GRUTrainer` (= :class:`GRUMixin` over it)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from ..._data import PairedCollator, PairedUnlearningDataset, pad_examples
from ...objectives import Objective, get_objective, nll_loss, token_mask
from ._mixin import GRUMixin

__all__ = ["GRUTrainer", "ObjectiveTrainer", "mean_answer_nll"]

_GROUPS = ("forget", "retain", "idk")


def _without_labels(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def mean_answer_nll(
    model: nn.Module,
    examples: Sequence[Mapping[str, Any]],
    pad_token_id: int,
    *,
    batch_size: int = 16,
) -> float:
    """Token-mean NLL of the answers (labels other than ``-100``) of ``examples`` under
    ``model`` (a causal LM returning ``.logits``), in eval mode, restoring the mode after."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = pad_examples(examples[start : start + batch_size], pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**_without_labels(batch)).logits
            n = int(token_mask(batch["labels"]).sum())
            total += nll_loss(logits, batch["labels"]).double().cpu() * n
            count += n
    finally:
        model.train(was_training)
    return float(total / max(count, 1))


def _idk_missing(objective: Objective) -> str:
    return (
        f"objective {objective.name!r} trains on refusals to the forget prompts: give them as "
        "PairedUnlearningDataset(forget, retain, idk=[encode_example(tokenizer, prompt, "
        "' I don't know.') for each forget prompt]), aligned with the forget examples"
    )


class ObjectiveTrainer(Trainer):
    """A Trainer whose ``compute_loss`` is a named objective of
    :mod:`gru_optim.objectives` on paired batches ``{"forget", "retain"[, "idk"]}``.

    In training the loss is normalised by the counts of the whole optimizer step (answer
    tokens, or sequences for sequence-level objectives), set by
    :meth:`begin_accumulated_step` (GRUTrainer's :class:`GRUMixin` calls it every step), so
    the micro-batch losses add up to the loss of the step's union batch:
    ``loss_is_scaled_for_ga``. With ``average_tokens_across_devices`` on several processes
    the counts are summed over all processes (and the loss multiplied by their number,
    which the gradient averaging divides back). Without the mixin (no
    :meth:`begin_accumulated_step` calls) each micro-batch is normalised by its own counts:
    the plain baseline GRU is compared with (same data, pairing, objective, optimizer)."""

    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        data_collator: Callable[..., Any] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        objective: str | Objective = "graddiff",
        ref_model: nn.Module | None = None,
        objective_kwargs: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(objective, str):
            objective = get_objective(objective, **dict(objective_kwargs or {}))
        elif isinstance(objective, Objective) and objective_kwargs:
            objective = objective.with_params(**objective_kwargs)
        if not isinstance(objective, Objective):
            raise TypeError(
                f"objective must be a name or an Objective, got {type(objective).__name__}"
            )
        if (
            objective.uses_idk
            and isinstance(train_dataset, PairedUnlearningDataset)
            and train_dataset.idk is None
        ):
            raise ValueError(_idk_missing(objective))
        self.objective: Objective = objective
        if data_collator is None:
            if processing_class is None:
                raise ValueError(
                    f"{type(self).__name__} needs a data_collator, or a processing_class "
                    "(tokenizer) to build a PairedCollator"
                )
            data_collator = PairedCollator(processing_class)
        super().__init__(
            model,
            args,
            data_collator,
            train_dataset,
            eval_dataset,
            processing_class,
            **kwargs,
        )
        self.args.remove_unused_columns = False  # the paired batches are nested
        self.ref_model: nn.Module | None = None
        self._ref_uses_adapters = False
        if self.objective.needs_reference:
            if ref_model is not None:
                self.ref_model = ref_model
            elif hasattr(self.model, "disable_adapter") and hasattr(self.model, "peft_config"):
                self._ref_uses_adapters = True
            else:
                self.ref_model = copy.deepcopy(self.model)
            if self.ref_model is not None:
                self.ref_model.eval().requires_grad_(False)
                self.ref_model.to(self.args.device)
        self._step_counts: dict[str, Tensor] | None = None
        self._step_scale = 1.0

    def begin_accumulated_step(self, micro_batches: Sequence[Mapping[str, Any]]) -> None:
        """Count the step's items (over its micro-batches, and over processes with
        ``average_tokens_across_devices``): the denominators of the training losses until
        the next call."""
        counts: dict[str, Tensor] = {}
        for b in micro_batches:
            if self.objective.uses_idk and "idk" not in b:
                raise ValueError(_idk_missing(self.objective))
            labels = {k: b[k]["labels"] for k in _GROUPS if k in b}
            c = self.objective.item_counts(
                labels.get("forget"), labels.get("retain"), labels.get("idk")
            )
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
        keys = sorted(counts)
        packed = torch.stack([counts[k] for k in keys]).to(self.args.device)
        self._step_scale = 1.0
        if getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1:
            packed = self.accelerator.reduce(packed, reduction="sum")
            self._step_scale = float(self.accelerator.num_processes)
        self._step_counts = dict(zip(keys, packed.unbind()))

    def _reference(self, model: nn.Module) -> Callable[..., Any]:
        """The reference model's forward (no grad, eval mode)."""
        if self._ref_uses_adapters:
            peft_model = self.accelerator.unwrap_model(model)

            def forward(**inputs: Tensor) -> Any:
                was_training = peft_model.training
                peft_model.eval()
                try:
                    with torch.no_grad(), peft_model.disable_adapter():
                        return peft_model(**inputs)
                finally:
                    peft_model.train(was_training)

            return forward
        ref = self.ref_model

        def forward_ref(**inputs: Tensor) -> Any:
            with torch.no_grad():
                return ref(**inputs)  # type: ignore[misc]

        return forward_ref

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The objective's loss on a paired batch. In training it is normalised by the
        counts of the current optimizer step (:meth:`begin_accumulated_step`); otherwise
        by this batch's own counts. ``num_items_in_batch`` (the Trainer's count of a
        top-level ``labels`` key) does not apply to paired batches and is ignored."""
        if self.objective.uses_idk and "idk" not in inputs:
            raise ValueError(_idk_missing(self.objective))
        counts = self._step_counts if model.training else None
        ref = self._reference(model) if self.objective.needs_reference else None
        loss = self.objective.model_loss(
            model,
            inputs.get("forget"),
            inputs.get("retain"),
            inputs.get("idk"),
            ref_model=ref,
            num_items=counts,
        )
        if counts is not None and self._step_scale != 1.0:
            loss = loss * self._step_scale
        return (loss, None) if return_outputs else loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Evaluation: the objective's loss on a paired batch (no logits, no labels)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return (loss.detach(), None, None)  # type: ignore[union-attr]

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Sum of the model's estimate over the sub-batches of a paired batch."""
        return sum(
            int(super(ObjectiveTrainer, self).floating_point_ops(inputs[k]))
            for k in _GROUPS
            if k in inputs
        )


class GRUTrainer(GRUMixin, ObjectiveTrainer):
    """A ``transformers.Trainer`` that unlearns with GRU and any named objective: the
    library's objective trainer with :class:`~gru_optim.hf.GRUMixin` (one mechanism for
    both; see the mixin for what each optimizer step does).

    The training set is a :class:`~gru_optim.data.PairedUnlearningDataset` (items
    ``{"forget": ..., "retain": ..., "idk": ...}``); the default collator is
    :class:`~gru_optim.data.PairedCollator` built from ``processing_class``. The retain
    pass is the retain NLL; the objective's loss and the retain NLL are both normalised by
    the counts over the whole step (answer tokens, or sequences for sequence-level
    objectives), so gradient accumulation gives the same update as one large batch. With
    ``average_tokens_across_devices`` (the default) and several processes the counts are
    summed over all processes, so that the distributed step is the step on the union of
    the processes' batches; otherwise they are per process.

    Keywords, besides the Trainer's:

    - ``objective``: a name from :data:`gru_optim.objectives.OBJECTIVES` or an
      :class:`~gru_optim.objectives.Objective` (default ``"graddiff"``).
    - ``ref_model``: frozen reference model for objectives that need one. ``None``: the
      base model with its adapters disabled for a PEFT model (no copy), otherwise a frozen
      deep copy of ``model`` taken at construction.
    - ``gru_kwargs``: keyword arguments of :class:`GRUOptimizer` (``gamma``, ...), used to
      wrap the optimizer the Trainer creates or the one passed in ``optimizers`` (or, one
      by one, ``gru_gamma=...``).
    - ``objective_kwargs``: hyperparameters of the objective (``beta``, ``alpha``, ...).

    Everything else is ``transformers.Trainer``'s. ``remove_unused_columns`` is turned
    off (the paired batches are nested). fp16 with a gradient scaler is not supported:
    train in bf16 or fp32.
    """

    def gru_begin_step(self, micro_batches: list[Any]) -> None:
        """The objective's denominators are the counts of the whole step."""
        self.begin_accumulated_step(micro_batches)
