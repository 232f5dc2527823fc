"""GRU on real DeepSpeed engines: ZeRO stages 0-3 on 2 CPU processes (gloo), exact against one
float64 process on the union batch.

One spawned run (tests/_deepspeed_workers.py, about 20 s; the first DeepSpeed launch on a
machine also JIT-compiles DeepSpeed's shared-memory op, about 70-90 s, cached in
``~/.cache/torch_extensions``) builds an engine per case with
``deepspeed.initialize(model=..., optimizer=torch.optim.AdamW(...), config=...)`` and drives it
with :class:`gru_optim.deepspeed.GRUDeepSpeed`; the tests below compare what both ranks
returned with :class:`~gru_optim.GRUOptimizer` in float64 on one process (and that with the
independent tests/_reference.py), and check the collectives, the memory's sharding,
accumulation, clipping, fp16 overflow skipping, checkpoints and ``GRUTrainer`` on ZeRO-3.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import _deepspeed_workers as W
import pytest
import torch
from _reference import ReferenceGRU

from gru_optim import SkipReason

FP32 = 1e-6  # float32 engines against float64: a few ulps of float32 after 3 steps
BASE = ["zero0", "zero1", "zero2", "zero3"]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and len(a) > 0
    return max(float((x.detach().double() - y.detach().double()).abs().max()) for x, y in zip(a, b))


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def spawned() -> list[dict[str, Any]]:
    return W.spawn("all")


@pytest.fixture(scope="module")
def cases(spawned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r["cases"] for r in spawned]


def reference(name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    case = W.CASES[name]
    return W.reference_run(W.make_batches(W.STEPS), **case.get("reference", case["gru"]))


# ----------------------------------------------------------------------------- the reference
def test_the_float64_reference_is_the_independent_derivation() -> None:
    # GRUOptimizer in float64 on one process against tests/_reference.py (written from the
    # paper, no shared code), on the same model and data; and it does something.
    params, mems = reference("zero0")
    model = W.make_model(torch.float64)
    ref = ReferenceGRU(W.inner(model.parameters()))
    for b in W.make_batches(W.STEPS):
        ref.step(*W.reference_closures(model, b))
    assert max_diff(params, [p.detach() for p in model.parameters()]) < 1e-12
    ref_mems = [ref.memory(p) for p in model.parameters()]
    assert (
        max_diff(
            mems,
            [torch.zeros_like(p) if m is None else m for p, m in zip(model.parameters(), ref_mems)],
        )
        < 1e-12
    )
    assert any(info["conflict"] for info in ref.history)  # the projection acted
    assert max_diff(params, list(W.make_model(torch.float64).parameters())) > 1e-2


# ----------------------------------------------------------------------------- ZeRO 0-3
@pytest.mark.parametrize("name", BASE)
def test_each_zero_stage_equals_one_process_in_float64(cases, name: str) -> None:
    params, mems = reference(name)
    r0, r1 = cases[0][name], cases[1][name]
    assert identical(r0["params"], r1["params"])  # ranks identical, bitwise
    assert identical(r0["memory"], r1["memory"])
    assert max_diff(r0["params"], params) < FP32
    assert max_diff(r0["memory"], mems) < FP32
    assert r0["rectified"] and r0["conflict"]  # the last step projected
    assert {"dot", "cosine", "coef", "skip_reason"} <= set(r0["stats_keys"])


def test_memory_is_sharded_like_the_gradients(cases) -> None:
    numel = cases[0]["zero0"]["numel"]
    # ZeRO-0 replicates the gradients: the whole memory on every rank.
    assert [c["zero0"]["memory_bytes"] for c in cases] == [4 * numel] * 2
    for name in ("zero1", "zero2", "zero3"):
        local = [c[name]["memory_bytes"] for c in cases]
        assert sum(local) == 4 * numel  # each element on exactly one rank, float32
        assert max(local) <= 4 * (numel // 2 + 10)  # 1/world (plus partition rounding)
    # GRU-k keeps k - 1 recent retain gradients next to the memory, sharded the same way.
    assert sum(c["zero2_k3"]["memory_bytes"] for c in cases) == 3 * 4 * numel


def test_one_packed_all_reduce_per_step(cases) -> None:
    n_tensors = 7
    for c in cases:
        # Replicated gradients: nothing to reduce.
        assert c["zero0"]["calls"] == [[]] * W.STEPS
        # "Is the retain gradient finite?" (1 float), then [<g, m>, |m|^2, |g|^2].
        for name in ("zero1", "zero2", "zero3", "zero2_gas2_rw_dsclip"):
            assert c[name]["calls"] == [[(1, 4), (3, 12)]] * W.STEPS
        k = 3 * n_tensors
        assert c["zero1_gas2_free_tensor"]["calls"] == [[(1, 4), (k, 4 * k)]] * W.STEPS
        # GRU's own clipping: one more float (the norm of the final gradient).
        clipped = c["zero3_gas2_cos_gruclip_persist"]["calls"]
        assert clipped == [[(1, 4), (3, 12), (1, 4)]] * W.STEPS
        # GRU-k, k = 3: 6 Gram entries, 3 dots with g, |g|^2.
        assert c["zero2_k3"]["calls"] == [[(1, 4), (10, 40)]] * W.STEPS


@pytest.mark.parametrize(
    "name",
    [
        # 2 micro-batches per pass equal one large batch; the closure-free path; per tensor
        "zero1_gas2_free_tensor",
        # DeepSpeed's gradient_clipping acts on the rectified gradient; retain_weight
        "zero2_gas2_rw_dsclip",
        # GRU's max_grad_norm, cos clip; ZeRO-3 with persistent (unpartitioned) small tensors
        "zero3_gas2_cos_gruclip_persist",
        "zero2_k3",
    ],
)
def test_accumulation_clipping_and_rules_equal_one_process(cases, name: str) -> None:
    params, mems = reference(name)
    r0, r1 = cases[0][name], cases[1][name]
    assert identical(r0["params"], r1["params"]) and identical(r0["memory"], r1["memory"])
    assert max_diff(r0["params"], params) < FP32
    assert max_diff(r0["memory"], mems) < FP32
    # ... and each is another run than the plain configuration.
    assert max_diff(r0["params"], cases[0]["zero1"]["params"]) > 1e-5


def test_bf16_equals_one_process_to_bf16_precision(cases) -> None:
    params, mems = reference("zero2_bf16")
    r0, r1 = cases[0]["zero2_bf16"], cases[1]["zero2_bf16"]
    assert identical(r0["params"], r1["params"]) and identical(r0["memory"], r1["memory"])
    assert max_diff(r0["params"], params) < 5e-3  # bf16 forward and backward
    assert max_diff(r0["memory"], mems) < 5e-3
    assert r0["memory_bytes"] + r1["memory_bytes"] == 4 * r0["numel"]  # float32 memory


def test_stage0_skips_a_step_whose_retain_gradient_is_not_finite(cases) -> None:
    # DeepSpeed has no overflow check at stage 0: GRU skips the step itself.
    for c in cases:
        z = c["zero0"]
        assert z["nan_step_reason"] == SkipReason.RETAIN_NONFINITE
        assert identical(z["nan_step_params"], z["params"])
        assert identical(z["nan_step_memory"], z["memory"])


# ----------------------------------------------------------------------------- fp16
@pytest.mark.parametrize("stage", [2, 3])
def test_fp16_overflow_skips_the_step_and_leaves_the_memory(spawned, stage: int) -> None:
    runs = [r[f"fp16_{stage}"] for r in spawned]
    # DeepSpeed refuses fp16 on a CPU without AVX512-FP16/AMX-FP16 unless its device check
    # is lifted (see the worker); the worker's own reading of the check agrees with torch's.
    supported = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    assert spawned[0]["fp16_2"]["refused_without_patch"] is (not supported)
    for r in runs:
        ok, retain_inf, forget_inf, ok2 = r["steps"]
        assert ok["applied"] and ok2["applied"] and not ok["params_same"]
        for bad, reason in (
            (retain_inf, SkipReason.RETAIN_NONFINITE),
            (forget_inf, SkipReason.FORGET_NONFINITE),
        ):
            assert bad["applied"] is False  # DeepSpeed skipped it
            assert bad["params_same"] and bad["memory_same"]  # weights and memory untouched
            assert bad["scale_after"] == bad["scale_before"] / 2  # and lowered the scale
            assert bad["reason"] == reason
    assert identical(runs[0]["params"], runs[1]["params"])
    # The two applied steps are the float64 run on those two batches, to fp16's precision.
    b = W.make_batches(4, seed=5)
    params, mems = W.reference_run([b[0], b[3]])
    assert max_diff(runs[0]["params"], params) < 1e-3
    assert max_diff(runs[0]["memory"], mems) < 1e-3


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("stage", [1, 3])
def test_checkpoint_resume_is_bitwise(spawned, stage: int) -> None:
    for r in spawned:
        c = r[f"ckpt{stage}"]
        assert {"gru_memory_rank00000.pt", "gru_memory_rank00001.pt"} <= set(c["files"])
        assert c["loaded_mem_equal"] is True
        assert identical(c["resumed"], c["continued"])
        assert identical(c["resumed_mem"], c["continued_mem"])
    # The checkpoint was taken mid-run: the memory moved on after it.
    c = spawned[0][f"ckpt{stage}"]
    assert not identical(c["saved_mem"], c["continued_mem"])


def test_memory_saved_at_zero3_loads_into_a_zero1_layout(spawned) -> None:
    assert [r["repartitioned_3_to_1"] for r in spawned] == [True, True]


# ----------------------------------------------------------------------------- misuse
def test_misuse_raises_clearly(spawned) -> None:
    for r in spawned:
        e = r["errors"]
        assert e["not_engine"].startswith("TypeError: GRUDeepSpeed drives a DeepSpeedEngine")
        assert "set one of them" in e["clip_conflict"]
        assert e["cos_clip_rw"].startswith("ValueError: cos_clip")
        assert "called engine.backward 1 time(s), expected 2" in e["too_few"]
        assert "more than 2 times" in e["too_many"]
        assert e["backward_restored"] is True and e["backward_restored_2"] is True
        assert "retain_pass entered twice" in e["twice"]
        assert e["save_between"].startswith("RuntimeError: save_checkpoint() between")
        assert e["load_between"].startswith("RuntimeError: loading the memory between")
        assert e["gamma_none"].startswith("TypeError: gamma and retain_weight must be numbers")
        assert e["glob_path_loaded"] is True
        assert e["no_memory_files"].startswith("FileNotFoundError: no GRU memory in")
        assert e["closure_free_rectified"] is True
        assert e["stage0_bf16"].startswith("NotImplementedError")


def test_missing_deepspeed_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "from gru_optim.deepspeed import GRUDeepSpeed\n"
        "try:\n    GRUDeepSpeed(None)\n"
        "except ImportError as e:\n    print(e)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert 'pip install "gru-optim[deepspeed]"' in out.stdout, out.stderr


# ----------------------------------------------------------------------------- GRUTrainer
def test_gru_trainer_on_zero3_equals_one_process_on_the_union_batch(spawned) -> None:
    h0, h1 = spawned[0]["hf"], spawned[1]["hf"]
    assert h0["engine"] == "DeepSpeedEngine" and h0["stage"] == 3
    assert torch.equal(h0["weights"], h1["weights"]) and torch.equal(h0["memory"], h1["memory"])
    assert float((h0["weights"] - h0["union_weights"]).abs().max()) < 1e-5
    assert float((h0["memory"] - h0["union_memory"]).abs().max()) < 1e-5
    assert float((h0["union_weights"] - h0["start_weights"]).abs().max()) > 1e-3
    assert h0["memory_bytes"] + h1["memory_bytes"] == 4 * h0["numel"]  # sharded, float32


# ----------------------------------------------------------------------------- warnings
def test_no_warning_but_the_known_third_party_ones(spawned) -> None:
    for r in spawned:
        assert not [w for w in r["warnings"] if "gru_optim" in w]
        unknown = [w for w in r["warnings"] if not any(k in w for k in W.KNOWN_WARNINGS)]
        assert unknown == []
