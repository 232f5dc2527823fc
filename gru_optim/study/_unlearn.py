"""One unlearning run: a method's objective, its batches and the arm's optimizer
(plain AdamW or AdamW wrapped in :class:`gru_optim.GRUOptimizer`)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ._config import METHOD_ARMS, METHODS, StudyConfig

__all__ = ["unlearn"]


def _loss_fn(cfg: StudyConfig, method: str, arm: str) -> Callable[..., torch.Tensor]:
    """The objective of ``method`` as a function of (model, reference, forget batch,
    retain batch, IdK batch); with the ``+KL`` arm, GradDiff-KL's forget part alone (its
    KL term is the post-rectification closure)."""
    from .. import objectives as ob

    def fwd(model: Any, b: Any) -> torch.Tensor:
        logits: torch.Tensor = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        return logits

    def ref_fwd(ref: Any, b: Any) -> torch.Tensor:
        with torch.no_grad():
            return fwd(ref, b)

    def loss(model: Any, ref: Any, fb: Any, rb: Any, ib: Any) -> torch.Tensor:
        if method == "IdK-DPO":
            return ob.idk_dpo_loss(
                fwd(model, ib),
                ib.labels,
                fwd(model, fb),
                fb.labels,
                ref_fwd(ref, ib),
                ref_fwd(ref, fb),
                cfg.dpo_beta,
            )
        logits = fwd(model, fb)
        if method == "GA" or (method == "GradDiff-KL" and arm == "+KL"):
            return ob.ga_loss(logits, fb.labels)
        if method == "GradDiff":
            return ob.grad_diff_loss(
                logits, fb.labels, fwd(model, rb), rb.labels, cfg.graddiff_alpha
            )
        if method == "GradDiff-KL":
            return ob.ga_kl_loss(
                logits, fb.labels, fwd(model, rb), rb.labels, ref_fwd(ref, rb), cfg.kl_alpha
            )
        if method == "NPO":
            return ob.npo_loss(logits, fb.labels, ref_fwd(ref, fb), cfg.npo_beta)
        if method == "NPO+GD":
            return ob.npo_rt_loss(
                logits,
                fb.labels,
                ref_fwd(ref, fb),
                fwd(model, rb),
                rb.labels,
                cfg.npo_beta,
                cfg.graddiff_alpha,
            )
        if method == "SimNPO":
            return ob.simnpo_loss(logits, fb.labels, cfg.simnpo_beta, cfg.simnpo_delta)
        if method == "WGA":
            return ob.wga_loss(logits, fb.labels, cfg.wga_beta)
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")

    return loss


def _batches(n: int, size: int, steps: int, gen: torch.Generator) -> list[torch.Tensor]:
    """``steps`` index batches drawn epoch by epoch without replacement."""
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - size + 1 if n >= size else 1, size):
            out.append(perm[s : s + size])
            if len(out) == steps:
                break
    return out


def _gru_options(cfg: StudyConfig, arm: str) -> dict[str, Any] | None:
    if arm == "plain":
        return None
    if arm == "GRU-k":
        return {"directions": cfg.directions}
    if arm == "update":
        return {"space": "update"}
    if arm == "cos-clip":
        return {"cos_clip": cfg.cos_clip}
    return {}  # GRU, +KL


def unlearn(
    cfg: StudyConfig,
    target: Any,
    method: str,
    arm: str,
    lr: float,
    seed: int,
    forget: Any,
    retain: Any,
    on_checkpoint: Callable[[int, Any], None],
    progress: Any = None,
    idk: Any = None,
) -> None:
    """One unlearning run from a copy of ``target`` (also the frozen reference of NPO, KL
    and DPO): AdamW at ``lr`` (weight decay ``cfg.weight_decay``, linear warm-up over
    ``cfg.warmup_steps`` then constant), ``cfg.steps`` steps, forget/retain batches drawn
    from ``seed`` (identical for every arm), ``arm`` as in :data:`ARMS`; calls
    ``on_checkpoint(step, model)`` every ``cfg.eval_every`` steps and at the last.

    ``idk`` (IdK-DPO only): the forget questions encoded with every refusal, row
    ``i * n_refusals + j`` the ``j``-th refusal to forget question ``i``; each step pairs
    every forget row with a refusal drawn from ``seed``."""
    from .. import GRUOptimizer
    from ..objectives import nll_loss, retain_kl_loss

    if arm not in METHOD_ARMS[method]:
        raise ValueError(f"{method} does not run with arm {arm!r}; it runs {METHOD_ARMS[method]}")
    if method == "IdK-DPO" and idk is None:
        raise ValueError("IdK-DPO needs the encoded refusals (idk)")
    model = copy.deepcopy(target)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    fidx = _batches(len(forget), min(cfg.forget_batch, len(forget)), cfg.steps, gen)
    ridx = _batches(len(retain), min(cfg.retain_batch, len(retain)), cfg.steps, gen)
    n_refusals = len(idk) // len(forget) if idk is not None else 0
    loss_fn = _loss_fn(cfg, method, arm)
    inner = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    warm = cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        inner, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0
    )
    options = _gru_options(cfg, arm)
    gru = GRUOptimizer(inner, gamma=cfg.gamma, **options) if options is not None else None
    torch.manual_seed(seed)
    for step in range(1, cfg.steps + 1):
        fb = forget.select(fidx[step - 1]).to(device)
        rb = retain.select(ridx[step - 1]).to(device)
        ib = None
        if idk is not None:
            pick = torch.randint(n_refusals, (len(fidx[step - 1]),), generator=gen)
            ib = idk.select(fidx[step - 1] * n_refusals + pick).to(device)
        if gru is not None:
            gru.zero_grad(set_to_none=True)

            def forget_closure(fb: Any = fb, rb: Any = rb, ib: Any = ib) -> torch.Tensor:
                loss = loss_fn(model, target, fb, rb, ib)
                loss.backward()  # type: ignore[no-untyped-call]
                return loss

            def retain_closure(rb: Any = rb) -> torch.Tensor:
                logits = model(input_ids=rb.input_ids, attention_mask=rb.attention_mask).logits
                loss = nll_loss(logits, rb.labels)
                loss.backward()  # type: ignore[no-untyped-call]
                return loss

            def post_closure(rb: Any = rb) -> torch.Tensor:
                logits = model(input_ids=rb.input_ids, attention_mask=rb.attention_mask).logits
                with torch.no_grad():
                    ref = target(input_ids=rb.input_ids, attention_mask=rb.attention_mask).logits
                loss = cfg.kl_alpha * retain_kl_loss(logits, ref, rb.labels)
                loss.backward()  # type: ignore[no-untyped-call]
                return loss

            gru.step(forget_closure, retain_closure, post_closure if arm == "+KL" else None)
        else:
            inner.zero_grad(set_to_none=True)
            loss_fn(model, target, fb, rb, ib).backward()  # type: ignore[no-untyped-call]
            inner.step()
        sched.step()
        if progress is not None:
            progress.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            on_checkpoint(step, model)
            model.train()
