"""GRU unlearning on several processes: DDP or FSDP2, closures, a distributed checkpoint.

Run it with torchrun (docs/examples/launch_cpu.sh does, on the CPU with gloo)::

    torchrun --standalone --nproc-per-node 2 docs/examples/train_ddp.py
    torchrun --standalone --nproc-per-node 2 docs/examples/train_ddp.py --fsdp2 \
        --checkpoint /tmp/gru_ckpt

or as a plain script (one process, world size 1). Every rank trains on its own slice of
each batch; GRU sees the gradients after the all-reduce (DDP) or reduce-scatter (FSDP2),
so every rank rectifies the same global gradient. At the end the script checks that the
ranks hold the same weights and, with ``--checkpoint``, that a model restored from the
distributed checkpoint continues exactly as the original.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before init_process_group: see shutdown()
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
from gru_optim import GRUOptimizer  # noqa: E402

DEVICE = torch.device("cpu")


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_data(steps: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
    """The same global batches on every rank (each rank then takes its slice)."""
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(batch, 32, generator=g),
            torch.randint(0, 10, (batch,), generator=g),
            torch.randn(batch, 32, generator=g),
            torch.randint(0, 10, (batch,), generator=g),
        )
        for _ in range(steps)
    ]


def build(fsdp2: bool) -> tuple[nn.Module, GRUOptimizer]:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = Classifier().to(DEVICE)
    if fsdp2:
        from torch.distributed.fsdp import fully_shard

        for layer in (model.body[0], model.body[2], model.head):
            fully_shard(layer)
        fully_shard(model)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    # Build the optimizer after wrapping: it must see the wrapped (sharded) parameters.
    opt = GRUOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), gamma=0.8)
    return model, opt


def train(
    model: nn.Module, opt: GRUOptimizer, data: list, rank: int, world: int, first: int = 0
) -> None:
    for step, (xf, yf, xr, yr) in enumerate(data, start=first):
        n = xf.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        xf, yf, xr, yr = (t.to(DEVICE) for t in (xf, yf, xr, yr))

        def forget_closure(
            xf: torch.Tensor = xf, yf: torch.Tensor = yf, sl: slice = sl
        ) -> torch.Tensor:
            loss = -F.cross_entropy(model(xf[sl]), yf[sl])  # gradient ascent
            loss.backward()  # DDP all-reduces / FSDP2 reduce-scatters here
            return loss

        def retain_closure(
            xr: torch.Tensor = xr, yr: torch.Tensor = yr, sl: slice = sl
        ) -> torch.Tensor:
            loss = F.cross_entropy(model(xr[sl]), yr[sl])
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(forget_closure, retain_closure)
        if rank == 0 and step % 5 == 0:
            s = opt.last_stats
            print(
                f"step {step:3d}  forget {s['forget_loss']:+.4f}  retain {s['retain_loss']:.4f}"
                f"  cosine {s['cosine']:+.3f}  projected {bool(s['conflict'])}",
                flush=True,
            )


def flat_weights(model: nn.Module) -> torch.Tensor:
    parts = []
    for p in model.parameters():
        full = getattr(p, "full_tensor", None)  # FSDP2: gather the shards
        parts.append((full() if full is not None else p).detach().reshape(-1))
    return torch.cat(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fsdp2", action="store_true", help="shard with FSDP2 instead of DDP")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32, help="global batch (split over ranks)")
    ap.add_argument("--checkpoint", default=None, help="directory for a DCP checkpoint")
    args = ap.parse_args()

    if "RANK" not in os.environ:  # a plain `python train_ddp.py`: one process
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        global DEVICE
        DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(DEVICE)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split over {world} ranks")

    try:
        same = run(args, rank, world)
    finally:
        shutdown()  # before the interpreter exits: see its docstring
    if not same:
        raise SystemExit(1)


def shutdown() -> None:
    """Destroy the process group so that gloo's worker threads end before the interpreter.

    A gloo worker that still holds the last reference to a tensor when Python finalizes
    aborts the process ("terminate called without an active exception"; 6 runs in 59 of
    this script did, after printing their results). Two things keep the group, and its
    workers, alive past ``destroy_process_group``: the model (DDP's reducer) and the
    optimizer, gone once ``run`` has returned; and ``torch.distributed.nn.functional``,
    whose argument defaults capture ``group.WORLD`` when it is first imported after
    ``init_process_group`` (DDP imports it): imported at the top of this file, it captures
    nothing. With FSDP2, DTensor's module-level caches keep the mesh, and so the group,
    until exit; the workers are idle by then (their last collective ended long before).
    """
    gc.collect()
    dist.destroy_process_group()


def run(args: argparse.Namespace, rank: int, world: int) -> bool:
    """Train, check that the ranks agree (and, with ``--checkpoint``, the resume)."""
    data = make_data(2 * args.steps if args.checkpoint else args.steps, args.batch)
    model, opt = build(args.fsdp2)
    train(model, opt, data[: args.steps], rank, world)

    w = flat_weights(model)
    gathered = [torch.empty_like(w) for _ in range(world)]
    dist.all_gather(gathered, w)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    if rank == 0:
        print(
            f"{world} rank(s), {'FSDP2' if args.fsdp2 else 'DDP'}: "
            f"weights identical on every rank: {same}"
        )

    if args.checkpoint:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, opt)  # the memory is in optim_sd
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=args.checkpoint)
        train(model, opt, data[args.steps :], rank, world, first=args.steps)
        if rank == 0:
            print("restoring a fresh model and optimizer from the checkpoint", flush=True)

        model2, opt2 = build(args.fsdp2)
        model_sd2, optim_sd2 = get_state_dict(model2, opt2)  # templates, loaded in place
        dcp.load({"model": model_sd2, "optim": optim_sd2}, checkpoint_id=args.checkpoint)
        set_state_dict(model2, opt2, model_state_dict=model_sd2, optim_state_dict=optim_sd2)
        train(model2, opt2, data[args.steps :], rank, world, first=args.steps)
        exact = torch.equal(flat_weights(model), flat_weights(model2))
        if rank == 0:
            print(f"resumed from {args.checkpoint}: continues exactly: {exact}")
        same = same and exact

    return same


if __name__ == "__main__":
    main()
