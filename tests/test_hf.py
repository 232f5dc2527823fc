"""Hugging Face integration on real tiny GPT-2 / Llama models and a real BPE tokenizer.

Everything is built offline (see ``tests/_tiny_models.py``); nothing is mocked.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _tiny_models import (
    FORGET_AUTHORS,
    RETAIN_AUTHORS,
    qa_examples,
    tiny_model,
    tiny_tokenizer,
)
from transformers import TrainingArguments

from gru_optim import EMA_KEY, GRUOptimizer
from gru_optim.data import (
    PairedCollator,
    PairedUnlearningDataset,
    encode_example,
    pad_examples,
)
from gru_optim.hf import GRUTrainer, find_gru_optimizer, mean_answer_nll
from gru_optim.objectives import OBJECTIVES, get_objective, nll_loss

PAD = tiny_tokenizer().pad_token_id
# transformers 5 renamed gradient checkpointing (TrainingArguments and the model's flag)
CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)

# peft (0.21) reads transformers 5's deprecated ``is_gradient_checkpointing`` when it
# wraps a model; a mark (unlike the ini option) also holds under ``pytest -W error``.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)


def training_args(out: Path, **overrides: Any) -> TrainingArguments:
    kw: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 4,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "constant",
        "report_to": [],
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    kw.update(overrides)
    return TrainingArguments(**kw)


def forget_retain() -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    return qa_examples(FORGET_AUTHORS), qa_examples(RETAIN_AUTHORS)


# ---------------------------------------------------------------- data
def test_paired_dataset_seeds_retain_pairing_per_rank_and_epoch() -> None:
    forget = [{"input_ids": [i]} for i in range(6)]
    retain = [{"input_ids": [100 + j]} for j in range(20)]

    def pairing(rank: int, epoch: int, seed: int = 0) -> list[int]:
        ds = PairedUnlearningDataset(forget, retain, seed=seed, rank=rank)
        ds.set_epoch(epoch)
        return [ds[i]["retain"]["input_ids"][0] for i in range(len(ds))]

    assert pairing(0, 0) == pairing(0, 0)  # deterministic
    assert pairing(0, 0) != pairing(1, 0)  # ranks differ
    assert pairing(0, 0) != pairing(0, 1)  # epochs differ
    assert pairing(0, 0) != pairing(0, 0, seed=1)
    assert len(set(pairing(0, 0))) == 6  # without replacement within an epoch
    ds = PairedUnlearningDataset(forget, retain, rank=0)
    assert [ds[i]["forget"]["input_ids"][0] for i in range(6)] == list(range(6))
    with pytest.raises(IndexError):
        ds[6]


def test_paired_dataset_cycles_a_small_retain_set_and_aligns_idk() -> None:
    forget = [{"input_ids": [i]} for i in range(5)]
    retain = [{"input_ids": [100 + j]} for j in range(2)]
    idk = [{"input_ids": [200 + i]} for i in range(5)]
    ds = PairedUnlearningDataset(forget, retain, idk, rank=0)
    got = [ds[i]["retain"]["input_ids"][0] for i in range(5)]
    assert sorted(got[:2]) == [100, 101] and got[2:4] == got[:2]
    assert [ds[i]["idk"]["input_ids"][0] for i in range(5)] == [200, 201, 202, 203, 204]
    with pytest.raises(ValueError, match="align"):
        PairedUnlearningDataset(forget, retain, idk[:3])
    with pytest.raises(ValueError, match="empty"):
        PairedUnlearningDataset(forget, [])


def test_paired_dataset_reads_rank_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    forget = [{"input_ids": [i]} for i in range(4)]
    retain = [{"input_ids": [j]} for j in range(30)]
    monkeypatch.setenv("RANK", "3")
    assert PairedUnlearningDataset(forget, retain).rank == 3
    expected = np.random.default_rng([0, 0, 3]).permutation(30)
    assert PairedUnlearningDataset(forget, retain).retain_index(1) == expected[1]


def test_encode_example_masks_the_prompt_and_appends_eos() -> None:
    tok = tiny_tokenizer()
    ex = encode_example(tok, "Question: Who? Answer:", " Nobody.")
    n_prompt = len(tok("Question: Who? Answer:", add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][:-1]) == "Question: Who? Answer: Nobody."
    assert len(encode_example(tok, "Question: Who?", " Nobody.", max_length=3)["input_ids"]) == 3


def test_collator_pads_each_group() -> None:
    ex = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = pad_examples(ex, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = pad_examples(ex, pad_token_id=0, padding_side="left", pad_to_multiple_of=4)
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    collated = PairedCollator(tiny_tokenizer())([{"forget": ex[0], "retain": ex[1]}])
    assert set(collated) == {"forget", "retain"}
    assert collated["retain"]["input_ids"].tolist() == [[8]]


# ---------------------------------------------------------------- objectives on real models
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_every_objective_runs_on_a_real_model(arch: str) -> None:
    model = tiny_model(arch)
    ref = copy.deepcopy(model).eval()
    forget, retain = forget_retain()
    idk = qa_examples(FORGET_AUTHORS, idk=True)
    f, r, i = (pad_examples(x[:2], PAD) for x in (forget, retain, idk))
    names = ["ga", "npo", "simnpo", "wga", "satimp", "idk_nll", "idk_dpo", "graddiff", "npo_kl"]
    assert set(names) <= set(OBJECTIVES)
    for name in names:
        obj = OBJECTIVES[name]
        model.zero_grad()
        loss = obj.model_loss(model, f, r, i, ref_model=ref if obj.needs_reference else None)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and grads, name
        assert all(torch.isfinite(g).all() for g in grads), name
    # The model computes the same retain NLL as the objective module.
    out = model(**r)
    torch.testing.assert_close(out.loss, nll_loss(out.logits, r["labels"]))


# ---------------------------------------------------------------- Trainer
@pytest.mark.parametrize(
    ("arch", "objective", "lr"), [("gpt2", "npo", 5e-3), ("llama", "graddiff", 1e-2)]
)
def test_trainer_forgets_and_retains(tmp_path: Path, arch: str, objective: str, lr: float) -> None:
    tok = tiny_tokenizer()
    model = tiny_model(arch)
    forget, retain = forget_retain()
    before_f = mean_answer_nll(model, forget, PAD)
    before_r = mean_answer_nll(model, retain, PAD)
    trainer = GRUTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=6, learning_rate=lr),
        train_dataset=PairedUnlearningDataset(forget, retain),
        processing_class=tok,
        objective=objective,
        gru_kwargs={"gamma": 0.8},
    )
    trainer.train()
    after_f = mean_answer_nll(model, forget, PAD)
    after_r = mean_answer_nll(model, retain, PAD)
    assert after_f > before_f + 0.3
    # The retain loss does not degrade by more than a fraction of the forget loss's rise
    # (with a retain term in the objective it may even fall).
    assert after_r - before_r < 0.4 * (after_f - before_f)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6
    assert all({"retain_loss", "gru_cosine", "gru_conflict"} <= h.keys() for h in logs)
    assert any(h["gru_conflict"] == 1.0 for h in logs)  # GRU did rectify
    assert isinstance(trainer.optimizer.optimizer, GRUOptimizer)  # inside Accelerate's wrapper
    assert (trainer.ref_model is not None) == get_objective(objective).needs_reference
    assert trainer.train_dataset.epoch == 1  # 3 steps per epoch: the pairing of epoch 1


def _closure_path_reference(
    model: torch.nn.Module,
    ds: PairedUnlearningDataset,
    objective: str,
    steps: int,
    lr: float,
    **gru: Any,
) -> None:
    """The same training with GRUOptimizer's closure path on full batches."""
    ref = copy.deepcopy(model).eval()
    obj = get_objective(objective)
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=lr), **gru)
    collate = PairedCollator(PAD)
    model.train()
    for epoch in range(steps):
        ds.set_epoch(epoch)
        batch = collate([ds[i] for i in range(len(ds))])

        def forget_closure(batch: dict[str, Any] = batch) -> torch.Tensor:
            loss = obj.model_loss(model, batch["forget"], batch["retain"], ref_model=ref)
            loss.backward()
            return loss

        def retain_closure(batch: dict[str, Any] = batch) -> torch.Tensor:
            loss = model(**batch["retain"]).loss
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(forget_closure, retain_closure)


def test_gradient_accumulation_matches_the_closure_path(tmp_path: Path) -> None:
    # NPO+RT: a per-sequence forget term, a per-token retain term and a reference model.
    objective = "npo_rt"
    forget, retain = forget_retain()
    forget = forget[:4]
    lr = 0.05
    model = tiny_model("gpt2", seed=1)
    expected = copy.deepcopy(model)
    _closure_path_reference(expected, PairedUnlearningDataset(forget, retain), objective, 2, lr)
    trainer = GRUTrainer(
        model=model,
        # micro-batches of 2, two per step: one step per epoch over the 4 forget examples
        args=training_args(
            tmp_path,
            max_steps=2,
            learning_rate=lr,
            optim="sgd",
            max_grad_norm=0.0,
            gradient_accumulation_steps=2,
        ),
        train_dataset=PairedUnlearningDataset(forget, retain),
        processing_class=tiny_tokenizer(),
        objective=objective,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    moved = False
    for (n, p), q, p0 in zip(
        model.named_parameters(), expected.parameters(), tiny_model("gpt2", seed=1).parameters()
    ):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        moved = moved or not torch.equal(p, p0)
    assert moved


def test_trainer_max_grad_norm_clips_the_rectified_gradient(tmp_path: Path) -> None:
    """TrainingArguments.max_grad_norm is applied by GRU to the final gradient, right
    before the inner step, never to the unrectified one between backward and step (with
    a retain_weight term in .grad that clip would also make the rectification wrong)."""
    objective = "ga"
    forget, retain = forget_retain()
    forget = forget[:4]
    lr, clip = 0.05, 0.5
    model = tiny_model("gpt2", seed=1)
    expected = copy.deepcopy(model)
    _closure_path_reference(
        expected,
        PairedUnlearningDataset(forget, retain),
        objective,
        2,
        lr,
        retain_weight=0.5,
        max_grad_norm=clip,
    )
    trainer = GRUTrainer(
        model=model,
        args=training_args(
            tmp_path,
            max_steps=2,
            learning_rate=lr,
            optim="sgd",
            max_grad_norm=clip,
            per_device_train_batch_size=4,
        ),
        train_dataset=PairedUnlearningDataset(forget, retain),
        processing_class=tiny_tokenizer(),
        objective=objective,
        gru_kwargs={"retain_weight": 0.5},
    )
    trainer.train()
    assert trainer.gru_optimizer.max_grad_norm == clip
    assert float(trainer.gru_optimizer.last_stats["clip_coef"]) < 1.0  # the bound bit
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["grad_norm"] > clip for h in logs)
    for (n, p), q in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_idk_dpo_prefers_the_refusal(tmp_path: Path) -> None:
    forget, retain = forget_retain()
    idk = qa_examples(FORGET_AUTHORS, idk=True)
    model = tiny_model("gpt2")
    margin_before = mean_answer_nll(model, forget, PAD) - mean_answer_nll(model, idk, PAD)
    trainer = GRUTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=4, learning_rate=1e-2),
        train_dataset=PairedUnlearningDataset(forget, retain, idk),
        processing_class=tiny_tokenizer(),
        objective="idk_dpo_rt",
        objective_kwargs={"beta": 0.5},
    )
    trainer.train()
    margin_after = mean_answer_nll(model, forget, PAD) - mean_answer_nll(model, idk, PAD)
    assert margin_after > margin_before + 0.2
    metrics = trainer.evaluate(PairedUnlearningDataset(forget, retain, idk))
    assert np.isfinite(metrics["eval_loss"])


def test_checkpoint_resume_gives_the_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import inspect

    from transformers import Trainer

    old_rng_load = "weights_only" not in inspect.getsource(Trainer._load_rng_state)
    if old_rng_load:
        # transformers 4.45 reads the checkpoint's RNG state (numpy arrays) with a bare
        # torch.load, which torch >= 2.6 refuses (weights_only=True by default): any
        # Trainer's resume needs torch's switch there (docs/guides/checkpoints.md).
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    forget, retain = forget_retain()

    def run(out: Path, resume: str | None = None) -> GRUTrainer:
        trainer = GRUTrainer(
            model=tiny_model("gpt2"),
            args=training_args(
                out, max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-2
            ),
            train_dataset=PairedUnlearningDataset(forget, retain),
            processing_class=tiny_tokenizer(),
            objective="npo",
        )
        with (
            pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
            if resume and old_rng_load
            else contextlib.nullcontext()
        ):
            trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoint-2"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert any(EMA_KEY in entry for entry in saved["state"].values())
    resumed = run(tmp_path / "b", resume=str(ckpt))
    assert resumed.state.global_step == 4
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m, n=n: f"{n}: {m}")
    gru_a = full.gru_optimizer
    gru_b = resumed.gru_optimizer
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(gru_a.retain_memory(p), gru_b.retain_memory(q))


# ---------------------------------------------------------------- PEFT
def test_lora_adapters_carry_the_memory_with_activation_checkpointing(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    def build() -> Any:
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
        )
        return get_peft_model(tiny_model("llama"), config)

    def train(model: Any, out: Path, checkpointing: bool) -> GRUTrainer:
        trainer = GRUTrainer(
            model=model,
            args=training_args(
                out,
                max_steps=4,
                learning_rate=5e-2,
                **{CHECKPOINTING: checkpointing},
                # transformers 4.45 checkpoints with reentrant autograd by default, under
                # which the LoRA weights of a frozen model's layers get no gradient
                **{f"{CHECKPOINTING}_kwargs": {"use_reentrant": False}},
            ),
            train_dataset=PairedUnlearningDataset(forget, retain),
            processing_class=tiny_tokenizer(),
            objective="npo",  # reference = the base model with the adapters disabled
        )
        assert trainer.ref_model is None  # no copy of the model
        trainer.train()
        assert getattr(model.get_base_model(), f"is_{CHECKPOINTING}") is checkpointing
        return trainer

    forget, retain = forget_retain()
    model = build()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before_f = mean_answer_nll(model, forget, PAD)
    gru = train(model, tmp_path / "ckpt", checkpointing=True).gru_optimizer
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert all(gru.retain_memory(p) is not None for p in trainable)
    assert sum(1 for p in model.parameters() if gru.retain_memory(p) is not None) == len(trainable)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n  # the base model is untouched
    assert mean_answer_nll(model, forget, PAD) > before_f
    # Activation checkpointing changes memory, not the result.
    plain = build()
    train(plain, tmp_path / "plain", checkpointing=False)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


# ---------------------------------------------------------------- plain and Accelerate loops
def _loop(model: torch.nn.Module, use_accelerate: bool, steps: int = 3) -> torch.nn.Module:
    forget, retain = forget_retain()
    ds = PairedUnlearningDataset(forget, retain, rank=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=PairedCollator(PAD))
    obj = get_objective("graddiff")
    opt: Any = GRUOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))

    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    if use_accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        backward = accelerator.backward
    gru = find_gru_optimizer(opt)
    model.train()
    for step, batch in enumerate(loader):
        if step == steps:
            break
        with gru.retain_pass():
            backward(model(**batch["retain"]).loss)
        backward(obj.model_loss(model, batch["forget"], batch["retain"]))
        opt.step()
        opt.zero_grad()
    return model


def test_accelerate_loop_matches_the_plain_loop() -> None:
    plain = _loop(tiny_model("gpt2"), use_accelerate=False)
    accelerated = _loop(tiny_model("gpt2"), use_accelerate=True)
    start = tiny_model("gpt2")
    for (n, p), q, _p0 in zip(
        plain.named_parameters(), accelerated.parameters(), start.parameters()
    ):
        torch.testing.assert_close(p, q, msg=lambda m, n=n: f"{n}: {m}")
    assert any(not torch.equal(p, p0) for p, p0 in zip(plain.parameters(), start.parameters()))


def test_trainer_rejects_bad_configuration(tmp_path: Path) -> None:
    forget, retain = forget_retain()
    with pytest.raises(ValueError, match="data_collator"):
        GRUTrainer(
            model=tiny_model(),
            args=training_args(tmp_path),
            train_dataset=PairedUnlearningDataset(forget, retain),
        )
    unpaired = GRUTrainer(
        model=tiny_model(),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=forget,
        data_collator=lambda xs: pad_examples(xs, PAD),
    )
    with pytest.raises(ValueError, match="paired batches"):
        unpaired.train()
    with pytest.raises(KeyError, match="unknown objective"):
        GRUTrainer(
            model=tiny_model(),
            args=training_args(tmp_path),
            train_dataset=PairedUnlearningDataset(forget, retain),
            processing_class=tiny_tokenizer(),
            objective="forget_everything",
        )


# ---------------------------------------------------------------- DDP (2 CPU processes)
def _ddp_worker(out_dir: str) -> None:
    """Run by ``torchrun`` (see the test below): 2 steps of GRUTrainer under DDP (gloo);
    rank 0 replays them with the closure path on the union of both ranks' batches."""
    import json

    import torch.distributed as dist

    class Recording(GRUTrainer):
        def gru_begin_step(self, micro_batches: list[Any]) -> None:
            self.seen = [*getattr(self, "seen", []), micro_batches]
            super().gru_begin_step(micro_batches)

    def unpad(batch: dict[str, torch.Tensor]) -> list[dict[str, list[int]]]:
        keep = batch["attention_mask"].bool()
        return [{k: v[i][keep[i]].tolist() for k, v in batch.items()} for i in range(len(keep))]

    forget, retain = forget_retain()
    model = tiny_model("gpt2", seed=3)
    start = copy.deepcopy(model)
    trainer = Recording(
        model=model,
        args=training_args(
            Path(out_dir) / "run",
            max_steps=2,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=2,
            learning_rate=0.05,
            optim="sgd",
            max_grad_norm=0.0,
            ddp_backend="gloo",
        ),
        train_dataset=PairedUnlearningDataset(forget, retain),
        processing_class=tiny_tokenizer(),
        objective="npo_rt",
    )
    trainer.train()
    gru = trainer.gru_optimizer
    steps = [
        [{"forget": unpad(mb["forget"])[0], "retain": unpad(mb["retain"])[0]} for mb in s]
        for s in trainer.seen
    ]
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    memory = torch.cat([gru.retain_memory(p).flatten() for p in model.parameters()])
    gathered: list[Any] = [None, None]
    dist.all_gather_object(gathered, (steps, weights, memory, trainer.train_dataset.rank))
    if dist.get_rank() != 0:
        return
    # The closure path, one process, on the union of the two ranks' micro-batches.
    ref = copy.deepcopy(start).eval()
    obj = get_objective("npo_rt")
    opt = GRUOptimizer(torch.optim.SGD(start.parameters(), lr=0.05))
    collate = PairedCollator(PAD)
    start.train()
    # transformers 5 normalises by the counts of both ranks (average_tokens_across_devices):
    # the union batch; 4.45 by each rank's own counts, then DDP averages the ranks.
    union = getattr(trainer.args, "average_tokens_across_devices", False)
    for s in range(2):
        parts = [gathered[0][0][s] + gathered[1][0][s]] if union else [g[0][s] for g in gathered]
        batches = [collate(p) for p in parts]

        def forget_closure(batches: list[dict[str, Any]] = batches) -> torch.Tensor:
            total = torch.zeros(())
            for batch in batches:
                loss = obj.model_loss(start, batch["forget"], batch["retain"], ref_model=ref)
                (loss / len(batches)).backward()
                total = total + loss.detach() / len(batches)
            return total

        def retain_closure(batches: list[dict[str, Any]] = batches) -> torch.Tensor:
            total = torch.zeros(())
            for batch in batches:
                loss = start(**batch["retain"]).loss
                (loss / len(batches)).backward()
                total = total + loss.detach() / len(batches)
            return total

        opt.zero_grad()
        opt.step(forget_closure, retain_closure)
    union = torch.cat([p.detach().flatten() for p in start.parameters()])
    result = {
        "replicas_equal": bool(torch.equal(gathered[0][1], gathered[1][1])),
        "memories_equal": bool(torch.equal(gathered[0][2], gathered[1][2])),
        "ranks": [gathered[0][3], gathered[1][3]],
        "retain_items_differ": gathered[0][0][0][0]["retain"] != gathered[1][0][0][0]["retain"],
        "max_diff_to_union": float((union - weights).abs().max()),
        "moved": float(
            (union - torch.cat([p.flatten() for p in tiny_model("gpt2", 3).parameters()]))
            .abs()
            .max()
        ),
    }
    (Path(out_dir) / "result.json").write_text(json.dumps(result))


def test_ddp_two_processes_equal_the_union_batch(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRU_DDP_OUT": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            __file__,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["replicas_equal"] and result["memories_equal"]
    assert result["ranks"] == [0, 1]
    assert result["retain_items_differ"]
    assert result["moved"] > 1e-3
    assert result["max_diff_to_union"] < 1e-5


if __name__ == "__main__":
    _ddp_worker(os.environ["GRU_DDP_OUT"])
