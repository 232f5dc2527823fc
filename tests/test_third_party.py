"""Tied weights listed twice, and third-party optimizers as users install them
(issue 21, items 8 and 9): schedulefree's train()/eval(), pytorch_optimizer's Lookahead
(its own state-dict format) and SAM (a step that needs a closure despite its default).

Each optimizer: plain steps bitwise equal to the bare optimizer, GRU steps against a
float64 reference (the bare optimizer in float64, fed the forget gradient projected in
float64 against a float64 memory), checkpoint round trip.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest

# the test extra installs both (setup.cfg): a missing one fails, it is never skipped
import pytorch_optimizer as po
import schedulefree as sf
import torch
from torch import Tensor, nn

from gru_optim import GRUOptimizer


def _net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(dtype)


X = [torch.randn(6, 4, generator=torch.Generator().manual_seed(i)) for i in range(8)]


def retain_loss(net: nn.Module, i: int) -> Tensor:
    return (net(X[i].to(next(net.parameters()).dtype)) ** 2).sum()


def forget_loss(net: nn.Module, i: int) -> Tensor:
    return -net(X[i + 1].to(next(net.parameters()).dtype)).sum()


def closures(net: nn.Module, i: int) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    def forget() -> Tensor:
        loss = forget_loss(net, i)
        loss.backward()
        return loss

    def retain() -> Tensor:
        loss = retain_loss(net, i)
        loss.backward()
        return loss

    return forget, retain


class Reference:
    """GRU in float64 around a bare float64 optimizer: the memory folds the retain
    gradient, every forget gradient the optimizer sees is projected against it."""

    def __init__(self, net: nn.Module, gamma: float) -> None:
        self.net, self.gamma = net, gamma
        self.params = list(net.parameters())
        self.m = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float64)

    def _flat_grad(self) -> Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.params])

    def fold(self, i: int) -> None:
        self.net.zero_grad()
        retain_loss(self.net, i).backward()
        self.m = self.gamma * self._flat_grad() + (1 - self.gamma) * self.m
        self.net.zero_grad()

    def forget_grad(self, i: int) -> Tensor:
        """Back-propagate the forget loss and project ``.grad`` in place."""
        self.net.zero_grad()
        loss = forget_loss(self.net, i)
        loss.backward()
        g = self._flat_grad()
        d = g @ self.m
        if d < 0:
            g = g - d / (self.m @ self.m) * self.m
        j = 0
        for p in self.params:
            p.grad.copy_(g[j : j + p.numel()].reshape(p.shape))
            j += p.numel()
        return loss


def _close(net: nn.Module, ref: nn.Module) -> None:
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach().double(), q.detach(), rtol=1e-5, atol=1e-6)


def _equal(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- tied weights (item 8)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6)
        self.head.weight = self.emb.weight
        self.mid = nn.Linear(4, 4)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.emb(idx))))


def _tied_opt(model: Tied) -> GRUOptimizer:
    params = list(model.emb.parameters()) + list(model.head.parameters())
    with pytest.warns(UserWarning, match="duplicate parameters"):
        inner = torch.optim.AdamW([{"params": params}, {"params": model.mid.parameters()}])
    return GRUOptimizer(inner, gamma=0.5)


def _tied_step(model: Tied, opt: GRUOptimizer, i: int) -> None:
    idx = torch.tensor([i % 6, (i + 2) % 6, (i + 3) % 6])

    def retain() -> Tensor:
        loss = model(idx).logsumexp(-1).sum()
        loss.backward()
        return loss

    def forget() -> Tensor:
        loss = -model(idx).logsumexp(-1).sum()
        loss.backward()
        return loss

    opt.step(forget, retain)


def test_tied_weights_listed_twice_use_torchs_indices_and_round_trip() -> None:
    model = Tied()
    opt = _tied_opt(model)
    idx = torch.tensor([0, 2, 3])
    model(idx).logsumexp(-1).sum().backward()
    g_r = model.emb.weight.grad.clone()
    model.zero_grad()
    _tied_step(model, opt, 0)
    # folded once per unique parameter: 0.5 * g_r, not 0.75 * g_r
    torch.testing.assert_close(opt.retain_memory(model.emb.weight), 0.5 * g_r, rtol=0, atol=0)
    sd = opt.state_dict()
    torch_sd = opt.optimizer.state_dict()
    assert sd["param_groups"][0]["params"] == torch_sd["param_groups"][0]["params"]
    assert set(sd["state"]) == set(torch_sd["state"])  # the memory under torch's indices
    twin = copy.deepcopy(model)
    opt2 = _tied_opt(twin)
    opt2.load_state_dict(copy.deepcopy(sd))
    assert torch.equal(opt2.retain_memory(twin.emb.weight), opt.retain_memory(model.emb.weight))
    for i in range(1, 4):
        _tied_step(model, opt, i)
        _tied_step(twin, opt2, i)
    _equal(model, twin)


# ---------------------------------------------------------------- schedulefree (item 9)


def test_schedulefree_train_eval_are_reachable_and_plain_steps_are_bitwise() -> None:
    net, bare_net = _net(), _net()
    opt = GRUOptimizer(
        sf.AdamWScheduleFree(net.parameters(), lr=0.05, warmup_steps=2), plain_steps="allow"
    )
    bare = sf.AdamWScheduleFree(bare_net.parameters(), lr=0.05, warmup_steps=2)
    assert hasattr(opt, "train") and hasattr(opt, "eval")
    assert not hasattr(opt, "no_such_method") and not hasattr(opt, "_no_such_private")
    opt.train()
    bare.train()
    for i in range(3):
        for n, o in ((net, opt), (bare_net, bare)):
            o.zero_grad()
            forget_loss(n, i).backward()
            o.step()
    opt.eval()
    bare.eval()
    _equal(net, bare_net)  # eval() swapped in the averaged weights on both


def test_schedulefree_in_eval_mode_is_refused_before_the_fold() -> None:
    net = _net()
    opt = GRUOptimizer(sf.AdamWScheduleFree(net.parameters(), lr=0.05))
    forget, retain = closures(net, 0)
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step(forget, retain)  # schedule-free optimizers start in eval mode
    assert opt.retain_memory(next(net.parameters())) is None  # nothing was folded
    with pytest.raises(RuntimeError, match="eval mode"), opt.retain_pass():
        pass
    opt.train()
    opt.step(forget, retain)
    assert opt.retain_memory(next(net.parameters())) is not None


def test_schedulefree_gru_steps_match_a_float64_reference_and_round_trip() -> None:
    net, ref_net = _net(), _net(torch.float64)
    opt = GRUOptimizer(sf.AdamWScheduleFree(net.parameters(), lr=0.05), gamma=0.7)
    ref_opt = sf.AdamWScheduleFree(ref_net.parameters(), lr=0.05)
    ref = Reference(ref_net, 0.7)
    opt.train()
    ref_opt.train()
    rectified = 0
    for i in range(4):
        opt.step(*closures(net, i))
        rectified += bool(opt.last_stats["rectified"])
        ref.fold(i)
        ref.forget_grad(i)
        ref_opt.step()
        _close(net, ref_net)
    assert rectified > 0
    twin = copy.deepcopy(net)
    opt2 = GRUOptimizer(sf.AdamWScheduleFree(twin.parameters(), lr=0.05), gamma=0.7)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for i in range(4, 6):
        opt.step(*closures(net, i))
        opt2.step(*closures(twin, i))
    _equal(net, twin)


# ---------------------------------------------------------------- Lookahead (item 9)


def _lookahead(net: nn.Module) -> po.Lookahead:
    return po.Lookahead(torch.optim.AdamW(net.parameters(), lr=0.05), k=2, alpha=0.5)


def test_lookahead_plain_steps_are_bitwise_and_gru_steps_match_a_float64_reference() -> None:
    net, bare_net = _net(), _net()
    opt, bare = GRUOptimizer(_lookahead(net), plain_steps="allow"), _lookahead(bare_net)
    for i in range(3):
        for n, o in ((net, opt), (bare_net, bare)):
            o.zero_grad()
            forget_loss(n, i).backward()
            o.step()
    _equal(net, bare_net)
    net, ref_net = _net(), _net(torch.float64)
    opt, ref_opt = GRUOptimizer(_lookahead(net), gamma=0.6), _lookahead(ref_net)
    ref = Reference(ref_net, 0.6)
    for i in range(5):
        opt.step(*closures(net, i))
        ref.fold(i)
        ref.forget_grad(i)
        ref_opt.step()
        _close(net, ref_net)


def test_lookahead_state_dict_round_trips_through_the_wrapper() -> None:
    net = _net()
    opt = GRUOptimizer(_lookahead(net), gamma=0.6)
    for i in range(3):
        opt.step(*closures(net, i))
    sd = opt.state_dict()
    assert {"lookahead_state", "base_optimizer"} <= sd.keys()
    assert sd["base_optimizer"]["param_groups"][0]["gru_gamma"] == 0.6
    twin = copy.deepcopy(net)
    opt2 = GRUOptimizer(_lookahead(twin))
    opt2.load_state_dict(copy.deepcopy(sd))
    assert opt2.gamma == 0.6
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(opt2.retain_memory(q), opt.retain_memory(p))
    for i in range(3, 6):  # crosses a slow-weight update (k=2)
        opt.step(*closures(net, i))
        opt2.step(*closures(twin, i))
    _equal(net, twin)
    # the bare Lookahead's own state dict loads too (the memory then starts empty)
    opt3 = GRUOptimizer(_lookahead(copy.deepcopy(net)))
    opt3.load_state_dict(opt.optimizer.state_dict())
    assert all(opt3.retain_memory(p) is None for p in opt3.optimizer.param_groups[0]["params"])


# ---------------------------------------------------------------- SAM (item 9)


def _sam(net: nn.Module) -> po.SAM:
    return po.SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)


def test_sam_plain_steps_are_bitwise() -> None:
    net, bare_net = _net(), _net()
    opt, bare = GRUOptimizer(_sam(net), plain_steps="allow"), _sam(bare_net)
    for i in range(3):
        for n, o in ((net, opt), (bare_net, bare)):

            def closure(n: nn.Module = n, o: object = o, i: int = i) -> Tensor:
                o.zero_grad()  # type: ignore[attr-defined]
                loss = forget_loss(n, i)
                loss.backward()
                return loss

            closure()
            o.step(closure)
    _equal(net, bare_net)


def test_sam_gru_steps_rectify_every_evaluation_against_one_fold() -> None:
    net, ref_net = _net(), _net(torch.float64)
    opt, ref_opt = GRUOptimizer(_sam(net), gamma=0.6), _sam(ref_net)
    ref = Reference(ref_net, 0.6)
    evaluations = []
    for i in range(4):
        forget, retain = closures(net, i)

        def counted(forget: Callable[[], Tensor] = forget) -> Tensor:
            evaluations.append(1)
            return forget()

        opt.step(counted, retain)
        ref.fold(i)
        ref.forget_grad(i)  # the gradient SAM perturbs along
        ref_opt.step(lambda i=i: ref.forget_grad(i))
        _close(net, ref_net)
    assert len(evaluations) == 8  # at the weights, then at the perturbed weights
    with pytest.raises(RuntimeError, match="needs closures"), opt.retain_pass():
        pass
    twin = copy.deepcopy(net)
    opt2 = GRUOptimizer(_sam(twin), gamma=0.6)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for i in range(4, 6):
        opt.step(*closures(net, i))
        opt2.step(*closures(twin, i))
    _equal(net, twin)


# ---------------------------------------------------------------- HF Trainer (item 9)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_gru_trainer_switches_a_schedule_free_optimizer_through_the_wrapper(tmp_path) -> None:
    from _tiny_models import FORGET_AUTHORS, RETAIN_AUTHORS, qa_examples, tiny_model, tiny_tokenizer
    from transformers import TrainingArguments

    from gru_optim.data import PairedUnlearningDataset
    from gru_optim.hf import GRUTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=5e-3,
        optim="schedule_free_adamw",
        lr_scheduler_type="constant",
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = GRUTrainer(
        model=tiny_model("gpt2"),
        args=args,
        train_dataset=PairedUnlearningDataset(
            qa_examples(FORGET_AUTHORS), qa_examples(RETAIN_AUTHORS)
        ),
        processing_class=tiny_tokenizer(),
        objective="graddiff",
    )
    trainer.train()  # on a wrapper without train(): the inner step refuses, after the fold
    gru = trainer.gru_optimizer
    assert isinstance(gru.optimizer, sf.AdamWScheduleFree)
    assert gru.optimizer.param_groups[0]["train_mode"]  # switched through the wrapper
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all("gru_conflict" in h for h in logs)
    gru.eval()
    assert not gru.optimizer.param_groups[0]["train_mode"]
