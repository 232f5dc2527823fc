"""GRUMixin on Trainer subclasses written in open-unlearning's conventions
(tests/_unlearn_trainers.py), on a real tiny GPT-2: the Trainer's weights after several
steps equal a plain loop of ``GRUOptimizer.step(forget_closure, retain_closure)`` driven
by the same ``compute_loss``, data and inner optimizer (float32 rounding), with gradient
accumulation, with clipping, and (tests/_deepspeed_workers.py) under ZeRO-3 on two gloo
processes. Runs on transformers 5.x and on the floor, 4.45 (make test-hf-floor)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from _tiny_models import FORGET_AUTHORS, RETAIN_AUTHORS, qa_examples, tiny_model, tiny_tokenizer
from _unlearn_trainers import NPO, TRAINER_REGISTRY, GradDiff, SimNPO, register_trainer
from transformers import Trainer, TrainingArguments

from gru_optim import GRUOptimizer
from gru_optim.data import PairedCollator, PairedUnlearningDataset
from gru_optim.hf import GRUMixin, GRUTrainer, gru_option_names, with_gru
from gru_optim.objectives import nll_loss, token_mask

PAD = tiny_tokenizer().pad_token_id
FP32 = 2e-6  # float32 rounding after a few steps of weights of size ~0.1


def training_args(out: Path, **overrides: Any) -> TrainingArguments:
    kw: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 3,
        "learning_rate": 0.05,
        "optim": "sgd",
        "max_grad_norm": 0.0,
        "lr_scheduler_type": "constant",
        "report_to": [],
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,  # as open-unlearning's configs/unlearn.yaml
    }
    kw.update(overrides)
    return TrainingArguments(**kw)


def paired_set() -> PairedUnlearningDataset:
    # 4 forget examples: every optimizer step of the cases below is a whole one (transformers
    # 4.45 and 5.x split an epoch's remainder differently)
    return PairedUnlearningDataset(qa_examples(FORGET_AUTHORS)[:4], qa_examples(RETAIN_AUTHORS))


class Recorder:
    """Records each optimizer step's micro-batches through the mixin's public hook."""

    steps: list[list[dict[str, Any]]]

    def gru_begin_step(self, micro_batches: list[Any]) -> None:
        self.steps = [*getattr(self, "steps", []), [copy.deepcopy(b) for b in micro_batches]]
        super().gru_begin_step(micro_batches)  # type: ignore[misc]


def closure_replay(
    trainer: Any, start: torch.nn.Module, lr: float, **gru: Any
) -> tuple[torch.nn.Module, GRUOptimizer]:
    """The recorded steps replayed with GRUOptimizer.step(forget_closure, retain_closure):
    the forget closure back-propagates the trainer's own compute_loss of each micro-batch
    divided by their number (the Trainer's accumulation), the retain closure the retain
    NLL over the step's answer tokens."""
    model = copy.deepcopy(start)
    model.train()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=lr), **gru)
    for micro in trainer.steps:
        n_tokens = sum(token_mask(b["retain"]["labels"]).sum() for b in micro)

        def forget_closure(micro: list[dict[str, Any]] = micro) -> torch.Tensor:
            total = torch.zeros(())
            for b in micro:
                loss = trainer.compute_loss(model, b) / len(micro)
                loss.backward()
                total = total + loss.detach()
            return total

        def retain_closure(micro: list[dict[str, Any]] = micro, n: Any = n_tokens) -> torch.Tensor:
            total = torch.zeros(())
            for b in micro:
                r = b["retain"]
                logits = model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
                loss = nll_loss(logits, r["labels"], num_items=n)
                loss.backward()
                total = total + loss.detach()
            return total

        opt.zero_grad()
        opt.step(forget_closure, retain_closure)
    return model, opt


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters())
    )


CASES = {
    # name: (trainer class, method_args, TrainingArguments overrides, GRU options)
    "graddiff_accumulation": (
        GradDiff,
        {"gamma": 1.0, "alpha": 0.1},
        {"gradient_accumulation_steps": 2},
        {},
    ),
    "npo_ref_accumulation_clip": (
        NPO,
        {"beta": 0.5, "alpha": 1.0},
        {"gradient_accumulation_steps": 2, "max_grad_norm": 0.3},
        {"gru_gamma": 0.9},
    ),
    "simnpo_clip": (
        SimNPO,
        # delta near the untrained model's mean answer NLL (~5.8): the sigmoid is not
        # saturated; no retain term in the objective, so it conflicts with the memory
        {"beta": 1.0, "delta": 5.5, "gamma": 1.0, "alpha": 0.0},
        {"per_device_train_batch_size": 4, "max_grad_norm": 0.3},
        {},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixin_equals_the_closure_replay(tmp_path: Path, case: str) -> None:
    base, method_args, overrides, gru = CASES[case]
    cls = type(f"Recording{base.__name__}", (Recorder, GRUMixin, base), {})
    model = tiny_model("gpt2", seed=1)
    start = copy.deepcopy(model)
    args = training_args(tmp_path, **overrides)
    trainer = cls(
        model=model,
        args=args,
        train_dataset=paired_set(),
        data_collator=PairedCollator(PAD),
        evaluators=None,
        template_args=None,
        **method_args,
        **gru,
    )
    trainer.train()
    clip = overrides.get("max_grad_norm", 0.0)
    assert trainer.state.global_step == 3 and len(trainer.steps) == 3
    assert all(len(s) == overrides.get("gradient_accumulation_steps", 1) for s in trainer.steps)
    gru_options = {k.removeprefix("gru_"): v for k, v in gru.items()}
    expected, opt = closure_replay(trainer, start, 0.05, max_grad_norm=clip or None, **gru_options)
    diff = max_diff(model, expected)
    moved = max_diff(model, start)
    print(f"{case} transformers {transformers.__version__}: max |w - w_replay| = {diff:.3g}")
    assert diff < FP32, diff
    assert moved > 1e-3  # the weights did change (by far more than the tolerance)
    gru_opt = trainer.gru_optimizer
    assert bool(gru_opt.last_stats["rectified"])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert any(h["gru_conflict"] == 1.0 for h in logs)  # a projection did act
    for p, q in zip(model.parameters(), expected.parameters()):
        m1, m2 = gru_opt.retain_memory(p), opt.retain_memory(q)
        assert (m1 is None) == (m2 is None)
        if m1 is not None:
            assert float((m1 - m2).abs().max()) < FP32
    if clip:
        assert gru_opt.max_grad_norm == clip
        assert float(gru_opt.last_stats["clip_coef"]) < 1.0  # the bound acted
        assert all(h["grad_norm"] > clip for h in logs)  # the norm GRU clipped from
    # The wrapped class's loss weights reached it unchanged; GRU's options reached GRU.
    for k, v in method_args.items():
        assert getattr(trainer, k) == v
    if "gru_gamma" in gru:
        assert gru_opt.gamma == gru["gru_gamma"]


def test_the_trainer_would_clip_the_unrectified_gradient_without_the_mixin(tmp_path: Path) -> None:
    """The replay with clipping before the rectification (what the plain Trainer's clip
    would do) is measurably different: the clip test above can fail."""
    base, method_args, overrides, _ = CASES["simnpo_clip"]
    cls = type("RecordingSimNPO", (Recorder, GRUMixin, base), {})
    model = tiny_model("gpt2", seed=1)
    start = copy.deepcopy(model)
    trainer = cls(
        model=model,
        args=training_args(tmp_path, **overrides),
        train_dataset=paired_set(),
        data_collator=PairedCollator(PAD),
        **method_args,
    )
    trainer.train()
    unclipped, _ = closure_replay(trainer, start, 0.05)
    assert max_diff(model, unclipped) > 1e3 * FP32


def test_with_gru_names_the_class_for_registries() -> None:
    cls = with_gru(NPO)
    assert cls.__name__ == "GRUNPO" and cls.__mro__[1:3] == (GRUMixin, NPO)
    register_trainer(cls)
    assert TRAINER_REGISTRY["GRUNPO"] is cls
    with pytest.raises(TypeError, match="already has GRU"):
        with_gru(cls)
    with pytest.raises(TypeError, match="Trainer subclass"):
        with_gru(dict)  # type: ignore[type-var]
    # GRUTrainer is the mixin over the objective trainer: one mechanism.
    assert issubclass(GRUTrainer, GRUMixin) and issubclass(GRUTrainer, Trainer)


def test_every_gru_option_is_a_keyword_and_bad_ones_are_refused(tmp_path: Path) -> None:
    names = gru_option_names()
    assert {"gamma", "space", "directions", "cos_clip", "max_grad_norm", "ema_dtype"} <= set(names)
    cls = with_gru(GradDiff)
    trainer = cls(
        model=tiny_model("gpt2"),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=paired_set(),
        data_collator=PairedCollator(PAD),
        gamma=2.0,  # GradDiff's forget weight, not GRU's gamma
        gru_gamma=0.7,
        gru_directions=2,
        gru_space="update",
        gru_ema_dtype="bfloat16",
    )
    assert trainer.gamma == 2.0
    trainer.train()
    gru = trainer.gru_optimizer
    assert gru.gamma == 0.7 and gru.rule.directions == 2 and gru.space == "update"
    assert gru.ema_dtype == torch.bfloat16
    # a Hydra config passes the options by name: typos and bad values fail at construction
    common: dict[str, Any] = {
        "model": tiny_model("gpt2"),
        "args": training_args(tmp_path),
        "train_dataset": paired_set(),
        "data_collator": PairedCollator(PAD),
    }
    with pytest.raises(TypeError, match="gru_gama"):
        cls(**common, gru_gama=0.5)
    with pytest.raises(ValueError, match="gamma"):
        cls(**common, gru_gamma=1.5)
    with pytest.raises(ValueError, match="dtype"):
        cls(**common, gru_ema_dtype="float17")
    with pytest.raises(ValueError, match="set one of them"):
        cls(**{**common, "args": training_args(tmp_path, max_grad_norm=1.0)}, gru_max_grad_norm=0.5)
    with pytest.raises(TypeError, match="GRUMixin goes first"):
        type("Wrong", (GRUMixin,), {})()


def test_unpaired_batches_name_the_fix(tmp_path: Path) -> None:
    cls = with_gru(GradDiff)
    forget = qa_examples(FORGET_AUTHORS)
    from gru_optim.data import pad_examples

    trainer = cls(
        model=tiny_model("gpt2"),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=forget,
        data_collator=lambda xs: pad_examples(xs, PAD),
    )
    with pytest.raises(ValueError, match="paired batches.*PairedUnlearningDataset"):
        trainer.train()


def test_lr_schedule_and_logs(tmp_path: Path) -> None:
    """A linear schedule reaches the inner optimizer through GRU; the logs carry GRU's
    statistics."""
    cls = with_gru(NPO)
    trainer = cls(
        model=tiny_model("gpt2"),
        args=training_args(tmp_path, max_steps=4, lr_scheduler_type="linear", warmup_steps=0),
        train_dataset=paired_set(),
        data_collator=PairedCollator(PAD),
        beta=0.5,
    )
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]
    assert trainer.gru_optimizer.param_groups[0]["lr"] == 0.0  # the schedule's end
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(
        {"retain_loss", "gru_cosine", "gru_conflict"} <= h.keys() for h in logs
    )


# ---------------------------------------------------------------- ZeRO-3, two gloo processes
def test_mixin_on_zero3_equals_the_closure_replay_on_one_process() -> None:
    pytest.importorskip("deepspeed")
    import _deepspeed_workers as W

    r0, r1 = (r["mixin"] for r in W.spawn("hf_mixin"))
    assert r0["engine"] == "DeepSpeedEngine" and r0["stage"] == 3
    assert r0["clip"] == 0.3  # DeepSpeed's gradient_clipping: args.max_grad_norm
    assert r0["rectified"] and any(r0["conflicts"])
    assert torch.equal(r0["weights"], r1["weights"]) and torch.equal(r0["memory"], r1["memory"])
    assert r0["memory_bytes"] + r1["memory_bytes"] == 4 * r0["numel"]  # sharded, float32
    diff = float((r0["weights"] - r0["replay_weights"]).abs().max())
    mem_diff = float((r0["memory"] - r0["replay_memory"]).abs().max())
    print(f"zero3 transformers {transformers.__version__}: max |w - w_replay| = {diff:.3g}")
    assert diff < FP32 and mem_diff < FP32, (diff, mem_diff)
    assert float((r0["replay_weights"] - r0["start_weights"]).abs().max()) > 1e-3


# ---------------------------------------------------------------- errors a new user hit
def test_unpaired_dataset_through_the_default_collator_names_the_fix(tmp_path: Path) -> None:
    trainer = GRUTrainer(
        model=tiny_model("gpt2"),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=qa_examples(FORGET_AUTHORS),  # not paired with retain examples
        processing_class=tiny_tokenizer(),
    )
    with pytest.raises(
        ValueError,
        match=r"got an item \['attention_mask', 'input_ids', 'labels'\]: wrap the examples in "
        r"PairedUnlearningDataset",
    ):
        trainer.train()


def test_raw_strings_in_the_paired_dataset_say_what_it_expects() -> None:
    retain = qa_examples(RETAIN_AUTHORS)
    with pytest.raises(
        TypeError, match=r"first forget example is a str \('Who wrote.*encode_example"
    ):
        PairedUnlearningDataset(["Who wrote the poems?", "Where?"], retain)
    with pytest.raises(TypeError, match="first retain example is a dict with keys \\['text'\\]"):
        PairedUnlearningDataset(qa_examples(FORGET_AUTHORS), [{"text": "x"}])
    forget = qa_examples(FORGET_AUTHORS)
    with pytest.raises(TypeError, match="first idk example is a str"):
        PairedUnlearningDataset(forget, retain, ["I don't know."] * len(forget))


def test_idk_objective_without_refusals_says_how_to_give_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'idk_nll' trains on refusals.*idk=\[encode_example"):
        GRUTrainer(
            model=tiny_model("gpt2"),
            args=training_args(tmp_path),
            train_dataset=paired_set(),
            processing_class=tiny_tokenizer(),
            objective="idk_nll",
        )


def test_gru_optimizer_given_parameters_and_lr_says_it_wraps_an_instance() -> None:
    model = tiny_model("gpt2")
    with pytest.raises(
        TypeError,
        match=r"wraps a torch.optim.Optimizer instance, got generator and the option\(s\) lr=.*"
        r"AdamW\(model.parameters\(\), lr=1e-3\)",
    ):
        GRUOptimizer(model.parameters(), lr=1e-3)  # type: ignore[arg-type, call-arg]
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        TypeError, match=r"unexpected keyword argument\(s\) lr=, gama=: the wrapped"
    ):
        GRUOptimizer(inner, lr=1e-3, gama=0.9)  # type: ignore[call-arg]
    GRUOptimizer(inner, gamma=0.5)  # the GRU options are still accepted


def test_an_epoch_shorter_than_the_accumulation_is_one_step(tmp_path: Path) -> None:
    """2 micro-batches per epoch, gradient_accumulation_steps=4: each epoch is one step of
    2 micro-batches (transformers 4.45 says so only after the last training_step; the
    mixin counts the epoch's micro-batches), equal to the closure replay."""
    cls = type("RecordingGradDiff", (Recorder, GRUMixin, GradDiff), {})
    model = tiny_model("gpt2", seed=1)
    start = copy.deepcopy(model)
    trainer = cls(
        model=model,
        args=training_args(tmp_path, max_steps=2, gradient_accumulation_steps=4),
        train_dataset=paired_set(),
        data_collator=PairedCollator(PAD),
        alpha=0.1,
    )
    trainer.train()
    assert trainer.state.global_step == 2 and [len(s) for s in trainer.steps] == [2, 2]
    expected, _ = closure_replay(trainer, start, 0.05)
    assert max_diff(model, expected) < FP32
    assert max_diff(model, start) > 1e-3


def test_a_second_train_reuses_the_gru_optimizer(tmp_path: Path) -> None:
    """The second train() finds the GRUOptimizer inside Accelerate's wrapper and keeps it
    (wrapping it again would rectify twice, the inner one with no retain pass: refused)."""
    cls = with_gru(GradDiff)
    trainer = cls(
        model=tiny_model("gpt2"),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=paired_set(),
        data_collator=PairedCollator(PAD),
    )
    trainer.train()
    gru = trainer.gru_optimizer
    trainer.args.max_steps = 2
    trainer.train()  # -W error: no plain-step warning either
    assert trainer.gru_optimizer is gru and trainer.state.global_step == 2
    assert bool(gru.last_stats["rectified"])
