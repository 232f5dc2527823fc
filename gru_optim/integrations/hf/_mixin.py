"""GRU for any ``transformers.Trainer`` subclass: :class:`GRUMixin` and :func:`with_gru`."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from ..._optimizer import GRUOptimizer
from ...objectives import nll_loss, token_mask
from ._compat import TRAINER_CLIPS_IN_A_METHOD, accepts_keyword

__all__ = ["GRUMixin", "find_gru_optimizer", "gru_option_names", "with_gru"]

#: The options of :class:`~gru_optim.deepspeed.GRUDeepSpeed` (under DeepSpeed the mixin
#: drives the engine with it; the other GRUOptimizer options do not apply there).
_DEEPSPEED_OPTIONS = frozenset(
    ("gamma", "retain_weight", "granularity", "max_grad_norm", "cos_clip", "directions")
    + ("rule", "ema_dtype")
)


@functools.cache
def gru_option_names() -> tuple[str, ...]:
    """The keyword options of :class:`~gru_optim.GRUOptimizer` (``gamma``, ``space``, ...):
    each is a :class:`GRUMixin` constructor keyword with the prefix ``gru_``."""
    params = inspect.signature(GRUOptimizer.__init__).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)


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


def _split_options(
    kwargs: dict[str, Any], gru_kwargs: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(GRU options, everything else)`` from the constructor's keywords: ``gru_<option>``
    keywords and the ``gru_kwargs`` mapping are GRU's, the rest is the wrapped class's."""
    names = gru_option_names()
    valid = ", ".join(f"gru_{n}" for n in names)
    options = dict(gru_kwargs or {})
    for name in options:
        if name not in names:
            raise TypeError(f"gru_kwargs: GRUOptimizer has no option {name!r}; it has {names}")
    rest: dict[str, Any] = {}
    for key, value in kwargs.items():
        if not key.startswith("gru_"):
            rest[key] = value
            continue
        name = key[len("gru_") :]
        if name not in names:
            raise TypeError(f"unknown GRU option {key}=...; the GRU options are {valid}")
        if name in options:
            raise TypeError(f"GRU option {name!r} given twice, as {key}= and in gru_kwargs")
        options[name] = value
    dtype = options.get("ema_dtype")
    if isinstance(dtype, str):  # from a config file: "bfloat16", "torch.float32", ...
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"gru_ema_dtype={dtype!r} is not a torch dtype")
        options["ema_dtype"] = resolved
    return options, rest


class _GRUCallback(TrainerCallback):
    """Keeps the mixin's per-epoch bookkeeping and tells a training set with ``set_epoch``
    which epoch starts (the Trainer's data loader forwards ``set_epoch`` to the dataset
    only on a single process)."""

    def __init__(self, trainer: GRUMixin) -> None:
        self._trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trainer._gru_micro.clear()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self._trainer
        trainer._gru_epoch_seen = 0
        loader = kwargs.get("train_dataloader")
        try:
            trainer._gru_epoch_len = len(loader) if loader is not None else None
        except TypeError:  # an iterable data set has no length
            trainer._gru_epoch_len = None
        dataset = getattr(trainer, "train_dataset", None)
        if dataset is not None and hasattr(dataset, "set_epoch"):
            dataset.set_epoch(math.floor(state.epoch or 0.0))


class GRUMixin:
    """GRU for any ``transformers.Trainer`` subclass: list it first among the bases,
    ``class GRUNPO(GRUMixin, NPO): ...`` (or use :func:`with_gru`).

    The wrapped class's ``compute_loss`` stays the objective; GRU rectifies its gradient
    against a retain memory. Every optimizer step (after gradient accumulation):

    1. the step's micro-batches are collected (nothing runs for the earlier ones; the
       Trainer's loss log receives the step's loss on its last micro-batch);
    2. the retain pass: :meth:`gru_retain_loss` on each micro-batch (by default the NLL of
       ``inputs["retain"]``, normalised by the answer tokens of the whole step) is
       back-propagated inside :meth:`GRUOptimizer.retain_pass`, which folds the retain
       gradient of the step into the memory (under DDP the gradients are synchronised
       once, on the last micro-batch);
    3. the objective: the wrapped class's ``compute_loss`` on each micro-batch, divided by
       the number of micro-batches (as the Trainer does; not when the loss says it is
       already normalised over the step, ``loss_is_scaled_for_ga``), back-propagated;
    4. the Trainer steps its optimizer, the one it built from ``args.optim`` (or was
       given) wrapped in :class:`GRUOptimizer`, which rectifies the accumulated gradient
       and then clips it to ``args.max_grad_norm`` (the Trainer itself no longer clips:
       clipping before the rectification would clip the wrong gradient).

    Under DeepSpeed (ZeRO 0-3) the same passes run through the engine and
    :class:`~gru_optim.deepspeed.GRUDeepSpeed` rectifies the reduced gradient shards
    before the engine's step; DeepSpeed's ``gradient_clipping`` (``"auto"``:
    ``args.max_grad_norm``) clips the rectified gradient.

    Keywords: every :class:`GRUOptimizer` option with the prefix ``gru_`` (``gru_gamma=
    0.8``, ``gru_directions=4``, ``gru_space="update"``, ... :func:`gru_option_names`), or
    all of them as one mapping ``gru_kwargs={...}``; ``gru_ema_dtype`` also takes a name
    (``"bfloat16"``). Every other keyword goes to the wrapped class unchanged (the loss
    weights ``gamma`` / ``alpha`` of an unlearning trainer are its own).

    Override :meth:`gru_retain_loss` (and :meth:`gru_retain_items`) to choose another
    retain batch or loss. fp16 with a gradient scaler is not supported outside DeepSpeed:
    train in bf16 or fp32.
    """

    # Attributes of transformers.Trainer the mixin reads (for the type checker).
    args: Any
    accelerator: Any
    model: Any
    model_wrapped: Any
    optimizer: Any
    is_deepspeed_enabled: bool

    def __init__(
        self, *args: Any, gru_kwargs: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not isinstance(self, Trainer):
            raise TypeError(
                f"GRUMixin goes first among the bases of a transformers.Trainer subclass "
                f"(class GRU{type(self).__name__}(GRUMixin, {type(self).__name__})), or use "
                "gru_optim.hf.with_gru(TrainerClass)"
            )
        options, rest = _split_options(kwargs, gru_kwargs)
        self.gru_options: dict[str, Any] = options
        self._gru_micro: list[tuple[Any, Any]] = []
        self._gru_epoch_seen = 0
        self._gru_epoch_len: int | None = None
        self._gru_deepspeed: Any = None
        self._gru_log: dict[str, list[Tensor]] = {
            "retain_loss": [],
            "cosine": [],
            "conflict": [],
            "grad_norm": [],
        }
        super().__init__(*args, **rest)
        if self.args.fp16 and not self.is_deepspeed_enabled:
            raise ValueError(
                f"{type(self).__name__} (GRU) does not support fp16 with a gradient scaler; "
                "use bf16 (or DeepSpeed, whose loss scaling GRUDeepSpeed follows)"
            )
        self._gru_check_options()
        clip = self.args.max_grad_norm if (self.args.max_grad_norm or 0) > 0 else None
        own = options.get("max_grad_norm")
        if own is not None and clip is not None and own != clip:
            raise ValueError(
                f"TrainingArguments.max_grad_norm={clip} but gru_max_grad_norm={own}: both "
                "clip the rectified gradient before the step, set one of them"
            )
        self._gru_clip: float | None = own if own is not None else clip
        if not TRAINER_CLIPS_IN_A_METHOD and not self.is_deepspeed_enabled:
            # transformers < 5 clips inline, between the last backward and the step, when
            # args.max_grad_norm > 0: GRU clips the rectified gradient instead.
            self.args.max_grad_norm = 0.0
        cast_self: Any = self
        cast_self.add_callback(_GRUCallback(self))

    def _gru_check_options(self) -> None:
        """Refuse bad GRU options now, not at the first step."""
        options = self.gru_options
        if self.is_deepspeed_enabled:
            extra = sorted(set(options) - _DEEPSPEED_OPTIONS)
            if extra:
                raise ValueError(
                    f"under DeepSpeed GRU drives the engine (GRUDeepSpeed), which has no "
                    f"option(s) {', '.join('gru_' + n for n in extra)}"
                )
            return
        probe = torch.zeros(1, requires_grad=True)
        GRUOptimizer(torch.optim.SGD([probe], lr=0.0), **options)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The wrapped class's optimizer (built from ``args.optim``, or the one passed in
        ``optimizers``) wrapped in :class:`GRUOptimizer` with this trainer's GRU options
        and ``max_grad_norm``. Under DeepSpeed the plain optimizer goes to
        ``deepspeed.initialize`` and GRU drives the engine (:attr:`gru_optimizer`)."""
        opt = super().create_optimizer(*args, **kwargs)  # type: ignore[misc]
        if self.is_deepspeed_enabled:
            return opt  # type: ignore[no-any-return]
        try:
            # A second train() finds the GRUOptimizer inside Accelerate's wrapper: wrapping
            # that again would rectify twice (the inner one with no retain pass).
            found: GRUOptimizer | None = find_gru_optimizer(opt)
        except TypeError:
            found = None
        if found is None:
            options = dict(self.gru_options)
            options["max_grad_norm"] = self._gru_clip
            opt = GRUOptimizer(opt, **options)
            self.optimizer = opt
        elif (opt := found).max_grad_norm is None:
            opt.max_grad_norm = self._gru_clip
        elif self._gru_clip is not None and opt.max_grad_norm != self._gru_clip:
            raise ValueError(
                f"TrainingArguments.max_grad_norm={self._gru_clip} but the GRUOptimizer "
                f"clips at {opt.max_grad_norm}: set one of them"
            )
        # This trainer records its steps through one hook on the optimizer it drives (kept
        # here, not marked on the optimizer: another trainer may drive it later).
        if self.__dict__.get("_gru_hooked") is not opt:
            opt.register_step_post_hook(self._gru_record_step)
            self._gru_hooked = opt
        return self.optimizer  # type: ignore[no-any-return]

    def _clip_grad_norm(self, model: nn.Module) -> None:
        """Never clip between backward and the step (transformers 5): GRU clips the
        rectified gradient (``GRUOptimizer(max_grad_norm=args.max_grad_norm)``)."""
        return None

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> None:
        """No extra pass over the gradients before the step (transformers 5); the logs
        take ``grad_norm`` from GRU's statistics."""
        return None

    @property
    def gru_optimizer(self) -> Any:
        """The :class:`GRUOptimizer` (after the optimizer is created); under DeepSpeed the
        :class:`gru_optim.deepspeed.GRUDeepSpeed` driving the engine."""
        if self.is_deepspeed_enabled:
            if self._gru_deepspeed is None:
                from ..deepspeed import GRUDeepSpeed

                self._gru_deepspeed = GRUDeepSpeed(self.model_wrapped, **self.gru_options)
            return self._gru_deepspeed
        if self.optimizer is None:
            raise RuntimeError("the optimizer is not created yet (call train() first)")
        return find_gru_optimizer(self.optimizer)

    # ------------------------------------------------------------------ hooks
    def gru_begin_step(self, micro_batches: list[Any]) -> None:
        """Called once per optimizer step, before the retain pass, with the step's
        micro-batches as collated. The default does nothing."""

    def gru_retain_items(self, inputs: Mapping[str, Any]) -> Tensor:
        """The retain loss's denominator contributed by one micro-batch: the number of
        answer tokens (labels other than ``-100``, after the causal shift) of
        ``inputs["retain"]``. Summed over the step's micro-batches (and over processes,
        with ``average_tokens_across_devices``) it is the ``num_items`` of
        :meth:`gru_retain_loss`."""
        retain = inputs.get("retain") if isinstance(inputs, Mapping) else None
        if not isinstance(retain, Mapping) or "labels" not in retain:
            keys = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            hint = (
                " (an empty batch: with remove_unused_columns=True the Trainer drops the "
                "'forget'/'retain' keys, set it to False)"
                if isinstance(inputs, Mapping) and not inputs
                else ""
            )
            raise ValueError(
                f"{type(self).__name__} (GRU) trains on paired batches {{'forget': ..., "
                f"'retain': {{'input_ids', 'attention_mask', 'labels'}}, ...}}, got {keys}: "
                "use gru_optim.data.PairedUnlearningDataset and PairedCollator (or your "
                "framework's forget/retain dataset), or override gru_retain_loss and "
                f"gru_retain_items to say where the retain batch is{hint}"
            )
        return token_mask(retain["labels"]).sum()

    def gru_retain_loss(
        self, model: nn.Module, inputs: Mapping[str, Any], num_items: Tensor
    ) -> Tensor:
        """The retain loss of one micro-batch, whose gradient (summed over the step's
        micro-batches) GRU folds into its memory: the NLL of ``inputs["retain"]``'s answer
        tokens, summed and divided by ``num_items`` (the step's count from
        :meth:`gru_retain_items`), so that the step's retain gradient is the mean over all
        its answer tokens whatever the accumulation. Override to use another batch or
        loss (keep the normalisation over the step)."""
        retain = inputs["retain"]
        out = model(**{k: v for k, v in retain.items() if k != "labels"})
        logits = out.logits if hasattr(out, "logits") else out
        return nll_loss(logits, retain["labels"], num_items=num_items)

    # ------------------------------------------------------------------ the step
    def training_step(self, model: nn.Module, inputs: Any, *rest: Any, **kwargs: Any) -> Tensor:
        """Collect the step's micro-batches; on its last one, run the GRU step's passes
        (the retain pass, then the objective on every micro-batch) and return the step's
        loss (the earlier micro-batches return 0: the logged sum is the same)."""
        num_items = rest[0] if rest else kwargs.get("num_items_in_batch")
        self._gru_micro.append((inputs, num_items))
        self._gru_epoch_seen += 1
        if not self._gru_step_ends():
            return torch.zeros((), device=self.args.device)
        micro, self._gru_micro = list(self._gru_micro), []
        return self._gru_step(model, micro)

    def _gru_step_ends(self) -> bool:
        """Whether the micro-batch just collected is the step's last: the Trainer syncs
        after it, or (transformers 4.45, which says so only after ``training_step``) it
        ends an epoch shorter than one accumulation."""
        if self.accelerator.sync_gradients:
            return True
        n = self._gru_epoch_len
        return (
            n is not None
            and n <= self.args.gradient_accumulation_steps
            and self._gru_epoch_seen == n
        )

    def _gru_reduce_count(self, count: Tensor) -> tuple[Tensor, float]:
        """``(count, loss scale)``: with ``average_tokens_across_devices`` on several
        processes the count is summed over them and the loss multiplied by their number
        (DDP and DeepSpeed average the gradients)."""
        if getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1:
            return self.accelerator.reduce(count, reduction="sum"), float(
                self.accelerator.num_processes
            )
        return count, 1.0

    def _gru_loss_is_scaled(self, num_items: Any) -> bool:
        """Whether ``compute_loss`` already normalised its loss over the step (the Trainer's
        rule, transformers 5: ``loss_is_scaled_for_ga``, else a loss normalised by
        ``num_items_in_batch`` or a ``compute_loss_func``)."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def _gru_objective(self, model: nn.Module, inputs: Any, num_items: Any, n_micro: int) -> Tensor:
        """The wrapped class's ``compute_loss`` on one micro-batch, scaled as the Trainer
        scales it for gradient accumulation."""
        cast_self: Any = self
        compute_loss = cast_self.compute_loss
        with cast_self.compute_loss_context_manager():
            if num_items is not None and accepts_keyword(compute_loss, "num_items_in_batch"):
                loss = compute_loss(model, inputs, num_items_in_batch=num_items)
            else:
                loss = compute_loss(model, inputs)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        if not self._gru_loss_is_scaled(num_items):
            loss = loss / n_micro
        return loss  # type: ignore[no-any-return]

    def _gru_step(self, model: nn.Module, micro: list[tuple[Any, Any]]) -> Tensor:
        cast_self: Any = self
        counts = [self.gru_retain_items(b) for b, _ in micro]  # checks the batches first
        prepared = [(cast_self._prepare_inputs(b), n) for b, n in micro]
        batches = [b for b, _ in prepared]
        local = torch.stack([c.to(self.args.device) for c in counts])
        self.gru_begin_step(batches)
        retain_items, scale = self._gru_reduce_count(local.sum())
        model.train()
        if (
            self.optimizer is not None
            and hasattr(self.optimizer, "train")
            and callable(self.optimizer.train)
        ):
            self.optimizer.train()
        if self.is_deepspeed_enabled:
            return self._gru_step_deepspeed(model, prepared, retain_items, scale)
        last = len(prepared) - 1

        def sync(k: int) -> contextlib.AbstractContextManager[Any]:
            return contextlib.nullcontext() if k == last else self.accelerator.no_sync(model)

        opt = self.gru_optimizer
        with opt.retain_pass() as rp:
            for k, b in enumerate(batches):
                with sync(k):
                    with cast_self.compute_loss_context_manager():
                        loss = self.gru_retain_loss(model, b, retain_items)
                    torch.autograd.backward(loss * scale if scale != 1.0 else loss)
                rp.record(loss.detach())
        assert rp.loss is not None
        self._gru_log["retain_loss"].append(rp.loss)
        total = torch.zeros((), device=self.args.device)
        for k, (b, n) in enumerate(prepared):
            with sync(k):
                loss = self._gru_objective(model, b, n, len(prepared))
                torch.autograd.backward(loss)
            total = total + loss.detach()
        return total

    def _gru_step_deepspeed(
        self, engine: Any, prepared: list[tuple[Any, Any]], retain_items: Tensor, scale: float
    ) -> Tensor:
        """The same passes through the DeepSpeed engine (``engine.backward`` per
        micro-batch, normalised here: ``scale_wrt_gas=False``), then GRUDeepSpeed's step
        (rectify, then the engine's step)."""
        cast_self: Any = self
        gru = self.gru_optimizer
        n = len(prepared)
        retain_total = torch.zeros(())
        with gru.retain_pass(micro_batches=n):
            for b, _ in prepared:
                with cast_self.compute_loss_context_manager():
                    loss = self.gru_retain_loss(engine, b, retain_items)
                engine.backward(loss * scale, scale_wrt_gas=False)
                retain_total = retain_total + loss.detach().cpu()
        self._gru_log["retain_loss"].append(retain_total)
        total = torch.zeros((), device=self.args.device)
        for b, k in prepared:
            loss = self._gru_objective(engine, b, k, n)
            engine.backward(loss, scale_wrt_gas=False)
            total = total + loss.detach()
        gru.step()
        self._gru_record(gru.last_stats)
        return total

    # ------------------------------------------------------------------ logging
    def _gru_record_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._gru_record(find_gru_optimizer(optimizer).last_stats)

    def _gru_record(self, stats: Mapping[str, Tensor]) -> None:
        """Keep this step's statistics for the next log (tensors: no host read here)."""
        if not stats:
            return
        rectified = stats["rectified"]
        for key in ("cosine", "conflict"):
            value = stats[key].detach().float()
            self._gru_log[key].append(torch.where(rectified, value, float("nan")))
        if "grad_norm" in stats:
            self._gru_log["grad_norm"].append(stats["grad_norm"].detach().float())

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds ``retain_loss`` (the retain pass's loss, mean since the last log), GRU's
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
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


_T = TypeVar("_T", bound=type)


def with_gru(trainer_class: _T) -> _T:
    """``class GRU<Name>(GRUMixin, trainer_class)``: the Trainer subclass with GRU, named
    for registries (open-unlearning's ``_register_trainer`` keys on ``__name__``)."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"with_gru takes a transformers.Trainer subclass, got {trainer_class!r}")
    if issubclass(trainer_class, GRUMixin):
        raise TypeError(f"{trainer_class.__name__} already has GRU (GRUMixin)")
    name = f"GRU{trainer_class.__name__}"
    cls = type(
        name,
        (GRUMixin, trainer_class),
        {
            "__module__": trainer_class.__module__,
            "__qualname__": name,
            "__doc__": f"{trainer_class.__name__} with GRU (:class:`gru_optim.hf.GRUMixin`).",
        },
    )
    return cls  # type: ignore[return-value]
