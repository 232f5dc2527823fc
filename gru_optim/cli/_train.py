"""Loading the model and tokenizer, and one unlearning run through the Trainer:
:class:`~gru_optim.hf.GRUTrainer`, or for ``--no-gru`` the same objective with the
Trainer's own optimizer step."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._config import UsageError

__all__ = ["add_lora", "env_rank", "eval_device", "load_model", "load_tokenizer", "train_run"]

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
"""One of them is in every directory ``tokenizer.save_pretrained`` writes."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}


def _is_local(path: str) -> bool:
    return Path(path).exists()


def _offline_hint(path: str) -> str:
    return (
        f"{path!r} is neither a directory nor a model in the local Hugging Face cache (this "
        "command never downloads): pass a directory saved with save_pretrained, or download "
        f"it first where there is network (huggingface-cli download {path})"
    )


def load_tokenizer(path: str) -> Any:
    """The tokenizer saved with the model (a directory, or a hub id from the local cache
    only). Raises :class:`UsageError` naming the fix when there is none."""
    from transformers import AutoTokenizer

    local = _is_local(path)
    if local and not Path(path).is_dir():
        raise UsageError(f"--model {path} is a file: pass the directory save_pretrained wrote")
    no_tokenizer = UsageError(
        f"--model {path} has no tokenizer: save it there with "
        f"tokenizer.save_pretrained({str(path)!r})"
    )
    if local and not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        raise no_tokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ...
        if not local:
            raise UsageError(_offline_hint(path)) from e
        raise UsageError(
            f"--model {path} has no tokenizer ({type(e).__name__}): save it there with "
            f"tokenizer.save_pretrained({str(path)!r})"
        ) from e
    if len(tok) == 0:  # transformers builds an empty tokenizer from a bare config
        raise no_tokenizer
    if tok.eos_token_id is None:
        raise UsageError(
            f"the tokenizer of {path} has no eos_token: set one and save it "
            "(tokenizer.eos_token = ...; tokenizer.save_pretrained(...))"
        )
    return tok


def load_model(path: str, dtype: str = "float32") -> Any:
    """The causal LM (``AutoModelForCausalLM``) of a directory or of a cached hub id."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_DTYPES[dtype], local_files_only=True
        )
    except Exception as e:
        if not _is_local(path):
            raise UsageError(_offline_hint(path)) from e
        raise UsageError(
            f"--model {path}: no causal language model loads from it ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); save one with "
            "model.save_pretrained"
        ) from e
    return model


def add_lora(model: Any, rank: int, alpha: int | None) -> Any:
    """``model`` with a LoRA adapter of rank ``rank`` on every linear layer (PEFT)."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D layers store their weight transposed
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _plain_trainer_class() -> type:
    from ..hf import ObjectiveTrainer
    from ..objectives import nll_loss

    class _Plain(ObjectiveTrainer):
        """The library's objective trainer without GRU (the baseline: same data, pairing,
        objective and optimizer, the Trainer's own clipping), logging the retain NLL of
        each training batch for the loss plot as GRUTrainer does."""

        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self._retain_log: list[Tensor] = []

        def compute_loss(
            self,
            model: nn.Module,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                with torch.no_grad():
                    r = inputs["retain"]
                    logits = model(input_ids=r["input_ids"], attention_mask=r["attention_mask"])
                    self._retain_log.append(nll_loss(logits.logits, r["labels"]).detach())
            return out

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs and self._retain_log:
                logs["retain_loss"] = round(float(torch.stack(self._retain_log).mean()), 6)
                self._retain_log.clear()
            super().log(logs, *args, **kwargs)

    return _Plain


def _progress_callback(desc: str) -> Any:
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        """A progress bar over the optimizer steps, with the last logged losses."""

        bar: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=desc)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if self.bar is not None and logs and "loss" in logs:
                post = {"loss": f"{logs['loss']:.3f}"}
                if "retain_loss" in logs:
                    post["retain"] = f"{logs['retain_loss']:.3f}"
                self.bar.set_postfix(post)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return _Progress()


def train_run(
    cfg: Mapping[str, Any],
    model: Any,
    tokenizer: Any,
    train_set: Any,
    work_dir: Path,
    *,
    desc: str,
    callbacks: Sequence[Any] = (),
) -> tuple[Any, Any, list[dict[str, float]]]:
    """Unlearn: ``model`` trained on the paired ``train_set`` as ``cfg`` says, checkpoints
    under ``work_dir / "checkpoints"``, resuming from the last one there when there is
    one. Returns the trainer, the trained model (LoRA merged) and the log history."""
    from transformers import PrinterCallback, ProgressCallback, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from ..hf import GRUTrainer

    ckpt_dir = work_dir / "checkpoints"
    steps = cfg["steps"]
    epochs = cfg["epochs"] if cfg["epochs"] is not None else 5.0
    save_steps = cfg["save_steps"]
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["grad_accum"],
        learning_rate=cfg["lr"],
        weight_decay=cfg["weight_decay"],
        lr_scheduler_type="constant",
        max_steps=steps if steps is not None else -1,
        num_train_epochs=epochs,
        max_grad_norm=cfg["max_grad_norm"],
        seed=cfg["seed"],
        data_seed=cfg["seed"],
        bf16=cfg["bf16"],
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps if save_steps < 1 else int(save_steps),
        save_total_limit=1,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        # Pinned host memory only helps copies to an accelerator (torch warns without one).
        dataloader_pin_memory=cfg["device"] != "cpu" and torch.cuda.is_available(),
        use_cpu=cfg["device"] == "cpu",
        deepspeed=cfg["deepspeed"],
    )
    if cfg["lora"] is not None:
        model = add_lora(model, cfg["lora"], cfg["lora_alpha"])
    common: dict[str, Any] = {
        "model": model,
        "args": args,
        "train_dataset": train_set,
        "processing_class": tokenizer,
        "callbacks": [progress := _progress_callback(desc), *callbacks],
    }
    if cfg["no_gru"]:
        from ..data import PairedCollator

        trainer = _plain_trainer_class()(
            data_collator=PairedCollator(tokenizer),
            objective=cfg["method"],
            objective_kwargs=cfg["param"],
            **common,
        )
    else:
        gru: dict[str, Any] = {
            "gamma": cfg["gamma"],
            "directions": cfg["directions"],
            "space": cfg["space"],
            "cos_clip": cfg["cos_clip"],
        }
        trainer = GRUTrainer(
            objective=cfg["method"], objective_kwargs=cfg["param"], gru_kwargs=gru, **common
        )
    trainer.remove_callback(ProgressCallback)  # the bar above replaces them
    trainer.remove_callback(PrinterCallback)
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None  # type: ignore[no-untyped-call]
    try:
        trainer.train(resume_from_checkpoint=last)
    finally:  # interrupted too: the bar ends its line before anything else is printed
        progress.on_train_end(args, trainer.state, trainer.control)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if cfg["lora"] is not None:
        trained = trained.merge_and_unload()
    return trainer, trained, list(trainer.state.log_history)


def eval_device(device: str | None) -> torch.device:
    """Where the model is evaluated before training: ``device`` when given, else this
    process's GPU (``$LOCAL_RANK``) when there is one, else the CPU (the Trainer then
    places it for training)."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def env_rank() -> int:
    """This process's rank under ``torchrun`` / ``accelerate launch`` (0 alone)."""
    return int(os.environ.get("RANK", "0"))
