"""Multi-process checks for tests/test_distributed.py (and benchmarks/bench_collectives.py).

Each suite runs in ``world`` real processes with a real gloo process group on the CPU,
started with ``torch.multiprocessing`` (spawn) on a free port. A suite does several
checks in one process group (starting processes is the slow part) and every rank
returns a dictionary of results (tensors, numbers, strings), which the test process
compares with single-process runs of the same model on the union of the ranks' batches.

The model, the data and the single-process reference live here too, so that the test
process and the workers build exactly the same things.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import tempfile
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

from gru_optim import GRUOptimizer  # noqa: E402

IN, HID, OUT, AUX = 8, 16, 4, 2
BATCH = 16  # union batch; each of the two ranks holds half of it
STEPS = 3
LR = 1e-2


# --------------------------------------------------------------------------- model, data
class TwoHeads(nn.Module):
    """``body`` and ``head`` get forget and retain gradients; ``retain_head`` only a retain
    gradient (it takes its share of the correction with a zero forget gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN, HID), nn.Tanh())
        self.head = nn.Linear(HID, OUT)
        self.retain_head = nn.Linear(HID, AUX)

    def forward(self, x: Tensor, y: Tensor, which: str) -> Tensor:
        h = self.body(x)
        if which == "forget":  # gradient ascent on the forget set
            return -F.cross_entropy(self.head(h), y)
        return F.cross_entropy(self.head(h), y) + 0.5 * F.cross_entropy(
            self.retain_head(h), y % AUX
        )


def make_model() -> TwoHeads:
    torch.manual_seed(0)
    return TwoHeads()


def make_batches(steps: int = STEPS) -> list[dict[str, Tensor]]:
    """``steps`` union batches: forget and retain inputs and labels of BATCH rows each."""
    g = torch.Generator().manual_seed(1234)
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


def shard_batch(batch: dict[str, Tensor], rank: int, world: int) -> dict[str, Tensor]:
    n = BATCH // world
    return {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}


def closures(
    model: nn.Module,
    b: dict[str, Tensor],
    micro: int = 1,
    no_sync: Any = None,
    scale: Callable[[Tensor], Tensor] | None = None,
):
    """Forget and retain closures over ``micro`` micro-batches of ``b`` (mean loss).

    ``no_sync``: DDP's ``model.no_sync`` — every micro-batch but the last runs its forward
    and backward inside it, so the gradients are all-reduced once per closure.
    ``scale``: a GradScaler's ``scale`` (``scale(loss).backward()``).
    """

    def run(which: str) -> Tensor:
        x, y = (b["xf"], b["yf"]) if which == "forget" else (b["xr"], b["yr"])
        total = torch.zeros(())
        for i, (xm, ym) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
            ctx = no_sync() if no_sync is not None and i < micro - 1 else contextlib.nullcontext()
            with ctx:
                loss = model(xm, ym, which) / micro
                (scale(loss) if scale is not None else loss).backward()
            total = total + loss.detach()
        return total

    return (lambda: run("forget")), (lambda: run("retain"))


def post_closure(model: nn.Module, b: dict[str, Tensor]) -> Callable[[], Tensor]:
    """A gradient added after rectification (a stand-in for the authors' +KL term): the
    retain head on the forget inputs, weighted 0.3."""

    def post() -> Tensor:
        loss = 0.3 * model(b["xf"], b["yf"], "retain")
        loss.backward()
        return loss

    return post


def reference_run(
    make_inner: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    steps: int = STEPS,
    post: bool = False,
    **gru_kwargs: Any,
) -> tuple[list[Tensor], list[Tensor]]:
    """One process on the union batches: final parameters and memories."""
    model = make_model()
    inner = (make_inner or default_inner)(list(model.parameters()))
    opt = GRUOptimizer(inner, **gru_kwargs)
    for b in make_batches(steps):
        f, r = closures(model, b)
        opt.zero_grad()
        opt.step(f, r, post_closure(model, b) if post else None)
    params = [p.detach().clone() for p in model.parameters()]
    mems = [opt.retain_memory(p).detach().clone() for p in model.parameters()]  # type: ignore[union-attr]
    return params, mems


def default_inner(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01)


# --------------------------------------------------------------------------- spawning
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(suite: str, rank: int, world: int, port: int, outdir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    result: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=120),
            )
            try:
                result = SUITES[suite](rank, world)
            finally:
                dist.destroy_process_group()
        except BaseException:  # reported to the test process, which fails with it
            result["error"] = traceback.format_exc()
    result["warnings"] = [
        f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
    ]
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))


def spawn(suite: str, world: int = 2, timeout: float = 300.0) -> list[dict[str, Any]]:
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
        for p in procs:
            p.join(timeout)
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


@contextlib.contextmanager
def count_all_reduce() -> Iterator[list[tuple[int, int]]]:
    """Count ``torch.distributed.all_reduce`` calls as (elements, bytes); each call still
    performs the real collective."""
    import torch.distributed as dist

    calls: list[tuple[int, int]] = []
    real = dist.all_reduce

    def counting(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append((tensor.numel(), tensor.numel() * tensor.element_size()))
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting  # type: ignore[assignment]
    try:
        yield calls
    finally:
        dist.all_reduce = real  # type: ignore[assignment]


def _params(model: nn.Module) -> list[Tensor]:
    out = []
    for p in model.parameters():
        full = getattr(p, "full_tensor", None)
        out.append((full() if full is not None else p).detach().clone())
    return out


def _mems(opt: GRUOptimizer, model: nn.Module) -> list[Tensor]:
    out = []
    for p in model.parameters():
        m = opt.retain_memory(p)
        assert m is not None
        full = getattr(m, "full_tensor", None)
        out.append((full() if full is not None else m).detach().clone())
    return out


# --------------------------------------------------------------------------- DDP suite
def ddp_suite(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    out: dict[str, Any] = {}
    batches = [shard_batch(b, rank, world) for b in make_batches()]

    # 1. Closures: each closure's backward all-reduces its gradient.
    model = DDP(make_model(), find_unused_parameters=True)
    opt = GRUOptimizer(default_inner(list(model.parameters())))
    for b in batches:
        f, r = closures(model, b)
        opt.zero_grad()
        opt.step(f, r)
    out["closures"] = _params(model.module)
    out["closures_mem"] = _mems(opt, model.module)

    # 2. gradient_as_bucket_view=True, micro-batches under no_sync (forward included),
    #    closure-free path. The gradients must still be the bucket views after step().
    model = DDP(make_model(), find_unused_parameters=True, gradient_as_bucket_view=True)
    opt = GRUOptimizer(default_inner(list(model.parameters())))
    storages_before: list[set[int]] = []
    storages_after: list[set[int]] = []
    for b in batches:
        f, r = closures(model, b, micro=2, no_sync=model.no_sync)
        opt.zero_grad(set_to_none=False)
        with opt.retain_pass():
            r()
        f()
        # Parameters the forget loss does not use have no gradient here (GRU cleared the
        # retain gradient to None); the others must keep their bucket views through step().
        used = [p for p in model.parameters() if p.grad is not None]
        storages_before.append({p.grad.untyped_storage().data_ptr() for p in used})  # type: ignore[union-attr]
        opt.step()
        storages_after.append({p.grad.untyped_storage().data_ptr() for p in used})  # type: ignore[union-attr]
    out["bucket_view"] = _params(model.module)
    out["bucket_view_mem"] = _mems(opt, model.module)
    out["bucket_storages_same"] = storages_before == storages_after
    out["bucket_storages"] = len(storages_after[-1])

    # 3. Closures looping over micro-batches under no_sync, with retain_weight.
    model = DDP(make_model(), find_unused_parameters=True)
    opt = GRUOptimizer(default_inner(list(model.parameters())), retain_weight=0.5)
    for b in batches:
        f, r = closures(model, b, micro=2, no_sync=model.no_sync)
        opt.zero_grad()
        opt.step(f, r)
    out["no_sync_rw"] = _params(model.module)

    # 3b. Clipping, cos clip and a post-rectification closure, micro-batches under no_sync.
    for name, kw, post in (
        ("ddp_clip_cos", {"max_grad_norm": 0.05, "cos_clip": -0.5}, False),
        ("ddp_post", {"max_grad_norm": 0.05}, True),
        ("ddp_k4", {"directions": 4, "retain_weight": 0.5}, False),
    ):
        model = DDP(make_model(), find_unused_parameters=True)
        opt = GRUOptimizer(default_inner(list(model.parameters())), **kw)
        for b in batches:
            f, r = closures(model, b, micro=2, no_sync=model.no_sync)
            opt.zero_grad()
            opt.step(f, r, post_closure(model, b) if post else None)
        out[name] = _params(model.module)

    # 4. ZeroRedundancyOptimizer (optimizer state partitioned over the ranks) inside GRU.
    model = DDP(make_model(), find_unused_parameters=True)
    zero = ZeroRedundancyOptimizer(
        list(model.parameters()), optimizer_class=torch.optim.AdamW, lr=LR, weight_decay=0.01
    )
    opt = GRUOptimizer(zero)
    for b in batches:
        f, r = closures(model, b)
        opt.zero_grad()
        opt.step(f, r)
    out["zero"] = _params(model.module)
    out["zero_local_state"] = sum(
        t.numel()
        for s in zero.optim.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    out["numel"] = sum(p.numel() for p in model.parameters())

    # 5. Checkpoint of GRU(ZeroRedundancyOptimizer): consolidate on rank 0, state_dict()
    #    there (memory included), load on every rank into a fresh optimizer: resumes exactly.
    import copy

    more = [shard_batch(b, rank, world) for b in make_batches(2 * STEPS)[STEPS:]]
    zero.consolidate_state_dict(to=0)
    holder = [copy.deepcopy(opt.state_dict()) if rank == 0 else None]
    torch.distributed.broadcast_object_list(holder, src=0)
    saved, weights = holder[0], copy.deepcopy(model.module.state_dict())
    out["zero_ckpt_has_mem"] = all("gru_ema" in e for e in saved["state"].values())
    for b in more:
        f, r = closures(model, b)
        opt.zero_grad()
        opt.step(f, r)
    model2 = DDP(make_model(), find_unused_parameters=True)
    model2.module.load_state_dict(weights)
    zero2 = ZeroRedundancyOptimizer(
        list(model2.parameters()), optimizer_class=torch.optim.AdamW, lr=LR, weight_decay=0.01
    )
    opt2 = GRUOptimizer(zero2)
    opt2.load_state_dict(saved)
    for b in more:
        f, r = closures(model2, b)
        opt2.zero_grad()
        opt2.step(f, r)
    out["zero_continued"] = _params(model.module)
    out["zero_resumed"] = _params(model2.module)
    return out


# --------------------------------------------------------------------------- FSDP2 suite
def _fsdp_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for m in (model.body, model.head, model.retain_head):
        fully_shard(m)
    fully_shard(model)
    return model


def fsdp_suite(rank: int, world: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        get_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )
    from torch.distributed.tensor import DTensor

    out: dict[str, Any] = {}
    batches = [shard_batch(b, rank, world) for b in make_batches(2 * STEPS)]

    def train(
        model: nn.Module, opt: GRUOptimizer, bs: list[dict[str, Tensor]]
    ) -> list[list[tuple[int, int]]]:
        per_step = []
        for b in bs:
            f, r = closures(model, b)
            with count_all_reduce() as calls:
                opt.zero_grad()
                opt.step(f, r)
            per_step.append(list(calls))
        return per_step

    # 1. Global rectification, default settings: one 1-element all_reduce at retain time
    #    (skip_nonfinite) and one packed [dot, ||m||^2, ||g||^2] per step.
    model = _fsdp_model()
    opt = GRUOptimizer(default_inner(list(model.parameters())))
    out["calls_default"] = train(model, opt, batches[:STEPS])
    out["fsdp"] = _params(model)
    out["fsdp_mem"] = _mems(opt, model)
    mem_local, param_local, full = 0, 0, 0
    placements_match = True
    for p in model.parameters():
        m = opt.retain_memory(p)
        placements_match &= isinstance(m, DTensor) and m.placements == p.placements
        mem_local += m.to_local().numel()  # type: ignore[union-attr]
        param_local += p.to_local().numel()  # type: ignore[attr-defined]
        full += p.numel()
    out["mem_local"], out["param_local"], out["numel"] = mem_local, param_local, full
    out["placements_match"] = bool(placements_match)

    # A plain inner step (no retain pass) adds nothing. It is deliberate here.
    opt.plain_steps = "allow"
    with count_all_reduce() as calls:
        opt.zero_grad()
        model(batches[0]["xf"], batches[0]["yf"], "forget").backward()
        opt.step()
    out["calls_plain"] = list(calls)

    # 2. Without skip_nonfinite: the packed all_reduce is the only collective.
    model = _fsdp_model()
    opt = GRUOptimizer(default_inner(list(model.parameters())), skip_nonfinite=False)
    out["calls_no_skip"] = train(model, opt, batches[:STEPS])
    out["fsdp_no_skip"] = _params(model)

    # 2b. Micro-batches with FSDP2's no_sync (set_requires_gradient_sync(False) for all
    #     but the last micro-batch of each closure, forward included).
    model = _fsdp_model()
    opt = GRUOptimizer(default_inner(list(model.parameters())))

    @contextlib.contextmanager
    def fsdp_no_sync() -> Iterator[None]:
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]

    per_step = []
    for b in batches[:STEPS]:
        f, r = closures(model, b, micro=2, no_sync=fsdp_no_sync)
        with count_all_reduce() as calls:
            opt.zero_grad()
            opt.step(f, r)
        per_step.append(list(calls))
    out["fsdp_micro"] = _params(model)
    out["calls_micro"] = per_step

    # 3. Per-tensor rectification: still one packed all_reduce (2 * tensors + 1 elements).
    model = _fsdp_model()
    opt = GRUOptimizer(default_inner(list(model.parameters())), granularity="tensor")
    out["calls_tensor"] = train(model, opt, batches[:STEPS])
    out["fsdp_tensor"] = _params(model)

    # 3a. Clipping (one more scalar all_reduce: the norm of the final gradient), cos clip
    #     and a post-rectification closure, on sharded parameters.
    model = _fsdp_model()
    opt = GRUOptimizer(default_inner(list(model.parameters())), max_grad_norm=0.05, cos_clip=-0.5)
    out["calls_clip_cos"] = train(model, opt, batches[:STEPS])
    out["fsdp_clip_cos"] = _params(model)
    model = _fsdp_model()
    opt = GRUOptimizer(default_inner(list(model.parameters())), max_grad_norm=0.05)
    for b in batches[:STEPS]:
        f, r = closures(model, b)
        opt.zero_grad()
        opt.step(f, r, post_closure(model, b))
    out["fsdp_post"] = _params(model)

    # 3a'. GRU-k: Gram entries of the four directions in the one packed all_reduce.
    model = _fsdp_model()
    opt = GRUOptimizer(default_inner(list(model.parameters())), directions=4)
    out["calls_k4"] = train(model, opt, batches[:STEPS])
    out["fsdp_k4"] = _params(model)
    out["fsdp_k4_history_local"] = all(
        all(h.to_local().numel() == p.to_local().numel() for h in opt.retain_history(p))  # type: ignore[attr-defined]
        for p in model.parameters()
    )
    # ... and its history through a distributed checkpoint, bitwise.
    ck = tempfile.mkdtemp() if rank == 0 else ""
    holder_k = [ck]
    torch.distributed.broadcast_object_list(holder_k, src=0)
    ck = holder_k[0]
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ck)
    train(model, opt, batches[STEPS:])
    out["k4_continued"] = _params(model)
    model_k = _fsdp_model()
    opt_k = GRUOptimizer(default_inner(list(model_k.parameters())), directions=4)
    msd2, osd2 = get_state_dict(model_k, opt_k)
    dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=ck)
    set_state_dict(model_k, opt_k, model_state_dict=msd2, optim_state_dict=osd2)
    train(model_k, opt_k, batches[STEPS:])
    out["k4_resumed"] = _params(model_k)
    if rank == 0:
        import shutil

        shutil.rmtree(ck, ignore_errors=True)

    # 3b. Update-space rectification: a second packed all_reduce, after the inner step.
    model = _fsdp_model()
    opt = GRUOptimizer(default_inner(list(model.parameters())), space="update")
    out["calls_update"] = train(model, opt, batches[:STEPS])
    out["fsdp_update"] = _params(model)

    # 4. Distributed checkpoint: save after STEPS steps, train on; a fresh model and
    #    optimizer load the checkpoint (in place, into their own state dict templates) and
    #    train on the same batches: bitwise the same weights and memories.
    model = _fsdp_model()
    opt = GRUOptimizer(default_inner(list(model.parameters())))
    train(model, opt, batches[:STEPS])
    saved_mem = _mems(opt, model)
    ckpt = tempfile.mkdtemp() if rank == 0 else ""
    holder = [ckpt]
    torch.distributed.broadcast_object_list(holder, src=0)
    ckpt = holder[0]
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    train(model, opt, batches[STEPS:])
    out["dcp_continued"] = _params(model)
    out["dcp_continued_mem"] = _mems(opt, model)

    model2 = _fsdp_model()
    opt2 = GRUOptimizer(default_inner(list(model2.parameters())))
    msd2, osd2 = get_state_dict(model2, opt2)
    dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=ckpt)
    set_state_dict(model2, opt2, model_state_dict=msd2, optim_state_dict=osd2)
    out["dcp_loaded_mem"] = _mems(opt2, model2)
    out["dcp_saved_mem"] = saved_mem
    train(model2, opt2, batches[STEPS:])
    out["dcp_resumed"] = _params(model2)
    out["dcp_resumed_mem"] = _mems(opt2, model2)

    # In-memory round trip through get/set_optimizer_state_dict (full state dict too).
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    full_osd = get_optimizer_state_dict(
        model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=False)
    )
    out["full_osd_has_mem"] = all("gru_ema" in s for s in full_osd["state"].values())
    model3 = _fsdp_model()
    opt3 = GRUOptimizer(default_inner(list(model3.parameters())))
    set_optimizer_state_dict(
        model3, opt3, full_osd, options=StateDictOptions(full_state_dict=True, cpu_offload=False)
    )
    out["full_roundtrip_mem_equal"] = all(
        torch.equal(a, b) for a, b in zip(_mems(opt, model), _mems(opt3, model3))
    )
    if rank == 0:
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)

    # 5. ShardedGradScaler (fp16-style loss scaling under FSDP2): bitwise the unscaled run;
    #    then an overflow in rank 1's retain gradient shard only: both ranks skip the step,
    #    leave weights and memory alone, and back off the scale alike.
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    model = _fsdp_model()
    scaler = ShardedGradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    opt = GRUOptimizer(default_inner(list(model.parameters())), grad_scaler=scaler)
    for b in batches[:STEPS]:
        f, r = closures(model, b, scale=scaler.scale)
        opt.zero_grad()
        opt.step(f, r)
        scaler.update()
    out["scaled"] = _params(model)
    out["scale_after"] = scaler.get_scale()
    before, mem_before = _params(model), _mems(opt, model)
    f, r = closures(model, batches[STEPS], scale=scaler.scale)

    def retain_overflowing_on_rank_1() -> Tensor:
        loss = r()
        if rank == 1:
            with torch.no_grad():
                next(model.parameters()).grad.to_local().view(-1)[0] = float("inf")  # type: ignore[union-attr]
        return loss

    opt.zero_grad()
    opt.step(f, retain_overflowing_on_rank_1)
    scaler.update()
    out["overflow_skipped"] = bool(opt.last_stats["skipped"])
    out["overflow_params_same"] = all(torch.equal(a, b) for a, b in zip(before, _params(model)))
    out["overflow_mems_same"] = all(
        torch.equal(a, b) for a, b in zip(mem_before, _mems(opt, model))
    )
    out["scale_after_overflow"] = scaler.get_scale()
    return out


def all_suites(rank: int, world: int) -> dict[str, Any]:
    """DDP then FSDP2 in one process group: one start-up for the whole test module."""
    return {"ddp": ddp_suite(rank, world), "fsdp": fsdp_suite(rank, world)}


SUITES: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "ddp": ddp_suite,
    "fsdp": fsdp_suite,
    "all": all_suites,
}
