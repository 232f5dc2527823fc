"""Hugging Face ``transformers`` integration: :class:`GRUTrainer`."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from ._data import PairedCollator, pad_examples
from ._objectives import Objective, get_objective, nll_loss, token_mask
from ._optimizer import GRUOptimizer

__all__ = ["GRUTrainer", "find_gru_optimizer", "mean_answer_nll"]

_GROUPS = ("forget", "retain", "idk")


def find_gru_optimizer(optimizer: Any) -> GRUOptimizer:
    """The :class:`GRUOptimizer` inside ``optimizer`` (itself, or wrapped by Accelerate's
    ``AcceleratedOptimizer`` or any wrapper exposing ``.optimizer``)."""
    seen = 0
    while not isinstance(optimizer, GRUOptimizer):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or seen > 8:
            raise TypeError(f"no GRUOptimizer inside {type(optimizer).__name__}")
        optimizer, seen = inner, seen + 1
    return optimizer


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


class _PairedEpochCallback(TrainerCallback):
    """Tells the training set which epoch starts (the Trainer's data loader only forwards
    ``set_epoch`` to the dataset on a single process)."""

    def __init__(self, trainer: GRUTrainer) -> None:
        self._trainer = trainer

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        dataset = self._trainer.train_dataset
        if dataset is not None and hasattr(dataset, "set_epoch"):
            dataset.set_epoch(math.floor(state.epoch or 0.0))


class GRUTrainer(Trainer):
    """A ``transformers.Trainer`` that unlearns with GRU and any named objective.

    The training set is a :class:`~gru_optim.data.PairedUnlearningDataset` (items
    ``{"forget": ..., "retain": ..., "idk": ...}``); the default collator is
    :class:`~gru_optim.data.PairedCollator` built from ``processing_class``. Every
    optimizer step:

    1. runs the retain NLL over the retain halves of *all* micro-batches of the step
       inside :meth:`GRUOptimizer.retain_pass` (gradients synchronised across ranks once,
       on the last micro-batch), which updates GRU's retain memory;
    2. runs the objective's loss on each micro-batch (the Trainer's usual loop, with its
       ``no_sync`` handling) and back-propagates it;
    3. steps the :class:`GRUOptimizer` wrapping the Trainer's optimizer, which rectifies
       the accumulated forget gradient against the memory.

    Both losses are normalised by the counts over the whole step (answer tokens, or
    sequences for sequence-level objectives), so gradient accumulation gives the same
    update as one large batch. With ``average_tokens_across_devices`` (the default) and
    several processes the counts are summed over all processes, so that the distributed
    step is the step on the union of the processes' batches; otherwise they are per
    process.

    Args:
        objective: a name from :data:`gru_optim.objectives.OBJECTIVES` or an
            :class:`~gru_optim.objectives.Objective`.
        ref_model: frozen reference model for objectives that need one. ``None``: the
            base model with its adapters disabled for a PEFT model (no copy), otherwise
            a frozen deep copy of ``model`` taken at construction.
        gru_kwargs: keyword arguments of :class:`GRUOptimizer` (``gamma``, ...), used to
            wrap the optimizer the Trainer creates or the one passed in ``optimizers``.
        objective_kwargs: hyperparameters of the objective (``beta``, ``alpha``, ...).

    Everything else is ``transformers.Trainer``'s. ``remove_unused_columns`` is turned
    off (the paired batches are nested). fp16 with a gradient scaler is not supported:
    train in bf16 or fp32.
    """

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
        gru_kwargs: Mapping[str, Any] | None = None,
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
        self.objective: Objective = objective
        self.gru_kwargs: dict[str, Any] = dict(gru_kwargs or {})
        if data_collator is None:
            if processing_class is None:
                raise ValueError(
                    "GRUTrainer needs a data_collator, or a processing_class (tokenizer) to "
                    "build a PairedCollator"
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
        if self.args.fp16 and not self.is_deepspeed_enabled:
            raise ValueError(
                "GRUTrainer does not support fp16 with a gradient scaler; use bf16 (or "
                "DeepSpeed, whose loss scaling GRUDeepSpeed follows)"
            )
        self.args.remove_unused_columns = False
        self.add_callback(_PairedEpochCallback(self))
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
        self._gru_counts: dict[str, Tensor] | None = None
        self._gru_scale = 1.0
        self._gru_log: dict[str, list[Tensor]] = {
            "retain_loss": [],
            "cosine": [],
            "conflict": [],
            "grad_norm": [],
        }

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (or the one passed in), wrapped in :class:`GRUOptimizer`.

        Under DeepSpeed the plain torch optimizer goes to ``deepspeed.initialize`` (ZeRO
        replaces its parameters by flat partitions) and GRU drives the engine instead
        (:class:`gru_optim.deepspeed.GRUDeepSpeed`, see :attr:`gru_optimizer`)."""
        opt = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.is_deepspeed_enabled:
            return opt
        clip = (
            self.args.max_grad_norm
            if self.args.max_grad_norm and self.args.max_grad_norm > 0
            else None
        )
        try:
            # A second train() finds the GRUOptimizer inside Accelerate's wrapper: wrapping
            # that again would rectify twice (the inner one with no retain pass).
            found: GRUOptimizer | None = find_gru_optimizer(opt)
        except TypeError:
            found = None
        if found is None:
            kwargs = dict(self.gru_kwargs)
            kwargs.setdefault("max_grad_norm", clip)
            opt = GRUOptimizer(opt, **kwargs)
            self.optimizer = opt
        elif (opt := found).max_grad_norm is None:
            opt.max_grad_norm = clip
        elif clip is not None and opt.max_grad_norm != clip:
            raise ValueError(
                f"TrainingArguments.max_grad_norm={clip} but the GRUOptimizer clips at "
                f"{opt.max_grad_norm}: set one of them"
            )
        if not getattr(opt, "_gru_trainer_hooked", False):
            opt.register_step_post_hook(self._record_step_stats)
            opt._gru_trainer_hooked = True  # type: ignore[attr-defined]
        assert self.optimizer is not None  # set by Trainer.create_optimizer or above
        return self.optimizer

    def _clip_grad_norm(self, model: nn.Module) -> None:
        """Never clip between backward and the step: GRU clips the rectified gradient
        (``GRUOptimizer(max_grad_norm=args.max_grad_norm)``), as the authors' Trainer
        does. Clipping here would clip the unrectified gradient (and, with a
        ``retain_weight`` term kept in ``.grad``, make the rectification wrong)."""
        return None

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> None:
        """No extra pass over the gradients before the step (the Trainer's would multiply
        them by 1 in place); the logs take ``grad_norm`` from GRU's statistics."""
        return None

    def _record_step_stats(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._record_stats(find_gru_optimizer(optimizer).last_stats)

    def _record_stats(self, stats: Mapping[str, Tensor]) -> None:
        """Keep this step's statistics for the next log (tensors: no host read here)."""
        if not stats:
            return
        rectified = stats["rectified"]
        for key in ("cosine", "conflict"):
            value = stats[key].detach().float()
            self._gru_log[key].append(torch.where(rectified, value, float("nan")))
        if "grad_norm" in stats:
            self._gru_log["grad_norm"].append(stats["grad_norm"].detach().float())

    @property
    def gru_optimizer(self) -> Any:
        """The :class:`GRUOptimizer` (after the optimizer is created); under DeepSpeed the
        :class:`gru_optim.deepspeed.GRUDeepSpeed` driving the engine (DeepSpeed's
        ``gradient_clipping``, ``"auto"``: ``args.max_grad_norm``, clips the rectified
        gradient in the engine's step)."""
        if self.is_deepspeed_enabled:
            gru = getattr(self, "_gru_deepspeed", None)
            if gru is None:
                from .deepspeed import GRUDeepSpeed

                gru = self._gru_deepspeed = GRUDeepSpeed(self.model_wrapped, **self.gru_kwargs)
            return gru
        if self.optimizer is None:
            raise RuntimeError("the optimizer is not created yet (call train() first)")
        return find_gru_optimizer(self.optimizer)

    # ------------------------------------------------------------------ reference
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

    # ------------------------------------------------------------------ the step
    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], Tensor | int | None]:
        """Fetch the micro-batches of one optimizer step, count their items and run GRU's
        retain pass over their retain halves (at the weights of this step)."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            for b in batch_samples:
                if not (isinstance(b, Mapping) and "retain" in b and set(b) <= set(_GROUPS)):
                    keys = sorted(b) if isinstance(b, Mapping) else type(b).__name__
                    raise ValueError(
                        "GRUTrainer trains on paired batches {'forget': ..., 'retain': ...[, "
                        f"'idk': ...]}}, got {keys}: use PairedUnlearningDataset and "
                        "PairedCollator"
                    )
            counts: dict[str, Tensor] = {}
            retain_tokens = torch.zeros((), dtype=torch.long)
            for b in batch_samples:
                labels = {k: b[k]["labels"] for k in _GROUPS if k in b}
                c = self.objective.item_counts(
                    labels.get("forget"), labels.get("retain"), labels.get("idk")
                )
                for k, v in c.items():
                    counts[k] = counts.get(k, 0) + v.cpu()
                retain_tokens = retain_tokens + token_mask(b["retain"]["labels"]).sum().cpu()
            keys = sorted(counts)
            packed = torch.stack([counts[k] for k in keys] + [retain_tokens]).to(device)
            self._gru_scale = 1.0
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # Normalise by the counts of all processes; DDP then averages the
                # gradients, so the loss is scaled by the number of processes.
                packed = self.accelerator.reduce(packed, reduction="sum")
                self._gru_scale = float(self.accelerator.num_processes)
            self._gru_counts = dict(zip(keys, packed[:-1].unbind()))
            self._retain_pass(batch_samples, packed[-1])
        return batch_samples, num_items

    def _retain_pass(self, batch_samples: list[Any], retain_tokens: Tensor) -> None:
        if self.is_deepspeed_enabled:
            self._retain_pass_deepspeed(batch_samples, retain_tokens)
            return
        opt = self.gru_optimizer
        model = self.model_wrapped
        model.train()
        # The step starts here, before training_step: a schedule-free optimizer must be in
        # train mode before the retain pass (GRU refuses it in eval mode, before the fold).
        self._optimizer_train()
        last = len(batch_samples) - 1
        with opt.retain_pass() as rp:
            for k, b in enumerate(batch_samples):
                inputs = self._prepare_inputs(b["retain"])
                sync = (
                    contextlib.nullcontext
                    if k == last
                    else functools.partial(self.accelerator.no_sync, model=model)
                )
                with sync():
                    with self.compute_loss_context_manager():
                        logits = model(**_without_labels(inputs)).logits
                        loss = nll_loss(logits, inputs["labels"], num_items=retain_tokens)
                    self.accelerator.backward(loss * self._gru_scale)
                rp.record(loss)
        assert rp.loss is not None
        self._gru_log["retain_loss"].append(rp.loss)

    def _retain_pass_deepspeed(self, batch_samples: list[Any], retain_tokens: Tensor) -> None:
        """The retain pass through the DeepSpeed engine: ``engine.backward`` per
        micro-batch (``accelerator.backward`` would call ``engine.step()`` after the
        synchronising one); GRUDeepSpeed sets the accumulation boundary itself."""
        engine: Any = self.model_wrapped  # a deepspeed.DeepSpeedEngine
        engine.train()
        total = torch.zeros(())
        # the epoch's last step may have fewer micro-batches than accumulation steps
        with self.gru_optimizer.retain_pass(micro_batches=len(batch_samples)):
            for b in batch_samples:
                inputs = self._prepare_inputs(b["retain"])
                with self.compute_loss_context_manager():
                    logits = engine(**_without_labels(inputs)).logits
                    loss = nll_loss(logits, inputs["labels"], num_items=retain_tokens)
                # normalised over the whole step already: DeepSpeed must not divide
                engine.backward(loss * self._gru_scale, scale_wrt_gas=False)
                total = total + loss.detach().cpu()
        self._gru_log["retain_loss"].append(total)

    def _optimizer_train(self) -> None:
        """Put the optimizer in train mode where it has one (schedule-free optimizers;
        ``GRUOptimizer`` forwards ``train()`` to the optimizer it wraps), as the Trainer's
        own ``training_step`` does."""
        if (
            self.optimizer is not None
            and hasattr(self.optimizer, "train")
            and callable(self.optimizer.train)
        ):
            self.optimizer.train()

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Forward and backward of the objective on one micro-batch, normalised by the
        counts of the whole optimizer step. Returns the (detached) micro-batch loss; they
        add up to the step's loss. Under DeepSpeed the step's last micro-batch also runs
        GRU's step (rectify, then the engine's step)."""
        if self.is_deepspeed_enabled:
            model.train()
            inputs = self._prepare_inputs(inputs)
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            cast(Any, self.model_wrapped).backward(loss, scale_wrt_gas=False)
            if self.accelerator.sync_gradients:
                gru = self.gru_optimizer
                gru.step()
                self._record_stats(gru.last_stats)
            return loss.detach()  # type: ignore[union-attr]
        model.train()
        self._optimizer_train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            # return_outputs=False: compute_loss returns the loss alone
            loss = cast(
                Tensor, self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            )
        self.accelerator.backward(loss)
        return loss.detach()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The objective's loss on a paired batch. In training it is normalised by the
        counts of the current optimizer step (set by :meth:`get_batch_samples`);
        otherwise by this batch's own counts. ``num_items_in_batch`` (the Trainer's count
        of a top-level ``labels`` key) does not apply to paired batches and is ignored."""
        counts = self._gru_counts if model.training else None
        ref = self._reference(model) if self.objective.needs_reference else None
        loss = self.objective.model_loss(
            model,
            inputs.get("forget"),
            inputs.get("retain"),
            inputs.get("idk"),
            ref_model=ref,
            num_items=counts,
        )
        if counts is not None and self._gru_scale != 1.0:
            loss = loss * self._gru_scale
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
            int(super(GRUTrainer, self).floating_point_ops(inputs[k]))
            for k in _GROUPS
            if k in inputs
        )

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds ``retain_loss`` (the retain NLL, mean since the last log), GRU's
        ``gru_cosine`` / ``gru_conflict`` (cosine between forget gradient and retain memory,
        fraction of rectified steps with a conflict; means over the rectified steps since
        the last log) and, with ``max_grad_norm``, ``grad_norm`` (the last step's final
        gradient norm before GRU clipped it) to the training logs. One host read per
        log."""
        if "loss" in logs:
            for key, name in (
                ("retain_loss", "retain_loss"),
                ("cosine", "gru_cosine"),
                ("conflict", "gru_conflict"),
            ):
                values = self._gru_log[key]
                if values:
                    logs[name] = round(float(torch.stack([v.cpu() for v in values]).nanmean()), 6)
                    values.clear()
            norms = self._gru_log["grad_norm"]
            if norms:
                logs["grad_norm"] = round(float(norms[-1]), 6)
                norms.clear()
        super().log(logs, *args, **kwargs)
