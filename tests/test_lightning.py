"""GRU under PyTorch Lightning 2.6: real Trainers, no mocks (tests/_lightning_workers.py).

Every run is compared with one process and no Lightning, ``opt.zero_grad();
opt.step(forget_closure, retain_closure)`` over the same rows (float64):

- automatic optimization (:class:`gru_optim.lightning.GRULightningModule`): Lightning
  leaves the previous step's gradients in ``.grad`` when GRU's retain closure starts and
  calls ``zero_grad`` inside its own (forget) closure; GRU clears the former and ignores
  the latter;
- manual optimization (``retain_pass()`` on the GRUOptimizer, ``manual_backward`` twice);
- DDP on 2 CPU processes (gloo, ``strategy="ddp"``): the ranks stay bitwise identical,
  and a retain closure calling the bare module instead makes them drift;
- ``Trainer.fit(ckpt_path=...)`` from checkpoints taken mid-epoch equals the
  uninterrupted run, memory included.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import _lightning_workers as W
import pytest
import torch
from lightning_fabric.utilities.warnings import PossibleUserWarning
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from gru_optim import EMA_KEY, GRUOptimizer
from gru_optim.lightning import ResumableDataLoader, find_gru_optimizer

pytestmark = [
    # torch 2.13 deprecates isinstance(x, LeafSpec); Lightning 2.6's CombinedLoader uses it
    pytest.mark.filterwarnings(f"ignore:{W.LEAFSPEC_WARNING}:FutureWarning"),
    # Lightning suggests DataLoader workers where it counts more than 2 cores (none here)
    pytest.mark.filterwarnings(
        f"ignore:{W.WORKERS_WARNING}:lightning_fabric.utilities.warnings.PossibleUserWarning"
    ),
]

EXACT = 1e-10  # float64: summation order (DDP's all-reduce) is the only difference


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and len(a) > 0
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def assert_matches(res: dict[str, Any], ref: dict[str, list[torch.Tensor]]) -> None:
    assert res["global_step"] == W.STEPS and res["rectified"]
    assert max_diff(res["params"], ref["params"]) <= EXACT
    assert max_diff(res["mems"], ref["mems"]) <= EXACT


@pytest.fixture(scope="module")
def reference() -> dict[str, list[torch.Tensor]]:
    return W.reference_run()


def test_reference_moves_and_rectifies(reference) -> None:
    # The run everything is compared with does something: the weights move, the memory is
    # not zero, and the retain term changes the result.
    start = W.params(W.make_net())
    assert max_diff(reference["params"], start) > 1e-2
    assert all(m.abs().sum() > 0 for m in reference["mems"])
    assert max_diff(W.reference_run(retain_weight=0.5)["params"], reference["params"]) > 1e-3


# --------------------------------------------------------------------------- automatic
class Recording(W.Unlearner):
    """Records, at every optimizer step, whether stale gradients were there, and every
    zero_grad Lightning's closure makes."""

    def __init__(self, **gru: Any) -> None:
        super().__init__(**gru)
        self.stale: list[bool] = []
        self.zero_grads = 0

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        self.stale.append(any(p.grad is not None for p in self.parameters()))
        super().optimizer_step(*args, **kwargs)

    def on_before_zero_grad(self, optimizer: Any) -> None:
        self.zero_grads += 1


@pytest.mark.parametrize("retain_weight", [0.0, 0.5])
def test_automatic_optimization_equals_the_closure_loop(retain_weight: float) -> None:
    module = Recording(retain_weight=retain_weight)
    W.make_trainer().fit(module)
    res = W.result(module)
    assert_matches(res, W.reference_run(retain_weight=retain_weight))
    # What the equality proves: from the second step on, the previous step's gradients
    # were in .grad when GRU's retain closure started, and Lightning called zero_grad in
    # every forget closure (with retain_weight, .grad then held the retain term).
    assert module.stale == [False] + [True] * (W.STEPS - 1)
    assert module.zero_grads == W.STEPS
    assert module.seen == list(range(W.ROWS)) * W.EPOCHS


def test_manual_optimization_equals_the_closure_loop(reference) -> None:
    module = W.Manual()
    W.make_trainer().fit(module)
    assert_matches(W.result(module), reference)


def test_find_gru_optimizer_unwraps_lightnings_wrapper() -> None:
    module = W.Manual()
    W.make_trainer(max_steps=1).fit(module)
    wrapper = module.optimizers()
    gru = module.trainer.optimizers[0]
    # Lightning's wrapper passes isinstance(..., GRUOptimizer) but is another object.
    assert isinstance(wrapper, GRUOptimizer) and wrapper is not gru
    assert find_gru_optimizer(wrapper) is gru and find_gru_optimizer(gru) is gru
    with pytest.raises(TypeError, match="expected a GRUOptimizer"):
        find_gru_optimizer(torch.optim.SGD(module.parameters(), lr=0.1))


class NoSuper(W.Unlearner):
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        pass  # forgets super().on_train_batch_start


class PlainOptimizer(W.Unlearner):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=W.LR)


@pytest.mark.parametrize(
    ("module", "trainer_kw", "error", "match"),
    [
        (W.Unlearner, {"accumulate_grad_batches": 2}, ValueError, "accumulate_grad_batches"),
        (W.Unlearner, {"gradient_clip_val": 1.0}, ValueError, "max_grad_norm"),
        (
            W.Unlearner,
            {"precision": None, "plugins": [MixedPrecision("16-mixed", "cpu")]},
            ValueError,
            "16-mixed",
        ),
        (NoSuper, {}, RuntimeError, "super\\(\\).on_train_batch_start"),
        (PlainOptimizer, {}, TypeError, "expected a GRUOptimizer"),
    ],
)
def test_automatic_optimization_refuses_what_would_compute_something_else(
    module, trainer_kw, error, match
) -> None:
    m = module()
    before = W.params(m.net)
    with pytest.raises(error, match=match):
        W.make_trainer(max_steps=2, **trainer_kw).fit(m)
    identical(W.params(m.net), before)  # raised before any step


# --------------------------------------------------------------------------- DDP, 2 processes
@pytest.fixture(scope="module")
def ddp() -> list[dict[str, Any]]:
    """tests/_lightning_workers.py as rank 0 of Trainer(strategy="ddp", devices=2); Lightning
    starts rank 1. Each rank's results."""
    with tempfile.TemporaryDirectory() as outdir:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        proc = subprocess.run(
            [sys.executable, str(Path(W.__file__).resolve()), outdir],
            env=env,
            cwd=outdir,
            capture_output=True,
            text=True,
            timeout=240,
        )
        paths = [Path(outdir) / f"rank{r}.pt" for r in range(2)]
        if proc.returncode != 0 or not all(p.exists() for p in paths):
            pytest.fail(f"DDP run exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        results = [torch.load(p, weights_only=True) for p in paths]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        pytest.fail("DDP run failed:\n" + "\n".join(errors))
    return results


def test_ddp_runs_on_two_processes_without_warnings(ddp) -> None:
    for rank, r in enumerate(ddp):
        assert r["warnings"] == []
        for name in ("helper", "bare", "manual", "two_heads"):
            assert r[name]["world_size"] == 2 and r[name]["rank"] == rank
        assert r["helper"]["ran_through"] == "DistributedDataParallel"


def test_ddp_helper_ranks_identical_and_equal_to_one_process(ddp, reference) -> None:
    identical(ddp[0]["helper"]["params"], ddp[1]["helper"]["params"])
    identical(ddp[0]["helper"]["mems"], ddp[1]["helper"]["mems"])
    assert_matches(ddp[0]["helper"], reference)
    # Each rank trained on its own half of every step's rows, in order.
    step_rows = [list(range(W.BATCH * t, W.BATCH * (t + 1))) for t in range(W.ROWS // W.BATCH)]
    for rank, r in enumerate(ddp):
        assert r["helper"]["seen"] == [i for rows in step_rows for i in rows[rank::2]] * W.EPOCHS


def test_ddp_parameter_only_the_retain_loss_uses(ddp) -> None:
    # find_unused_parameters=True: the retain head gets no forget gradient on any rank.
    identical(ddp[0]["two_heads"]["params"], ddp[1]["two_heads"]["params"])
    identical(ddp[0]["two_heads"]["mems"], ddp[1]["two_heads"]["mems"])
    assert_matches(ddp[0]["two_heads"], W.reference_run(two_heads=True))


def test_ddp_manual_optimization_ranks_identical_and_equal_to_one_process(ddp, reference) -> None:
    identical(ddp[0]["manual"]["params"], ddp[1]["manual"]["params"])
    identical(ddp[0]["manual"]["mems"], ddp[1]["manual"]["mems"])
    assert_matches(ddp[0]["manual"], reference)


def test_ddp_retain_closure_on_the_bare_module_makes_the_replicas_drift(ddp) -> None:
    # The control: without DDP's forward the retain gradients are not all-reduced, each
    # rank folds its own into its memory, and the weights part.
    assert max_diff(ddp[0]["bare"]["mems"], ddp[1]["bare"]["mems"]) > 1e-2
    assert max_diff(ddp[0]["bare"]["params"], ddp[1]["bare"]["params"]) > 1e-3


def test_ddp_lightning_shuffles_a_loader_that_says_shuffle_false(ddp) -> None:
    # Why the modules hand Lightning a DistributedSampler(shuffle=False) of their own:
    # given DataLoader(shuffle=False), Lightning trains on a shuffling DistributedSampler.
    for rank, r in enumerate(ddp):
        probe = r["probe"]
        assert probe["sampler"] == "DistributedSampler" and probe["shuffle"] is True
        in_order = list(range(rank, W.ROWS, 2))[: len(probe["seen"])]
        assert probe["seen"] != in_order


# --------------------------------------------------------------------------- resume
# Lightning's ModelCheckpoint warns when a run resumes into the directory it writes to.
resuming_into_its_directory = pytest.mark.filterwarnings(
    "ignore:Checkpoint directory .* exists and is not empty:UserWarning"
)


def fit_with_checkpoints(module: Any, dirpath: Path, ckpt_path: Path | None = None) -> None:
    """A checkpoint every 3 steps (mid-epoch: 4 steps an epoch), into ``dirpath``."""
    every3 = ModelCheckpoint(
        dirpath=dirpath, filename="{step}", every_n_train_steps=3, save_top_k=-1
    )
    W.make_trainer(enable_checkpointing=True, callbacks=[every3]).fit(module, ckpt_path=ckpt_path)


@resuming_into_its_directory
@pytest.mark.parametrize("step", [3, 6])
def test_resume_mid_epoch_equals_the_uninterrupted_run(reference, step, tmp_path) -> None:
    full = W.Unlearner()
    fit_with_checkpoints(full, tmp_path)
    uninterrupted = W.result(full)
    assert_matches(uninterrupted, reference)  # checkpointing changes nothing
    ckpt = tmp_path / f"step={step}.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert all(EMA_KEY in s for s in saved["optimizer_states"][0]["state"].values())
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"batches": step % 4}]

    resumed = W.Unlearner(seed=1)  # other initial weights: the checkpoint brings them
    fit_with_checkpoints(resumed, tmp_path, ckpt_path=ckpt)
    res = W.result(resumed)
    assert resumed.seen == full.seen[step * W.BATCH :]  # the rest of the epoch, then on
    assert res["global_step"] == uninterrupted["global_step"]
    identical(res["params"], uninterrupted["params"])
    identical(res["mems"], uninterrupted["mems"])


class PlainLoader(W.Unlearner):
    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(W.Pairs(), batch_size=W.BATCH)


@resuming_into_its_directory
def test_a_plain_loader_replays_the_epoch_on_resume(tmp_path) -> None:
    # The control: Lightning restarts a plain DataLoader at the epoch's first batch.
    fit_with_checkpoints(PlainLoader(), tmp_path)
    resumed = PlainLoader()
    with pytest.warns(PossibleUserWarning, match="dataloader is\\s+not resumable"):
        fit_with_checkpoints(resumed, tmp_path, ckpt_path=tmp_path / "step=3.ckpt")
    assert resumed.seen[: W.BATCH] == list(range(W.BATCH))  # batch 0 again, not batch 3
    assert len(resumed.seen) == (W.STEPS - 3) * W.BATCH


def test_resumable_loader_state() -> None:
    loader = ResumableDataLoader(list(range(10)), batch_size=3)
    assert [b.tolist() for b in loader][0] == [0, 1, 2] and loader.state_dict() == {"batches": 4}
    loader.load_state_dict({"batches": 2})
    assert [b.tolist() for b in loader] == [[6, 7, 8], [9]]
    loader.load_state_dict({"batches": 4})  # a whole epoch: the next starts at the beginning
    assert len([b for b in loader]) == 4


# --------------------------------------------------------------------------- the extra
def test_import_without_lightning_names_the_extra(monkeypatch) -> None:
    # A fresh import of gru_optim.lightning, with pytorch_lightning made unimportable.
    monkeypatch.delitem(sys.modules, "gru_optim.lightning")
    monkeypatch.delitem(sys.modules, "gru_optim.integrations.lightning")
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    with pytest.raises(ImportError, match='pip install "gru-optim\\[lightning\\]"'):
        importlib.import_module("gru_optim.lightning")


def test_the_optimizer_works_through_lightnings_wrapper() -> None:
    """``LightningOptimizer`` subclasses the optimizer on the fly with a copy of its
    ``__dict__``: retain_pass, zero_grad, last_stats and state_dict through it act on the
    real optimizer (the step is rectified, nothing pending is left on the wrapper)."""
    from pytorch_lightning.core.optimizer import LightningOptimizer

    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    x = torch.randn(8, 4)
    opt = GRUOptimizer(torch.optim.SGD(m.parameters(), lr=0.1))
    w = LightningOptimizer(opt)
    for _ in range(2):
        w.zero_grad()
        with w.retain_pass():
            m(x).pow(2).mean().backward()
        (-m(x).pow(2).mean()).backward()
        opt.step()
        assert bool(opt.last_stats["rectified"]) and bool(w.last_stats["rectified"])
    # state_dict() raises while a retain pass is pending: through the wrapper too.
    assert w.state_dict()["state"][0]["gru_ema"].equal(opt.retain_memory(m.weight))
