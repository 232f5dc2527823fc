"""Real DeepSpeed engines on 2 CPU processes for tests/test_deepspeed.py.

One spawned run (``spawn("all")``): two processes, a gloo process group, ``DS_ACCELERATOR=cpu``
and the environment ``deepspeed.initialize`` reads (as torchrun sets it). Every case builds
its own engine in that one process group (starting processes and importing DeepSpeed is the
slow part), trains a few GRU steps and returns what the test process compares with a
float64 single process on the union batch (:func:`reference_run`, here too, so that both
sides build the same model and data): ZeRO 0-3, accumulation, clipping, rules, bf16, fp16
overflows, checkpoints, misuse, and ``GRUTrainer`` on ZeRO-3 (:func:`hf_case`).

The first DeepSpeed launch on a machine JIT-compiles DeepSpeed's shared-memory
communication op (g++, cached in ``~/.cache/torch_extensions``); the spawn timeout allows
for it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _dist_workers import free_port  # noqa: E402

from gru_optim import GRUOptimizer  # noqa: E402

# Odd sizes on purpose: ZeRO-1/2 split some tensors between the two ranks, ZeRO-3 pads
# every tensor to a multiple of 2 (35 -> 18 + 17 real elements).
IN, HID, OUT, AUX = 5, 7, 3, 2
WORLD = 2
BATCH = 8  # union batch; each rank holds 4 rows (2 micro-batches of 2 with accumulation)
STEPS = 3
LR = 1e-2

# Third-party warnings a DeepSpeed run emits here, each matched by the start of its message.
KNOWN_WARNINGS = (
    # torch 2.13 deprecates the collective names DeepSpeed 0.19.8 calls (c10d_logger.py)
    "FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated",
    "FutureWarning: `torch.distributed.reduce_scatter_tensor` is deprecated",
    # torch/utils/mkldnn.py, imported through torch._inductor when DeepSpeed's Muon module
    # (deepspeed/runtime/zero/muon/original_muon.py) calls torch.compile at import
    "DeprecationWarning: `torch.jit.script_method` is deprecated",
)


# --------------------------------------------------------------------------- model, data
class Net(nn.Module):
    """``body`` and ``head`` get both gradients; ``retain_head`` only a retain gradient (it
    takes its share of the correction); ``forget_bias`` only a forget gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN, HID), nn.Tanh())
        self.head = nn.Linear(HID, OUT)
        self.retain_head = nn.Linear(HID, AUX)
        self.forget_bias = nn.Parameter(torch.zeros(OUT))

    def forward(self, x: Tensor, y: Tensor, which: str) -> Tensor:
        h = self.body(x)
        if which == "forget":  # gradient ascent on the forget set
            out = -F.cross_entropy((self.head(h) + self.forget_bias).float(), y)
        else:
            out = F.cross_entropy(self.head(h).float(), y) + 0.5 * F.cross_entropy(
                self.retain_head(h).float(), y % AUX
            )
        return out


def make_model(dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def make_batches(steps: int, seed: int = 1234) -> list[dict[str, Tensor]]:
    """Union batches: forget and retain inputs and labels of BATCH rows each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        out.append(
            {
                "xf": torch.randn(BATCH, IN, generator=g),
                "yf": torch.randint(0, OUT, (BATCH,), generator=g),
                "xr": torch.randn(BATCH, IN, generator=g) + 0.5,
                "yr": torch.randint(0, OUT, (BATCH,), generator=g),
            }
        )
    return out


def inner(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01)


def reference_run(
    batches: list[dict[str, Tensor]], **gru_kwargs: Any
) -> tuple[list[Tensor], list[Tensor]]:
    """One process, float64, on the union batches: final parameters and memories."""
    model = make_model(torch.float64)
    opt = GRUOptimizer(inner(model.parameters()), **gru_kwargs)
    for b in batches:
        opt.zero_grad()
        opt.step(*reference_closures(model, b))
    params = [p.detach().clone() for p in model.parameters()]
    mems = []
    for p in model.parameters():
        m = opt.retain_memory(p)
        mems.append(torch.zeros_like(p) if m is None else m.detach().clone())
    return params, mems


def reference_closures(model: Net, b: dict[str, Tensor]) -> tuple[Callable[[], Tensor], ...]:
    def run(which: str) -> Tensor:
        x, y = (b["xf"], b["yf"]) if which == "forget" else (b["xr"], b["yr"])
        loss = model(x.to(torch.float64), y, which)
        loss.backward()
        return loss.detach()

    return (lambda: run("forget")), (lambda: run("retain"))


# --------------------------------------------------------------------------- DeepSpeed side
def ds_config(stage: int, gas: int = 1, clip: float = 0.0, **extra: Any) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3 and not extra.pop("persist", False):
        zero["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": BATCH // WORLD // gas,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,  # DeepSpeed's default is 1.0
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    cfg.update(extra)
    return cfg


def make_engine(cfg: dict[str, Any]) -> Any:
    import deepspeed

    model = make_model()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=inner(model.parameters()), config=cfg
    )
    return engine


def closures(
    engine: Any,
    b: dict[str, Tensor],
    rank: int,
    poison: str | None = None,
) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    """Forget and retain closures over this rank's rows, one ``engine.backward`` per
    micro-batch (no division by the number of micro-batches: DeepSpeed divides).
    ``poison``: "forget" or "retain" makes that loss infinite on rank 1 (an overflow)."""
    gas = engine.gradient_accumulation_steps()
    n = BATCH // WORLD
    dtype = next(engine.module.parameters()).dtype

    def run(which: str) -> Tensor:
        x, y = (b["xf"], b["yf"]) if which == "forget" else (b["xr"], b["yr"])
        x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        total = torch.zeros(())
        for xm, ym in zip(x.chunk(gas), y.chunk(gas)):
            loss = engine(xm.to(dtype), ym, which)
            if poison == which and rank == 1:
                loss = loss * float("inf")
            engine.backward(loss)
            total = total + loss.detach().float()
        return total

    return (lambda: run("forget")), (lambda: run("retain"))


def full_params(engine: Any) -> list[Tensor]:
    """Every parameter in full, float32 (gathered from the partitions at stages 1-3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    if engine.zero_optimization_stage() == 0:
        return [p.detach().float().clone() for p in engine.module.parameters()]
    return [safe_get_full_fp32_param(p).detach().clone() for p in engine.module.parameters()]


def full_memory(gru: Any, engine: Any) -> list[Tensor]:
    """Every parameter's memory in full, assembled from the ranks' shards."""
    import torch.distributed as dist

    mine = []
    for p in engine.module.parameters():
        m = gru.retain_memory(p)
        start, length = gru.shard_range(p)
        mine.append((start, (torch.zeros(length) if m is None else m).detach().cpu().clone()))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    out = []
    for i, p in enumerate(engine.module.parameters()):
        shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
        full = torch.zeros(int(torch.Size(shape).numel()))
        for shards in everyone:
            start, m = shards[i]
            full[start : start + m.numel()] = m
        out.append(full.reshape(shape))
    return out


@contextlib.contextmanager
def count_gru_all_reduce() -> Iterator[list[tuple[int, int]]]:
    """Every collective GRU makes (they all go through Reducer.sum_): (elements, bytes)."""
    from gru_optim.engine._reduce import Reducer

    calls: list[tuple[int, int]] = []
    real = Reducer.sum_

    def counting(self: Reducer, packed: Tensor) -> None:
        if self.group is not None:
            calls.append((packed.numel(), packed.numel() * packed.element_size()))
        real(self, packed)

    Reducer.sum_ = counting  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        Reducer.sum_ = real  # type: ignore[method-assign]


def train(
    gru: Any,
    engine: Any,
    batches: list[dict[str, Tensor]],
    rank: int,
    closure_free: bool = False,
    poison: dict[int, str] | None = None,
) -> dict[str, Any]:
    """GRU steps on ``batches``; the collectives GRU made in each step."""
    per_step = []
    for i, b in enumerate(batches):
        f, r = closures(engine, b, rank, (poison or {}).get(i))
        with count_gru_all_reduce() as calls:
            if closure_free:
                with gru.retain_pass():
                    r()
                f()
                gru.step()
            else:
                gru.step(f, r)
        per_step.append(list(calls))
    return {"calls": per_step}


CASES: dict[str, dict[str, Any]] = {
    # name: ZeRO config, GRU options, how to train; the test builds the same reference
    "zero0": {"cfg": {"stage": 0}, "gru": {}},
    "zero1": {"cfg": {"stage": 1}, "gru": {}},
    "zero2": {"cfg": {"stage": 2}, "gru": {}},
    "zero3": {"cfg": {"stage": 3}, "gru": {}},
    # 2 micro-batches per pass, the closure-free path, one dot product per tensor
    "zero1_gas2_free_tensor": {
        "cfg": {"stage": 1, "gas": 2},
        "gru": {"granularity": "tensor"},
        "closure_free": True,
    },
    # DeepSpeed's clipping of the final gradient, the authors' +ce term
    "zero2_gas2_rw_dsclip": {
        "cfg": {"stage": 2, "gas": 2, "clip": 0.05},
        "gru": {"retain_weight": 0.5},
        "reference": {"retain_weight": 0.5, "max_grad_norm": 0.05},
    },
    # GRU's own clipping (DeepSpeed's off), cos clip, persistent (unpartitioned) tensors
    "zero3_gas2_cos_gruclip_persist": {
        "cfg": {"stage": 3, "gas": 2, "persist": True},
        "gru": {"cos_clip": -0.5, "max_grad_norm": 0.05},
    },
    # GRU-k
    "zero2_k3": {"cfg": {"stage": 2}, "gru": {"directions": 3}},
    # bf16 weights and gradients (DeepSpeed keeps fp32 master weights), fp32 memory
    "zero2_bf16": {"cfg": {"stage": 2, "bf16": {"enabled": True}}, "gru": {}},
}


def run_case(name: str, rank: int) -> dict[str, Any]:
    from gru_optim.deepspeed import GRUDeepSpeed

    case = CASES[name]
    cfg = dict(case["cfg"])
    stage = cfg.pop("stage")
    engine = make_engine(ds_config(stage, **cfg))
    gru = GRUDeepSpeed(engine, **case["gru"])
    start = time.perf_counter()
    out = train(
        gru, engine, make_batches(STEPS), rank, closure_free=case.get("closure_free", False)
    )
    out["seconds_per_step"] = (time.perf_counter() - start) / STEPS
    out["params"] = full_params(engine)
    out["memory"] = full_memory(gru, engine)
    out["memory_bytes"] = gru.memory_bytes
    out["numel"] = sum(p.numel() for p in make_model().parameters())
    out["stats_keys"] = sorted(gru.last_stats)
    out["rectified"] = bool(gru.last_stats["rectified"])
    out["conflict"] = bool(gru.last_stats["conflict"])
    if name == "zero0":
        # A retain loss that is not finite: stage 0 has no overflow check in DeepSpeed,
        # so GRU skips the step itself (weights, optimizer state and memory untouched).
        f, _ = closures(engine, make_batches(1, seed=9)[0], rank)
        _, r = closures(engine, make_batches(1, seed=9)[0], rank, poison="retain")
        gru.step(f, r)
        out["nan_step_params"] = full_params(engine)
        out["nan_step_memory"] = full_memory(gru, engine)
        out["nan_step_reason"] = int(gru.last_stats["skip_reason"])
    return out


def checkpoint_case(stage: int, rank: int, tmp: str) -> dict[str, Any]:
    """Train 2 steps, save, train 2 more; a fresh engine loads the checkpoint and trains the
    same 2 steps: weights and memory must be bitwise those of the uninterrupted run."""
    import torch.distributed as dist

    from gru_optim.deepspeed import GRUDeepSpeed

    batches = make_batches(4, seed=77)
    engine = make_engine(ds_config(stage))
    gru = GRUDeepSpeed(engine)
    train(gru, engine, batches[:2], rank)
    path = os.path.join(tmp, f"ckpt{stage}")
    if rank == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    gru.save_checkpoint(path, tag="t")
    saved_memory = full_memory(gru, engine)
    train(gru, engine, batches[2:], rank)
    out: dict[str, Any] = {
        "continued": full_params(engine),
        "continued_mem": full_memory(gru, engine),
    }
    files = sorted(os.listdir(os.path.join(path, "t")))
    out["files"] = files
    engine2 = make_engine(ds_config(stage))
    gru2 = GRUDeepSpeed(engine2)
    gru2.load_checkpoint(path, tag="t")
    out["loaded_mem_equal"] = all(
        torch.equal(a, b) for a, b in zip(full_memory(gru2, engine2), saved_memory)
    )
    train(gru2, engine2, batches[2:], rank)
    out["resumed"] = full_params(engine2)
    out["resumed_mem"] = full_memory(gru2, engine2)
    out["tag_dir"] = os.path.join(path, "t")
    out["saved_mem"] = saved_memory
    return out


def repartition_case(tag_dir: str, rank: int, saved: list[Tensor]) -> bool:
    """A checkpoint's memory saved at one ZeRO stage, loaded into another stage's layout."""
    from gru_optim.deepspeed import GRUDeepSpeed

    engine = make_engine(ds_config(1))
    gru = GRUDeepSpeed(engine)
    gru.load_memory(tag_dir)
    return all(torch.equal(a, b) for a, b in zip(full_memory(gru, engine), saved))


def fp16_case(stage: int, rank: int) -> dict[str, Any]:
    """fp16 with DeepSpeed's dynamic loss scaling: step 0 normal, an overflow in the retain
    loss at step 1, in the forget loss at step 2, step 3 normal."""
    from deepspeed.accelerator import get_accelerator

    from gru_optim.deepspeed import GRUDeepSpeed

    # DeepSpeed's sanity check refuses fp16 on a CPU without AVX512-FP16 / AMX-FP16
    # (torch.ops.mkldnn has no fp16 support there, so CPU_Accelerator.is_fp16_supported()
    # is falsy: "ValueError: Type fp16 is not supported on your device."). The fp16
    # arithmetic itself runs on any CPU: lift the check to exercise DeepSpeed's real loss
    # scaler wherever the tests run.
    acc = get_accelerator()
    refused = not acc.is_fp16_supported()
    type(acc).is_fp16_supported = lambda self: True
    fp16 = {"enabled": True, "initial_scale_power": 8, "hysteresis": 1, "loss_scale_window": 100}
    engine = make_engine(ds_config(stage, fp16=fp16))
    gru = GRUDeepSpeed(engine)
    out: dict[str, Any] = {"refused_without_patch": refused, "steps": []}
    batches = make_batches(4, seed=5)
    for i, b in enumerate(batches):
        before_p, before_m = full_params(engine), full_memory(gru, engine)
        scale = float(engine.optimizer.loss_scale)
        f, r = closures(engine, b, rank, {1: "retain", 2: "forget"}.get(i))
        gru.step(f, r)
        out["steps"].append(
            {
                "applied": bool(engine.was_step_applied()),
                "scale_before": scale,
                "scale_after": float(engine.optimizer.loss_scale),
                "params_same": all(
                    torch.equal(a, b) for a, b in zip(before_p, full_params(engine))
                ),
                "memory_same": all(
                    torch.equal(a, b) for a, b in zip(before_m, full_memory(gru, engine))
                ),
                "reason": int(gru.last_stats["skip_reason"]),
            }
        )
    out["params"] = full_params(engine)
    out["memory"] = full_memory(gru, engine)
    return out


def all_suite(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {"cases": {}, "seconds": {}}
    for name in CASES:
        start = time.perf_counter()
        out["cases"][name] = run_case(name, rank)
        out["seconds"][name] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp0:
        tmp = [tmp0]
        import torch.distributed as dist

        dist.broadcast_object_list(tmp, src=0)  # one directory for both ranks
        for stage in (1, 3):
            start = time.perf_counter()
            out[f"ckpt{stage}"] = checkpoint_case(stage, rank, tmp[0])
            out["seconds"][f"ckpt{stage}"] = time.perf_counter() - start
        c3 = out["ckpt3"]
        out["repartitioned_3_to_1"] = repartition_case(c3.pop("tag_dir"), rank, c3["saved_mem"])
        out["ckpt1"].pop("tag_dir")
        dist.barrier()
    for stage in (2, 3):
        start = time.perf_counter()
        out[f"fp16_{stage}"] = fp16_case(stage, rank)
        out["seconds"][f"fp16_{stage}"] = time.perf_counter() - start
    start = time.perf_counter()
    out["errors"] = errors_case(rank)
    out["seconds"]["errors"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp0:
        start = time.perf_counter()
        out["hf"] = hf_case(rank, world, tmp0)
        out["seconds"]["hf"] = time.perf_counter() - start
    return out


def errors_case(rank: int) -> dict[str, str | bool]:
    """Misuse gives clear errors, before anything changes."""
    from gru_optim.deepspeed import GRUDeepSpeed

    def expect(fn: Callable[[], Any], exc: type[BaseException]) -> str:
        try:
            fn()
        except exc as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    out: dict[str, str | bool] = {}
    engine = make_engine(ds_config(1, gas=2, clip=1.0))
    out["not_engine"] = expect(lambda: GRUDeepSpeed(object()), TypeError)
    out["clip_conflict"] = expect(lambda: GRUDeepSpeed(engine, max_grad_norm=0.5), ValueError)
    out["cos_clip_rw"] = expect(
        lambda: GRUDeepSpeed(engine, cos_clip=-0.5, retain_weight=1.0), ValueError
    )
    gru = GRUDeepSpeed(engine, max_grad_norm=1.0)  # DeepSpeed already clips there: accepted
    b = make_batches(1)[0]
    f, r = closures(engine, b, rank)
    n = BATCH // WORLD
    rows = slice(rank * n, (rank + 1) * n)

    def once() -> Tensor:  # one backward for the whole batch, with 2 accumulation steps
        loss = engine(b["xr"][rows], b["yr"][rows], "retain")
        engine.backward(loss)
        return loss

    def thrice() -> Tensor:
        for _ in range(3):
            loss = engine(b["xr"][rows][:2], b["yr"][rows][:2], "retain")
            engine.backward(loss)
        return loss

    out["too_few"] = expect(lambda: gru.step(f, once), RuntimeError)
    out["too_many"] = expect(lambda: gru.step(f, thrice), RuntimeError)
    out["backward_restored"] = "backward" not in engine.__dict__
    engine2 = make_engine(ds_config(2))
    gru2 = GRUDeepSpeed(engine2)
    f2, r2 = closures(engine2, b, rank)
    with gru2.retain_pass():
        r2()
    out["twice"] = expect(lambda: gru2.retain_pass().__enter__(), RuntimeError)
    out["save_between"] = expect(lambda: gru2.save_checkpoint("unused"), RuntimeError)
    out["load_between"] = expect(lambda: gru2.load_memory("unused"), RuntimeError)
    f2()
    gru2.step()
    out["closure_free_rectified"] = bool(gru2.last_stats["rectified"])
    out["backward_restored_2"] = "backward" not in engine2.__dict__
    none: Any = None
    out["gamma_none"] = expect(lambda: GRUDeepSpeed(engine2, gamma=none), TypeError)
    # glob characters in the checkpoint's path are the path's, not a pattern
    import torch.distributed as dist

    tmp = [tempfile.mkdtemp(prefix="gru[ds]*") if rank == 0 else ""]
    dist.broadcast_object_list(tmp, src=0)
    params = list(engine2.module.parameters())
    saved = [gru2.retain_memory(p) for p in params]
    saved = [None if m is None else m.clone() for m in saved]
    gru2.save_checkpoint(tmp[0], tag="t[0]")
    for p in params:
        if (m := gru2.retain_memory(p)) is not None:
            m.add_(1.0)
    gru2.load_memory(os.path.join(tmp[0], "t[0]"))

    def same(now: Tensor | None, before: Tensor | None) -> bool:  # no memory reads as zeros
        if now is None or before is None:
            rest = now if before is None else before
            return rest is None or not bool(rest.any())
        return torch.equal(now, before)

    nonzero = sum(m is not None and bool(m.any()) for m in saved)
    loaded = all(same(gru2.retain_memory(p), m) for p, m in zip(params, saved))
    out["glob_path_loaded"] = nonzero > 0 and loaded
    out["no_memory_files"] = expect(lambda: gru2.load_memory(tmp[0]), FileNotFoundError)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(tmp[0])
    bf16 = make_engine(ds_config(0, bf16={"enabled": True}))
    out["stage0_bf16"] = expect(lambda: GRUDeepSpeed(bf16), NotImplementedError)
    return out


# --------------------------------------------------------------------------- GRUTrainer
def hf_case(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """2 steps of GRUTrainer with TrainingArguments(deepspeed=<ZeRO-3>) on both ranks, 2
    micro-batches each; rank 0 replays them with GRUOptimizer's closure path on the union
    of both ranks' micro-batches (one process)."""
    import copy

    import torch.distributed as dist
    from _tiny_models import FORGET_AUTHORS, RETAIN_AUTHORS, qa_examples, tiny_model, tiny_tokenizer
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import TrainingArguments

    from gru_optim.data import PairedCollator, PairedUnlearningDataset
    from gru_optim.hf import GRUTrainer as base
    from gru_optim.objectives import get_objective

    class Recording(base):  # type: ignore[misc, valid-type]
        def gru_begin_step(self, micro_batches: list[Any]) -> None:
            self.seen = [*getattr(self, "seen", []), micro_batches]
            super().gru_begin_step(micro_batches)

    def unpad(batch: dict[str, Tensor]) -> list[dict[str, list[int]]]:
        keep = batch["attention_mask"].bool()
        return [{k: v[i][keep[i]].tolist() for k, v in batch.items()} for i in range(len(keep))]

    zero3 = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "hf"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=0.05,
        optim="sgd",
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        deepspeed=zero3,
    )
    forget, retain = qa_examples(FORGET_AUTHORS), qa_examples(RETAIN_AUTHORS)
    model = tiny_model("gpt2", seed=3)
    start = copy.deepcopy(model)
    trainer = Recording(
        model=model,
        args=args,
        train_dataset=PairedUnlearningDataset(forget, retain),
        processing_class=tiny_tokenizer(),
        objective="npo_rt",
    )
    out: dict[str, Any] = {}
    trainer.train()
    engine = trainer.model_wrapped
    gru = trainer.gru_optimizer
    out["engine"] = type(engine).__name__
    out["stage"] = int(engine.zero_optimization_stage())
    out["memory_bytes"] = gru.memory_bytes
    weights = torch.cat([safe_get_full_fp32_param(p).flatten() for p in engine.module.parameters()])
    memory = torch.cat([m.flatten() for m in full_memory(gru, engine)])
    out["numel"] = int(weights.numel())
    steps = [
        [{"forget": unpad(mb["forget"])[0], "retain": unpad(mb["retain"])[0]} for mb in s]
        for s in trainer.seen
    ]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, steps)
    out["weights"], out["memory"] = weights, memory
    if rank == 0:
        ref = copy.deepcopy(start).eval()
        obj = get_objective("npo_rt")
        opt = GRUOptimizer(torch.optim.SGD(start.parameters(), lr=0.05))
        collate = PairedCollator(tiny_tokenizer().pad_token_id)
        start.train()
        for s in range(2):
            batch = collate(gathered[0][s] + gathered[1][s])

            def forget_closure(batch: dict[str, Any] = batch) -> Tensor:
                loss = obj.model_loss(start, batch["forget"], batch["retain"], ref_model=ref)
                loss.backward()
                return loss

            def retain_closure(batch: dict[str, Any] = batch) -> Tensor:
                loss = start(**batch["retain"]).loss
                loss.backward()
                return loss

            opt.zero_grad()
            opt.step(forget_closure, retain_closure)
        out["union_weights"] = torch.cat([p.detach().flatten() for p in start.parameters()])
        out["union_memory"] = torch.cat(
            [opt.retain_memory(p).flatten() for p in start.parameters()]  # type: ignore[union-attr]
        )
        out["start_weights"] = torch.cat(
            [p.detach().flatten() for p in tiny_model("gpt2", seed=3).parameters()]
        )
    return out


# --------------------------------------------------------------------------- GRUMixin
def hf_mixin_case(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """2 steps of an open-unlearning-style NPO trainer (tests/_unlearn_trainers.py) with
    GRUMixin and TrainingArguments(deepspeed=<ZeRO-3>, max_grad_norm=0.3) on both ranks, 2
    micro-batches each; rank 0 replays them with GRUOptimizer.step(forget_closure,
    retain_closure) on one process: the forget closure back-propagates the trainer's own
    compute_loss of every micro-batch of both ranks (each divided by the number of
    micro-batches of a rank and by the number of ranks, as accumulation and the gradient
    averaging do), the retain closure the retain NLL normalised like the mixin's."""
    import copy

    import torch.distributed as dist
    from _tiny_models import FORGET_AUTHORS, RETAIN_AUTHORS, qa_examples, tiny_model, tiny_tokenizer
    from _unlearn_trainers import NPO
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import TrainingArguments

    from gru_optim.data import PairedCollator, PairedUnlearningDataset
    from gru_optim.hf import GRUMixin
    from gru_optim.objectives import nll_loss, token_mask

    class RecordingGRUNPO(GRUMixin, NPO):  # type: ignore[misc]
        def gru_begin_step(self, micro_batches: list[Any]) -> None:
            cpu = [{g: {k: v.cpu() for k, v in b[g].items()} for g in b} for b in micro_batches]
            self.seen = [*getattr(self, "seen", []), cpu]

    zero3 = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    clip = 0.3
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "mixin"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=0.05,
        optim="sgd",
        max_grad_norm=clip,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        remove_unused_columns=False,
        deepspeed=zero3,
    )
    model = tiny_model("gpt2", seed=3)
    start = copy.deepcopy(model)
    trainer = RecordingGRUNPO(
        model=model,
        args=args,
        train_dataset=PairedUnlearningDataset(
            qa_examples(FORGET_AUTHORS)[:4], qa_examples(RETAIN_AUTHORS)
        ),
        data_collator=PairedCollator(tiny_tokenizer().pad_token_id),
        beta=0.5,
        alpha=0.1,
        gru_gamma=0.9,
    )
    trainer.train()
    engine = trainer.model_wrapped
    gru = trainer.gru_optimizer
    out: dict[str, Any] = {
        "engine": type(engine).__name__,
        "stage": int(engine.zero_optimization_stage()),
        "clip": float(engine.gradient_clipping()),
        "memory_bytes": gru.memory_bytes,
        "rectified": bool(gru.last_stats["rectified"]),
        "average_tokens": bool(getattr(args, "average_tokens_across_devices", False)),
    }
    weights = torch.cat([safe_get_full_fp32_param(p).flatten() for p in engine.module.parameters()])
    out["weights"], out["numel"] = weights, int(weights.numel())
    out["memory"] = torch.cat([m.flatten() for m in full_memory(gru, engine)])
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, trainer.seen)
    if rank != 0:
        return out
    ref = copy.deepcopy(start)
    ref.train()
    opt = GRUOptimizer(torch.optim.SGD(ref.parameters(), lr=0.05), gamma=0.9, max_grad_norm=clip)
    for s in range(2):
        per_rank = [gathered[r][s] for r in range(world)]
        union = [b for micro in per_rank for b in micro]

        def forget_closure(per_rank: list[Any] = per_rank) -> Tensor:
            total = torch.zeros(())
            for micro in per_rank:
                for b in micro:
                    loss = trainer.compute_loss(ref, b) / (len(micro) * world)
                    loss.backward()
                    total = total + loss.detach()
            return total

        def retain_closure(per_rank: list[Any] = per_rank, union: list[Any] = union) -> Tensor:
            total = torch.zeros(())
            for micro in per_rank:
                # transformers 5 counts the retain tokens over all ranks; 4.45 per rank
                group = union if out["average_tokens"] else micro
                n = sum(token_mask(b["retain"]["labels"]).sum() for b in group)
                scale = 1.0 if out["average_tokens"] else 1.0 / world
                for b in micro:
                    r = b["retain"]
                    logits = ref(
                        input_ids=r["input_ids"], attention_mask=r["attention_mask"]
                    ).logits
                    loss = nll_loss(logits, r["labels"], num_items=n) * scale
                    loss.backward()
                    total = total + loss.detach()
            return total

        opt.zero_grad()
        opt.step(forget_closure, retain_closure)
        out.setdefault("conflicts", []).append(bool(opt.last_stats["conflict"]))
    out["replay_weights"] = torch.cat([p.detach().flatten() for p in ref.parameters()])
    out["replay_memory"] = torch.cat(
        [opt.retain_memory(p).flatten() for p in ref.parameters()]  # type: ignore[union-attr]
    )
    out["start_weights"] = torch.cat([p.detach().flatten() for p in start.parameters()])
    return out


def mixin_suite(rank: int, world: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp0:
        tmp = [tmp0]
        import torch.distributed as dist

        dist.broadcast_object_list(tmp, src=0)
        return {"mixin": hf_mixin_case(rank, world, tmp[0])}


SUITES: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "all": all_suite,
    "hf_mixin": mixin_suite,
    "errors": lambda rank, world: {"errors": errors_case(rank)},  # a quick look at misuse
}


# --------------------------------------------------------------------------- spawning
def _entry(suite: str, rank: int, world: int, port: int, outdir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    result: dict[str, Any] = {}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=300),
            )
            try:
                result = SUITES[suite](rank, world)
            finally:
                dist.destroy_process_group()
        except BaseException:  # reported to the test process, which fails with it
            result["error"] = traceback.format_exc()
    result["wall_seconds"] = time.perf_counter() - start
    result["warnings"] = [
        f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
    ]
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))


def spawn(suite: str, world: int = WORLD, timeout: float = 600.0) -> list[dict[str, Any]]:
    """Run ``SUITES[suite]`` on ``world`` processes; the result dictionary of each rank."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        port = free_port()
        procs = [
            ctx.Process(target=_entry, args=(suite, rank, world, port, outdir), daemon=True)
            for rank in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join()
        if hung:
            raise TimeoutError(
                f"suite {suite!r}: {len(hung)} process(es) still running after {timeout} s"
            )
        results = []
        for rank in range(world):
            path = os.path.join(outdir, f"rank{rank}.pt")
            if not os.path.exists(path):
                raise RuntimeError(
                    f"suite {suite!r}: rank {rank} exited ({procs[rank].exitcode}) without a result"
                )
            results.append(torch.load(path, weights_only=True))
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"suite {suite!r} failed:\n" + "\n".join(errors))
    return results


if __name__ == "__main__":  # a quick look: python tests/_deepspeed_workers.py
    res = spawn(sys.argv[1] if len(sys.argv) > 1 else "all")
    print({k: v for k, v in res[0].items() if k != "cases"})
