"""Shared fixtures and builders for the GRUOptimizer tests.

The network has, on purpose, one parameter of every kind GRU must handle:

- ``body`` and ``head``: gradients from both the forget and the retain loss;
- ``retain_head``: a retain gradient but no forget gradient (takes its share of the
  correction);
- ``forget_bias``: a forget gradient but no retain gradient (no memory: never rectified);
- ``unused``: neither (its gradient stays ``None``).
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from torch import Tensor, nn

# The fused Triton kernels run on CPU tensors under Triton's interpreter, which must be
# switched on before anything imports Triton (tests/test_fused.py; importing torch does
# not import Triton). The kernels are defined (decorated) here, while the flag is set:
# tests of the CPU's C++ passes remove the flag, and torch may import Triton during them.
os.environ.setdefault("TRITON_INTERPRET", "1")
if importlib.util.find_spec("triton") is not None:
    import gru_optim.kernels._triton_kernels  # noqa: F401

settings.register_profile(
    "gru",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "gru-thorough",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("gru")

IN, HID, OUT, AUX = 6, 8, 3, 2


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, HID), nn.Tanh())
        self.head = nn.Linear(HID, OUT)
        self.retain_head = nn.Linear(HID, AUX)
        self.forget_bias = nn.Parameter(torch.zeros(OUT))
        self.unused = nn.Parameter(torch.randn(4))
        self.to(dtype)

    def forget_loss(self, x: Tensor, y: Tensor) -> Tensor:
        # Gradient ascent on the forget set: minimise -NLL.
        return -F.cross_entropy(self.head(self.body(x)) + self.forget_bias, y)

    def retain_loss(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.body(x)
        return F.cross_entropy(self.head(h), y) + 0.5 * F.cross_entropy(
            self.retain_head(h), y % AUX
        )


def make_net(dtype: torch.dtype = torch.float64, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(dtype)


def batch(
    step: int, kind: str, dtype: torch.dtype = torch.float64, n: int = 16
) -> tuple[Tensor, Tensor]:
    """Deterministic data: labels follow a fixed rule, so forget and retain conflict."""
    gen = torch.Generator().manual_seed(1000 * step + (0 if kind == "forget" else 1))
    x = torch.randn(n, IN, generator=gen, dtype=torch.float64)
    rule = torch.Generator().manual_seed(7)
    w = torch.randn(IN, OUT, generator=rule, dtype=torch.float64)
    y = (x @ w).argmax(1)
    return x.to(dtype), y


def closures(model: Net, step: int) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    dtype = next(model.parameters()).dtype
    xf, yf = batch(step, "forget", dtype)
    xr, yr = batch(step, "retain", dtype)

    def forget() -> Tensor:
        loss = model.forget_loss(xf, yf)
        loss.backward()
        return loss

    def retain() -> Tensor:
        loss = model.retain_loss(xr, yr)
        loss.backward()
        return loss

    return forget, retain


def two_groups(model: Net) -> list[dict[str, Any]]:
    """Two parameter groups: the body, and the rest (heads, forget_bias, unused)."""
    rest = [
        model.head.weight,
        model.head.bias,
        model.retain_head.weight,
        model.retain_head.bias,
        model.forget_bias,
        model.unused,
    ]
    return [{"params": list(model.body.parameters())}, {"params": rest}]


def make_inner(name: str, model: Net) -> torch.optim.Optimizer:
    """The named optimizer over two groups; the second group gets half the learning rate."""
    inner = OPTIMIZERS[name](two_groups(model))
    inner.param_groups[1]["lr"] = inner.param_groups[1]["lr"] * 0.5
    return inner


def params_of(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(a: nn.Module, b: nn.Module) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def assert_params_close(a: nn.Module, b: nn.Module, rtol: float, atol: float) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(
            p.detach().to(torch.float64),
            q.detach().to(torch.float64),
            rtol=rtol,
            atol=atol,
            msg=lambda m, n=n: f"{n}: {m}",
        )


def snapshot(model: nn.Module, opt: Any) -> dict[str, Any]:
    """Deep copies of the weights, the inner optimizer's state and the memory."""
    inner = opt.optimizer if hasattr(opt, "optimizer") else opt
    ema = {}
    if hasattr(opt, "retain_memory"):
        for i, p in enumerate(model.parameters()):
            m = opt.retain_memory(p)
            ema[i] = None if m is None else m.detach().clone()
    return {
        "params": params_of(model),
        "inner": copy.deepcopy(inner.state_dict()),
        "ema": ema,
    }


def _equal_nested(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_equal_nested(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(_equal_nested(x, y) for x, y in zip(a, b))
        )
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return a == b


def equal_nested(a: Any, b: Any) -> bool:
    return _equal_nested(a, b)


def assert_unchanged(before: dict[str, Any], model: nn.Module, opt: Any) -> None:
    after = snapshot(model, opt)
    for i, (p, q) in enumerate(zip(before["params"], after["params"])):
        assert torch.equal(p, q), f"parameter {i} changed"
    assert equal_nested(before["inner"], after["inner"]), "inner optimizer state changed"
    assert equal_nested(before["ema"], after["ema"]), "retain memory changed"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd_nesterov_wd": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw_single": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=5e-2),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2),
}
