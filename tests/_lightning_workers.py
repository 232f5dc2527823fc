"""Lightning modules, data and the two-process DDP script of tests/test_lightning.py.

The modules, the data and the single-process reference live here, so that the test
process and the DDP processes build exactly the same things. Run as a script,
``python tests/_lightning_workers.py OUTDIR``, it is rank 0 of a 2-process DDP run
(``Trainer(strategy="ddp", devices=2)``: Lightning starts rank 1 by running this script
again) and every rank saves what its runs produced to ``OUTDIR/rank<r>.pt``.

Data order: for the training loader Lightning puts a ``DistributedSampler`` with
``shuffle=True`` in place of the loader's own sampler whatever the loader says
(``shuffle=False`` included). The modules here hand Lightning a ``DistributedSampler``
of their own, with ``shuffle=False``, which it keeps: rank ``r`` gets rows ``r, r + W,
...``, so the two ranks' step ``t`` together hold exactly the rows of the one-process
step ``t``. The ``probe`` run records what Lightning does with a plain loader.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402

from gru_optim import GRUOptimizer  # noqa: E402
from gru_optim.lightning import (  # noqa: E402
    GRULightningModule,
    ResumableDataLoader,
    find_gru_optimizer,
)

IN, HID, OUT = 6, 8, 3
ROWS = 32  # rows of the dataset
BATCH = 8  # rows of one optimizer step (over all ranks together)
EPOCHS = 2
STEPS = EPOCHS * ROWS // BATCH
LR = 1e-2
GRU = {"gamma": 0.8}

# torch 2.13 deprecates isinstance(x, LeafSpec); Lightning 2.6's CombinedLoader uses it.
LEAFSPEC_WARNING = r".*isinstance\(treespec, LeafSpec\)"
# Lightning suggests DataLoader workers where it counts more than 2 cores per process.
WORKERS_WARNING = "The 'train_dataloader' does not have many workers"


def quiet_lightning() -> None:
    """The warnings Lightning 2.6 gives on every fit here: the two above."""
    from lightning_fabric.utilities.warnings import PossibleUserWarning

    warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
    warnings.filterwarnings("ignore", message=WORKERS_WARNING, category=PossibleUserWarning)


# --------------------------------------------------------------------------- data, model
class Pairs(Dataset[dict[str, Tensor]]):
    """``ROWS`` rows, each a forget example and a retain example (float64), and its index."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.xf = torch.randn(ROWS, IN, generator=g, dtype=torch.float64)
        self.yf = torch.randint(0, OUT, (ROWS,), generator=g)
        self.xr = torch.randn(ROWS, IN, generator=g, dtype=torch.float64) + 0.5
        self.yr = torch.randint(0, OUT, (ROWS,), generator=g)

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "xf": self.xf[i],
            "yf": self.yf[i],
            "xr": self.xr[i],
            "yr": self.yr[i],
            "idx": torch.tensor(i),
        }


class TwoHeads(nn.Module):
    """A body and a head that both losses use, and a head that only the retain loss uses
    (under DDP: ``find_unused_parameters=True``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN, HID), nn.Tanh())
        self.head = nn.Linear(HID, OUT)
        self.retain_head = nn.Linear(HID, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def make_net(seed: int = 0, two_heads: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    if two_heads:
        return TwoHeads().double()
    return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT)).double()


def forget_loss(net: nn.Module, b: dict[str, Tensor]) -> Tensor:
    return -F.cross_entropy(net(b["xf"]), b["yf"])  # gradient ascent on the forget set


def retain_loss(net: nn.Module, b: dict[str, Tensor]) -> Tensor:
    loss = F.cross_entropy(net(b["xr"]), b["yr"])
    if isinstance(net, TwoHeads):
        loss = loss + 0.5 * F.cross_entropy(net.retain_head(net.body(b["xr"])), b["yr"] % 2)
    return loss


def make_gru(net: nn.Module, **gru: Any) -> GRUOptimizer:
    return GRUOptimizer(torch.optim.AdamW(net.parameters(), lr=LR), **{**GRU, **gru})


def sharded_loader(trainer: pl.Trainer, dataset: Pairs) -> ResumableDataLoader:
    """This rank's shard, in order: a DistributedSampler of our own with shuffle=False
    (Lightning keeps it), BATCH // world rows per step."""
    world, rank = trainer.world_size, trainer.global_rank
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    return ResumableDataLoader(dataset, batch_size=BATCH // world, sampler=sampler)


# --------------------------------------------------------------------------- modules
class Unlearner(GRULightningModule):
    """Automatic optimization through the helper."""

    def __init__(self, seed: int = 0, two_heads: bool = False, **gru: Any) -> None:
        super().__init__()
        self.net = make_net(seed, two_heads)
        self.gru = gru
        self.seen: list[int] = []  # the dataset rows of every step, in order
        self.ran_through = ""  # the class of the module Lightning runs forward through

    def on_train_start(self) -> None:
        self.ran_through = type(self.trainer.strategy.model).__name__

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.seen += batch["idx"].tolist()
        return forget_loss(self.net, batch)

    def retain_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return retain_loss(self.net, batch)

    def configure_optimizers(self) -> GRUOptimizer:
        return make_gru(self.net, **self.gru)

    def train_dataloader(self) -> DataLoader[Any]:
        return sharded_loader(self.trainer, Pairs())


class BareRetain(Unlearner):
    """The mistake the helper avoids: a retain closure calling the bare module."""

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        assert self._gru_batch is not None
        batch = self._gru_batch[0]

        def bare() -> Tensor:
            loss = self.retain_step(batch, batch_idx)  # not through DDP's forward
            loss.backward()
            return loss

        optimizer.step(closure=optimizer_closure, retain_closure=bare)


class Probe(Unlearner):
    """A plain ``DataLoader(shuffle=False)``: what sampler does Lightning use?"""

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(Pairs(), batch_size=BATCH // self.trainer.world_size, shuffle=False)


class Manual(pl.LightningModule):
    """Manual optimization: retain_pass on the GRUOptimizer itself, manual_backward twice."""

    def __init__(self, seed: int = 0, **gru: Any) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = make_net(seed)
        self.gru = gru

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        gru = find_gru_optimizer(opt)
        gru.zero_grad()
        with gru.retain_pass() as rp:
            loss = retain_loss(self.net, batch)
            self.manual_backward(loss)
            rp.record(loss)
        self.manual_backward(forget_loss(self.net, batch))
        opt.step()  # Lightning's wrapper: its counters, hooks and precision plugin

    def configure_optimizers(self) -> GRUOptimizer:
        return make_gru(self.net, **self.gru)

    def train_dataloader(self) -> DataLoader[Any]:
        return sharded_loader(self.trainer, Pairs())


def make_trainer(**kw: Any) -> pl.Trainer:
    args: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": EPOCHS,
        "precision": "64-true",
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
    }
    args.update(kw)
    return pl.Trainer(**args)


# --------------------------------------------------------------------------- reference
def reference_run(
    steps: int = STEPS, two_heads: bool = False, **gru: Any
) -> dict[str, list[Tensor]]:
    """One process, no Lightning: ``opt.zero_grad(); opt.step(forget_closure,
    retain_closure)`` over the rows in order, BATCH rows a step."""
    net = make_net(two_heads=two_heads)
    opt = make_gru(net, **gru)
    data = Pairs()
    done = 0
    while done < steps:
        for b in DataLoader(data, batch_size=BATCH):
            if done == steps:
                break

            def forget(b: dict[str, Tensor] = b) -> Tensor:
                loss = forget_loss(net, b)
                loss.backward()
                return loss

            def retain(b: dict[str, Tensor] = b) -> Tensor:
                loss = retain_loss(net, b)
                loss.backward()
                return loss

            opt.zero_grad()
            opt.step(forget, retain)
            done += 1
    return {"params": params(net), "mems": mems(opt, net)}


def params(net: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def mems(opt: Any, net: nn.Module) -> list[Tensor]:
    gru = find_gru_optimizer(opt)
    out = []
    for p in net.parameters():
        m = gru.retain_memory(p)
        assert m is not None
        out.append(m.detach().clone())
    return out


def result(module: Any) -> dict[str, Any]:
    gru = find_gru_optimizer(module.trainer.optimizers[0])
    return {
        "params": params(module.net),
        "mems": mems(gru, module.net),
        "global_step": module.trainer.global_step,
        "rectified": bool(gru.last_stats["rectified"]),
    }


# --------------------------------------------------------------------------- DDP script
def ddp_runs() -> dict[str, Any]:
    """Five fits in one 2-process DDP group (the processes start once)."""
    ddp = {"accelerator": "cpu", "devices": 2, "num_nodes": 1, "strategy": "ddp"}
    out: dict[str, Any] = {}
    runs: list[tuple[str, pl.LightningModule, str]] = [
        ("helper", Unlearner(), "ddp"),
        ("bare", BareRetain(), "ddp"),
        ("manual", Manual(), "ddp"),
        ("two_heads", Unlearner(two_heads=True), "ddp_find_unused_parameters_true"),
    ]
    for name, module, strategy in runs:
        trainer = make_trainer(**{**ddp, "strategy": strategy})
        trainer.fit(module)
        out[name] = result(module)
        out[name]["world_size"] = trainer.world_size
        out[name]["rank"] = trainer.global_rank
        if name == "helper":
            out[name]["seen"] = module.seen
            out[name]["ran_through"] = module.ran_through
    probe = Probe()
    trainer = make_trainer(max_steps=2, **ddp)
    trainer.fit(probe)
    loader = trainer.train_dataloader
    assert isinstance(loader, DataLoader)
    sampler = loader.sampler
    out["probe"] = {
        "sampler": type(sampler).__name__,
        "shuffle": bool(getattr(sampler, "shuffle", False)),
        "seen": probe.seen,
    }
    return out


def main(outdir: str) -> None:
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()
        try:
            out = ddp_runs()
        except BaseException:  # reported to the test process, which fails with it
            out["error"] = traceback.format_exc()
    out["warnings"] = [
        f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
    ]
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
