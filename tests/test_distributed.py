"""GRU under torch.distributed: DDP, ZeroRedundancyOptimizer, FSDP2, distributed checkpoints.

Two real processes with a gloo process group on the CPU (tests/_dist_workers.py). Each
suite is one spawned run holding several checks; the tests below compare what the ranks
returned with one process training on the union of the ranks' batches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import _dist_workers as W
import pytest
import torch

WORLD = 2


def close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.fixture(scope="module")
def spawned() -> list[dict[str, Any]]:
    # One spawned run (2 processes, one process group) holds every check of this module.
    return W.spawn("all", WORLD)


@pytest.fixture(scope="module")
def ddp(spawned) -> list[dict[str, Any]]:
    return [r["ddp"] for r in spawned]


@pytest.fixture(scope="module")
def fsdp(spawned) -> list[dict[str, Any]]:
    return [r["fsdp"] for r in spawned]


@pytest.fixture(scope="module")
def reference() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return W.reference_run()


def test_reference_moves_and_rectifies() -> None:
    # The single-process run the distributed runs are compared with does something: the
    # weights move and the memory is not zero.
    params, mems = W.reference_run()
    start = list(W.make_model().parameters())
    assert any(not torch.equal(p, q) for p, q in zip(params, start))
    assert all(m.abs().sum() > 0 for m in mems)


# ----------------------------------------------------------------------------- DDP
def test_ddp_replicas_identical_and_equal_to_one_process(ddp, reference) -> None:
    identical(ddp[0]["closures"], ddp[1]["closures"])
    identical(ddp[0]["closures_mem"], ddp[1]["closures_mem"])
    close(ddp[0]["closures"], reference[0])
    close(ddp[0]["closures_mem"], reference[1])


def test_ddp_bucket_view_no_sync_closure_free(ddp, reference) -> None:
    # gradient_as_bucket_view=True: GRU wrote into the bucket views, never replaced them.
    for r in ddp:
        assert r["bucket_storages_same"] is True
        assert r["bucket_storages"] == 1  # the whole model's gradients live in one bucket
    identical(ddp[0]["bucket_view"], ddp[1]["bucket_view"])
    close(ddp[0]["bucket_view"], reference[0])
    close(ddp[0]["bucket_view_mem"], reference[1])


def test_ddp_no_sync_closures_with_retain_weight(ddp) -> None:
    params, _ = W.reference_run(retain_weight=0.5)
    identical(ddp[0]["no_sync_rw"], ddp[1]["no_sync_rw"])
    close(ddp[0]["no_sync_rw"], params)
    # ... and it is another run than without the retain term.
    assert not torch.allclose(ddp[0]["no_sync_rw"][0], ddp[0]["closures"][0])


@pytest.mark.parametrize(
    ("key", "kw", "post"),
    [
        ("ddp_clip_cos", {"max_grad_norm": 0.05, "cos_clip": -0.5}, False),
        ("ddp_post", {"max_grad_norm": 0.05}, True),
        ("ddp_k4", {"directions": 4, "retain_weight": 0.5}, False),
    ],
)
def test_ddp_clip_cos_clip_and_post_closure_equal_one_process(ddp, key, kw, post) -> None:
    params, _ = W.reference_run(post=post, **kw)
    identical(ddp[0][key], ddp[1][key])
    close(ddp[0][key], params)
    assert not torch.allclose(ddp[0][key][0], ddp[0]["closures"][0])


def test_zero_redundancy_optimizer_inside_gru(ddp, reference) -> None:
    identical(ddp[0]["zero"], ddp[1]["zero"])
    close(ddp[0]["zero"], reference[0])
    # The AdamW state is partitioned: each rank holds less than the full 2 x numel.
    for r in ddp:
        assert 0 < r["zero_local_state"] < 2 * r["numel"]
    assert sum(r["zero_local_state"] for r in ddp) == 2 * ddp[0]["numel"]


def test_zero_redundancy_optimizer_checkpoint_resumes_exactly(ddp) -> None:
    for r in ddp:
        assert r["zero_ckpt_has_mem"] is True
        identical(r["zero_resumed"], r["zero_continued"])
    assert not torch.equal(ddp[0]["zero_continued"][0], ddp[0]["zero"][0])  # it trained on


# ----------------------------------------------------------------------------- FSDP2
def test_fsdp2_equals_one_process(fsdp, reference) -> None:
    identical(fsdp[0]["fsdp"], fsdp[1]["fsdp"])
    close(fsdp[0]["fsdp"], reference[0])
    close(fsdp[0]["fsdp_mem"], reference[1])
    close(fsdp[0]["fsdp_no_skip"], reference[0])


def test_fsdp2_micro_batches_without_gradient_sync(fsdp, reference) -> None:
    identical(fsdp[0]["fsdp_micro"], fsdp[1]["fsdp_micro"])
    close(fsdp[0]["fsdp_micro"], reference[0])
    for r in fsdp:
        assert r["calls_micro"] == [[(1, 4), (3, 12)]] * W.STEPS  # still once per step


def test_fsdp2_per_tensor_granularity(fsdp) -> None:
    params, _ = W.reference_run(granularity="tensor")
    close(fsdp[0]["fsdp_tensor"], params)
    assert not torch.allclose(fsdp[0]["fsdp_tensor"][0], fsdp[0]["fsdp"][0])


@pytest.mark.parametrize(
    ("key", "kw", "post"),
    [
        ("fsdp_clip_cos", {"max_grad_norm": 0.05, "cos_clip": -0.5}, False),
        ("fsdp_post", {"max_grad_norm": 0.05}, True),
    ],
)
def test_fsdp2_clip_cos_clip_and_post_closure_equal_one_process(fsdp, key, kw, post) -> None:
    params, _ = W.reference_run(post=post, **kw)
    identical(fsdp[0][key], fsdp[1][key])
    close(fsdp[0][key], params)
    assert not torch.allclose(fsdp[0][key][0], fsdp[0]["fsdp"][0])


def test_fsdp2_gru_k_equals_one_process_with_one_packed_all_reduce(fsdp) -> None:
    params, _ = W.reference_run(directions=4)
    identical(fsdp[0]["fsdp_k4"], fsdp[1]["fsdp_k4"])
    close(fsdp[0]["fsdp_k4"], params)
    k = 4
    packed = k * (k + 1) // 2 + k + 1  # Gram entries, dots with g, |g|^2
    for r in fsdp:
        assert r["fsdp_k4_history_local"] is True
        assert r["calls_k4"] == [[(1, 4), (packed, 4 * packed)]] * W.STEPS
        identical(r["k4_resumed"], r["k4_continued"])


def test_fsdp2_clipping_adds_one_scalar_all_reduce(fsdp) -> None:
    for r in fsdp:
        assert r["calls_clip_cos"] == [[(1, 4), (3, 12), (1, 4)]] * W.STEPS


def test_fsdp2_update_space(fsdp) -> None:
    params, _ = W.reference_run(space="update")
    close(fsdp[0]["fsdp_update"], params)
    assert not torch.allclose(fsdp[0]["fsdp_update"][0], fsdp[0]["fsdp"][0])
    for r in fsdp:
        # Before the inner step only ||g||^2 (is the gradient finite?); the update is known
        # only after it: then the packed [dot, ||m||^2, ||v||^2].
        assert r["calls_update"] == [[(1, 4), (1, 4), (3, 12)]] * W.STEPS


def test_fsdp2_memory_is_sharded_like_the_parameters(fsdp) -> None:
    for r in fsdp:
        assert r["placements_match"] is True
        assert r["mem_local"] == r["param_local"]
    assert sum(r["mem_local"] for r in fsdp) == fsdp[0]["numel"]
    assert fsdp[0]["mem_local"] * WORLD == fsdp[0]["numel"]


def test_fsdp2_collectives_per_step(fsdp) -> None:
    n_tensors = 6
    for r in fsdp:
        # skip_nonfinite (default): the retain pass reduces one float (is the retain
        # gradient finite?), the step one packed [dot, ||m||^2, ||g||^2].
        assert r["calls_default"] == [[(1, 4), (3, 12)]] * W.STEPS
        assert r["calls_no_skip"] == [[(3, 12)]] * W.STEPS
        k = 3 * n_tensors  # [dot, ||m||^2, ||g||^2] per segment
        assert r["calls_tensor"] == [[(1, 4), (k, 4 * k)]] * W.STEPS
        assert r["calls_plain"] == []


def test_fsdp2_distributed_checkpoint_resumes_exactly(fsdp) -> None:
    for r in fsdp:
        identical(r["dcp_loaded_mem"], r["dcp_saved_mem"])
        identical(r["dcp_resumed"], r["dcp_continued"])
        identical(r["dcp_resumed_mem"], r["dcp_continued_mem"])
        assert r["full_osd_has_mem"] is True
        assert r["full_roundtrip_mem_equal"] is True
    # The checkpoint was taken mid-run: the memory moved on after it.
    assert not torch.equal(fsdp[0]["dcp_saved_mem"][0], fsdp[0]["dcp_continued_mem"][0])


def test_fsdp2_sharded_grad_scaler(fsdp) -> None:
    identical(fsdp[0]["scaled"], fsdp[0]["fsdp"])  # scaled run == unscaled run, bitwise
    for r in fsdp:
        assert r["scale_after"] == 2.0**10 * 2**W.STEPS  # growth_interval=1, no overflow
        # An overflow in one rank's gradient shard: every rank skips and backs off.
        assert r["overflow_skipped"] is True
        assert r["overflow_params_same"] is True
        assert r["overflow_mems_same"] is True
        assert r["scale_after_overflow"] == r["scale_after"] / 2


def test_no_warning_from_gru_in_the_workers(spawned) -> None:
    for r in spawned:
        assert isinstance(r["warnings"], list)
        # A PlainStepWarning names the worker's own line, not gru_optim's.
        assert not [w for w in r["warnings"] if "gru_optim" in w or "PlainStepWarning" in w]


def test_launch_script_runs_two_cpu_processes() -> None:
    # What a newcomer runs first: torchrun, 2 processes, gloo, DDP (docs/guides/ddp.md).
    script = Path(__file__).resolve().parents[1] / "docs" / "examples" / "launch_cpu.sh"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(script), "--steps", "3", "--batch", "8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 rank(s), DDP: weights identical on every rank: True" in proc.stdout
