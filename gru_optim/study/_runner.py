"""Presets and the study runner: corpus, tokenizer, target and oracles, unlearning runs
(each base method plain and with GRU, same learning rate, steps, batches and seed), and
evaluation along each run."""

from __future__ import annotations

import copy
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ._corpus import CorpusConfig, TofuData, load_tofu, write_corpus
from ._lm import ModelConfig, TrainConfig, encode_qa, load_or_train, train_tokenizer
from ._metrics import Evaluator

__all__ = ["METHODS", "PRESETS", "StudyConfig", "run_study"]

METHODS = ("GA", "GradDiff", "NPO", "SimNPO", "WGA")
"""The base unlearning methods, each run plain and with GRU."""


@dataclass(frozen=True)
class StudyConfig:
    """Everything one study depends on.

    ``lrs`` x ``seeds`` x ``methods`` x {plain, GRU} unlearning runs of ``steps`` steps,
    evaluated every ``eval_every`` steps (and at step 0, the target); ``n_oracles``
    retain-only models of different seeds (the first is the reference of forget quality
    and privleak, the others measure the retrain-vs-retrain noise floor).
    """

    name: str = "demo"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    split: str = "forget10"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: tuple[str, ...] = METHODS
    lrs: tuple[float, ...] = (1e-3,)
    seeds: tuple[int, ...] = (0,)
    steps: int = 20
    eval_every: int = 10
    forget_batch: int = 8
    retain_batch: int = 8
    gamma: float = 0.8
    n_oracles: int = 1
    npo_beta: float = 0.1
    simnpo_beta: float = 2.5
    simnpo_delta: float = 0.0
    wga_beta: float = 1.0
    graddiff_alpha: float = 1.0
    truth_reference: str = "answer"
    rouge_rows: int | None = None
    threads: int = 1
    data_dir: str | None = None


PRESETS: dict[str, StudyConfig] = {
    "demo": StudyConfig(
        name="demo",
        corpus=CorpusConfig(n_authors=20, n_facts=8, n_perturbed=3, n_world=20, seed=0),
        model=ModelConfig(vocab_size=1024, n_embd=64, n_layer=2, n_head=4),
        train=TrainConfig(epochs=50, batch_size=32, lr=1e-2),
        lrs=(3e-4,),
        seeds=(0,),
        steps=30,
        eval_every=10,
        n_oracles=1,
        rouge_rows=48,
    ),
    "full": StudyConfig(
        name="full",
        corpus=CorpusConfig(n_authors=40, n_facts=8, n_perturbed=4, n_world=30, seed=0),
        model=ModelConfig(vocab_size=1024, n_embd=64, n_layer=2, n_head=4),
        train=TrainConfig(epochs=50, batch_size=32, lr=1e-2),
        lrs=(3e-4, 5e-4, 1e-3),
        seeds=(0, 1, 2),
        steps=40,
        eval_every=10,
        n_oracles=5,
        rouge_rows=64,
    ),
}
"""``demo``: the 5-minute study of ``make demo``; ``full``: the published one."""


def _loss_fn(cfg: StudyConfig, method: str) -> Callable[..., torch.Tensor]:
    from .. import objectives as ob

    def loss(model: Any, ref: Any, fb: Any, rb: Any) -> torch.Tensor:
        logits = model(input_ids=fb.input_ids, attention_mask=fb.attention_mask).logits
        if method == "GA":
            return ob.ga_loss(logits, fb.labels)
        if method == "GradDiff":
            rl = model(input_ids=rb.input_ids, attention_mask=rb.attention_mask).logits
            return ob.grad_diff_loss(logits, fb.labels, rl, rb.labels, cfg.graddiff_alpha)
        if method == "NPO":
            with torch.no_grad():
                ref_logits = ref(input_ids=fb.input_ids, attention_mask=fb.attention_mask).logits
            return ob.npo_loss(logits, fb.labels, ref_logits, cfg.npo_beta)
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


def unlearn(
    cfg: StudyConfig,
    target: Any,
    method: str,
    use_gru: bool,
    lr: float,
    seed: int,
    forget: Any,
    retain: Any,
    on_checkpoint: Callable[[int, Any], None],
    progress: Any = None,
) -> None:
    """One unlearning run from a copy of ``target``: AdamW at ``lr``, ``cfg.steps`` steps,
    forget/retain batches drawn from ``seed`` (identical with and without GRU); calls
    ``on_checkpoint(step, model)`` every ``cfg.eval_every`` steps."""
    from .._optimizer import GRUOptimizer

    model = copy.deepcopy(target)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    fidx = _batches(len(forget), min(cfg.forget_batch, len(forget)), cfg.steps, gen)
    ridx = _batches(len(retain), min(cfg.retain_batch, len(retain)), cfg.steps, gen)
    loss_fn = _loss_fn(cfg, method)
    inner = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gru = GRUOptimizer(inner, gamma=cfg.gamma) if use_gru else None
    opt: torch.optim.Optimizer = gru if gru is not None else inner
    torch.manual_seed(seed)
    for step in range(1, cfg.steps + 1):
        fb, rb = forget.select(fidx[step - 1]), retain.select(ridx[step - 1])
        opt.zero_grad(set_to_none=True)
        if gru is not None:

            def forget_closure(fb: Any = fb, rb: Any = rb) -> torch.Tensor:
                loss = loss_fn(model, target, fb, rb)
                loss.backward()  # type: ignore[no-untyped-call]
                return loss

            def retain_closure(rb: Any = rb) -> torch.Tensor:
                from ..objectives import nll_loss

                logits = model(input_ids=rb.input_ids, attention_mask=rb.attention_mask).logits
                loss = nll_loss(logits, rb.labels)
                loss.backward()  # type: ignore[no-untyped-call]
                return loss

            gru.step(forget_closure, retain_closure)
        else:
            loss_fn(model, target, fb, rb).backward()  # type: ignore[no-untyped-call]
            opt.step()
        if progress is not None:
            progress.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            on_checkpoint(step, model)
            model.train()


def _data(cfg: StudyConfig, cache_dir: Path | None) -> tuple[TofuData, Path | None]:
    if cfg.data_dir is not None:
        return load_tofu(cfg.data_dir, cfg.split), Path(cfg.data_dir)
    root = (cache_dir or Path("results/cache")) / f"corpus-{_corpus_key(cfg.corpus)}"
    write_corpus(cfg.corpus, root)
    return load_tofu(root, cfg.split), root


def _corpus_key(c: CorpusConfig) -> str:
    from ._lm import cache_key

    return cache_key(**asdict(c))


def _how(info: dict[str, Any]) -> str:
    return "cached" if info["cached"] else f"trained in {info['seconds']:.0f} s"


def run_study(
    cfg: StudyConfig,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = "results/cache",
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """Run the study of ``cfg``: returns the records (one per run and checkpoint, plus the
    target and the oracles) and, when ``out_dir`` is given, writes there
    ``summary.json``, ``summary.csv``, ``table.md`` and the trade-off plots (see
    :func:`~._report.write_report`)."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    torch.set_num_threads(max(1, cfg.threads))
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    data, root = _data(cfg, cache)
    texts = [
        f"Question: {r['question']}\nAnswer: {a}"
        for r in data.retain + data.forget + data.world + data.holdout
        for a in [r["answer"]]
    ]
    tok = train_tokenizer(texts, cfg.model.vocab_size)
    model_cfg = replace(cfg.model, vocab_size=tok.get_vocab_size())
    key = {"corpus": str(root), "vocab": tok.to_str(), "split": cfg.split}
    target, tinfo = load_or_train(
        "target",
        data.retain + data.forget + data.world,
        tok,
        model_cfg,
        cfg.train,
        0,
        cache,
        key,
    )
    log(f"target: {_how(tinfo)}")
    infos = [tinfo]
    oracles = []
    for j in range(cfg.n_oracles):
        m, info = load_or_train(
            "oracle",
            data.retain + data.world,
            tok,
            model_cfg,
            cfg.train,
            1000 + j,
            cache,
            key,
        )
        oracles.append(m)
        infos.append(info)
        log(f"oracle {j}: {_how(info)}")
    answer_lens = [
        len(tok.encode(" " + r["answer"]).ids) for r in data.forget_eval + data.retain_eval
    ]
    ev = Evaluator(
        tok,
        data,
        reference=cfg.truth_reference,
        rouge_rows=cfg.rouge_rows,
        max_new_tokens=max(answer_lens) + 2,
    )
    oracle_raw = ev.raw(oracles[0])
    records: list[dict[str, Any]] = []
    base = {"lr": 0.0, "step": 0}
    target_m = ev.summarise(ev.raw(target), oracle_raw)
    records.append({"method": "target", "gru": False, "seed": 0, **base, **target_m})
    records.append(
        {
            "method": "oracle",
            "gru": False,
            "seed": 0,
            **base,
            **ev.summarise(oracle_raw, oracle_raw),
        }
    )
    for j, m in enumerate(oracles[1:], start=1):
        records.append(
            {
                "method": "oracle",
                "gru": False,
                "seed": j,
                **base,
                **ev.summarise(ev.raw(m), oracle_raw),
            }
        )
    forget = encode_qa(
        tok, [r["question"] for r in data.forget], [r["answer"] for r in data.forget]
    )
    retain = encode_qa(
        tok, [r["question"] for r in data.retain], [r["answer"] for r in data.retain]
    )
    ref = target.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    runs = [
        (method, gru, lr, seed)
        for lr in cfg.lrs
        for seed in cfg.seeds
        for method in cfg.methods
        for gru in (False, True)
    ]
    bar = tqdm(total=len(runs) * cfg.steps, desc=f"unlearn ({len(runs)} runs)", mininterval=0.5)
    for method, gru, lr, seed in runs:
        meta = {"method": method, "gru": gru, "seed": seed, "lr": lr}
        records.append({**meta, "step": 0, **target_m})
        t0 = time.perf_counter()

        def record(step: int, model: Any, meta: dict[str, Any] = meta, t0: float = t0) -> None:
            records.append(
                {
                    **meta,
                    "step": step,
                    **ev.summarise(ev.raw(model), oracle_raw),
                    "seconds": time.perf_counter() - t0,
                }
            )

        bar.set_postfix_str(f"{method}{'+GRU' if gru else ''} lr={lr:g} seed={seed}")
        unlearn(cfg, ref, method, gru, lr, seed, forget, retain, record, progress=bar)
    bar.close()
    wall = time.perf_counter() - t_start
    if out_dir is not None:
        from ._report import write_report

        meta_info = {
            "preset": cfg.name,
            "config": json.loads(json.dumps(asdict(cfg), default=str)),
            "wall_seconds": wall,
            "command": command or f"python -m gru_optim.demo --preset {cfg.name}",
            "threads": torch.get_num_threads(),
            "models_cached": all(i["cached"] for i in infos),
            "train_seconds": sum(float(i.get("seconds", 0.0)) for i in infos),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        write_report(records, Path(out_dir), meta_info)
    return records
