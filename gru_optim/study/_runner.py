"""Presets and the study runner: corpus, tokenizer, target and oracles, unlearning runs
(each base method plain and with every GRU variant, same learning rate, steps, batches
and seed), and evaluation along each run."""

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
from ._lm import (
    Codec,
    ModelConfig,
    TrainConfig,
    encode_qa,
    load_or_train,
    load_pretrained,
    load_tokenizer,
    train_tokenizer,
)
from ._metrics import GENERATION_MAX_LENGTH, Evaluator

__all__ = ["ARMS", "METHODS", "METHOD_ARMS", "PRESETS", "StudyConfig", "arms_of", "run_study"]

METHODS = ("GA", "GradDiff", "GradDiff-KL", "NPO", "SimNPO", "WGA", "IdK-DPO", "NPO+GD")
"""The unlearning methods: gradient ascent; GradDiff (GA + retain NLL); GradDiff-KL, its
``+KL`` form (GA + KL to the target on the retain batch); NPO; SimNPO; WGA; IdK-DPO (DPO
preferring a refusal to the forget answer); NPO+GD (NPO + retain NLL, the paper's
setting)."""

ARMS = ("plain", "GRU", "GRU-k", "update", "cos-clip", "+KL")
"""How a method's gradient is used: ``plain`` (AdamW on the objective); ``GRU``
(``GRUOptimizer(AdamW, gamma)``, the paper's projection against the retain memory);
``GRU-k`` (``directions=4``: the cone of the memory and the 3 most recent retain
gradients); ``update`` (``space="update"``: the inner optimizer's step is rectified);
``cos-clip`` (``cos_clip=-0.5``, the authors' partial projection); ``+KL`` (GradDiff-KL
only: GA rectified against the retain-NLL memory, then the retain KL gradient added
unprojected through ``post_closure``, the authors' ``+KL``)."""

METHOD_ARMS: dict[str, tuple[str, ...]] = {
    m: ("plain", "+KL") if m == "GradDiff-KL" else ARMS[:5] for m in METHODS
}
"""The arms each method runs with: GradDiff-KL is plain or ``+KL``; every other method
plain or with the four rectifications."""


def arms_of(method: str, arms: tuple[str, ...]) -> tuple[str, ...]:
    """The arms of ``arms`` that ``method`` runs with (:data:`METHOD_ARMS`)."""
    return tuple(a for a in METHOD_ARMS[method] if a in arms)


@dataclass(frozen=True)
class StudyConfig:
    """Everything one study depends on.

    ``lrs`` x ``seeds`` x ``methods`` x ``arms`` unlearning runs of ``steps`` steps,
    evaluated every ``eval_every`` steps (and at step 0, the target); ``n_oracles``
    retain-only models of different seeds (the first is the reference of forget quality
    and privleak, the others measure the retrain-vs-retrain noise floor).

    With ``model_path`` the target is that Hugging Face model (a folder or a hub name; its
    tokenizer, or ``tokenizer_path``'s, in ``prompt_format`` with ``system_prompt`` and the
    chat template's ``date_string``) and the oracles are
    ``oracle_paths`` (the retain-only models, the first the reference): nothing is
    trained. ``device`` and ``dtype`` say where and in what the models run.
    """

    name: str = "demo"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    split: str = "forget10"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: tuple[str, ...] = ("GA", "GradDiff", "GradDiff-KL", "NPO", "SimNPO", "WGA")
    arms: tuple[str, ...] = ARMS
    lrs: tuple[float, ...] = (1e-3,)
    seeds: tuple[int, ...] = (0,)
    steps: int = 20
    eval_every: int = 10
    forget_batch: int = 8
    retain_batch: int = 8
    gamma: float = 0.8
    directions: int = 4
    cos_clip: float = -0.5
    n_oracles: int = 1
    npo_beta: float = 0.1
    simnpo_beta: float = 2.5
    simnpo_delta: float = 0.0
    wga_beta: float = 1.0
    dpo_beta: float = 0.1
    graddiff_alpha: float = 1.0
    kl_alpha: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    truth_reference: str = "answer"
    generation_max_length: int = GENERATION_MAX_LENGTH
    eval_batch_size: int = 128
    threads: int = 1
    data_dir: str | None = None
    model_path: str | None = None
    oracle_paths: tuple[str, ...] = ()
    tokenizer_path: str | None = None
    prompt_format: str = "plain"
    system_prompt: str | None = None
    date_string: str | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
        for a in self.arms:
            if a not in ARMS:
                raise ValueError(f"unknown arm {a!r}; choose from {ARMS}")
        if self.model_path is not None and not self.oracle_paths:
            raise ValueError(
                "model_path needs oracle_paths: forget quality and privleak compare with "
                "the retain-only model"
            )

    def runs(self) -> list[tuple[str, str, float, int]]:
        """Every ``(method, arm, lr, seed)`` of the study, in the order they run."""
        return [
            (method, arm, lr, seed)
            for lr in self.lrs
            for seed in self.seeds
            for method in self.methods
            for arm in arms_of(method, self.arms)
        ]


_DEMO_CORPUS = CorpusConfig(n_authors=20, n_facts=8, n_perturbed=3, n_world=20, seed=0)
_TINY = ModelConfig(vocab_size=1024, n_embd=64, n_layer=2, n_head=4)

PRESETS: dict[str, StudyConfig] = {
    "demo": StudyConfig(
        name="demo",
        corpus=_DEMO_CORPUS,
        model=_TINY,
        train=TrainConfig(epochs=50, batch_size=32, lr=1e-2),
        methods=("GA", "NPO", "GradDiff-KL"),
        arms=ARMS,
        lrs=(3e-4, 5e-4),
        seeds=(0,),
        steps=30,
        eval_every=10,
        n_oracles=3,
    ),
    "full": StudyConfig(
        name="full",
        corpus=CorpusConfig(n_authors=40, n_facts=8, n_perturbed=4, n_world=30, seed=0),
        model=_TINY,
        train=TrainConfig(epochs=50, batch_size=32, lr=1e-2),
        methods=("GA", "GradDiff", "GradDiff-KL", "NPO", "SimNPO", "WGA", "IdK-DPO"),
        arms=ARMS,
        lrs=(3e-4, 5e-4, 1e-3),
        seeds=(0, 1, 2),
        steps=40,
        eval_every=10,
        n_oracles=5,
    ),
    "tofu": StudyConfig(
        name="tofu",
        methods=("NPO+GD",),
        arms=("plain", "GRU"),
        lrs=(1e-5,),
        seeds=(0,),
        steps=120,
        eval_every=60,
        forget_batch=32,
        retain_batch=32,
        weight_decay=0.01,
        warmup_steps=12,
        truth_reference="paraphrase",
        eval_batch_size=16,
        device="cuda",
        dtype="bfloat16",
    ),
}
"""``demo``: the study of ``make demo`` (under 5 minutes on two CPU cores); ``full``: the
published one, every method and arm; ``tofu``: the real-TOFU setting for a GPU (needs
``data_dir``, ``model_path`` and ``oracle_paths``; 10 epochs of forget10 at batch 32)."""


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
    from .._optimizer import GRUOptimizer
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
    if "path" in info:
        return f"loaded from {info['path']}"
    return "cached" if info["cached"] else f"trained in {info['seconds']:.0f} s"


def _models(
    cfg: StudyConfig, data: TofuData, root: Path | None, cache: Path | None
) -> tuple[Codec, Any, list[Callable[[], tuple[Any, dict[str, Any]]]]]:
    """The codec, the target (and how it came) and one loader per oracle."""
    if cfg.model_path is not None:
        tok = load_tokenizer(cfg.tokenizer_path or cfg.model_path)
        codec = Codec(tok, cfg.prompt_format, cfg.system_prompt, cfg.date_string)

        def pretrained(path: str) -> Callable[[], tuple[Any, dict[str, Any]]]:
            return lambda: (
                load_pretrained(path, cfg.device, cfg.dtype),
                {"cached": True, "path": path},
            )

        return codec, pretrained(cfg.model_path), [pretrained(p) for p in cfg.oracle_paths]
    texts = [
        f"Question: {r['question']}\nAnswer: {r['answer']}"
        for r in data.retain + data.forget + data.real + data.world + data.holdout
    ]
    texts += data.idk
    codec = Codec(train_tokenizer(texts, cfg.model.vocab_size))
    model_cfg = replace(cfg.model, vocab_size=codec.vocab_size)
    key = {"corpus": str(root), "vocab": codec.fingerprint(), "split": cfg.split}
    common = data.real + data.world

    def trained(name: str, rows: list[Any], seed: int) -> Any:
        return lambda: load_or_train(
            name, rows, codec, model_cfg, cfg.train, seed, cache, key, device=cfg.device
        )

    oracles = [trained("oracle", data.retain + common, 1000 + j) for j in range(cfg.n_oracles)]
    return codec, trained("target", data.retain + data.forget + common, 0), oracles


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
    if "IdK-DPO" in cfg.methods and not data.idk:
        raise ValueError("IdK-DPO needs refusal answers: idontknow.jsonl in the data folder")
    codec, load_target, oracle_loaders = _models(cfg, data, root, cache)
    target, tinfo = load_target()
    log(f"target: {_how(tinfo)}")
    ev = Evaluator(
        codec,
        data,
        reference=cfg.truth_reference,
        max_length=cfg.generation_max_length,
        batch_size=cfg.eval_batch_size,
    )
    log("evaluation rows: " + ", ".join(f"{k} {v}" for k, v in ev.sizes().items()))
    infos = [tinfo]
    oracle_raws = []
    for j, loader in enumerate(oracle_loaders):
        m, info = loader()
        infos.append(info)
        log(f"oracle {j}: {_how(info)}")
        oracle_raws.append(ev.raw(m))
        del m  # only the oracles' scores are kept
    oracle_raw = oracle_raws[0]
    records: list[dict[str, Any]] = []
    base = {"lr": 0.0, "step": 0}
    target_m = ev.summarise(ev.raw(target), oracle_raw)
    records.append({"method": "target", "arm": "", "gru": False, "seed": 0, **base, **target_m})
    for j, raw in enumerate(oracle_raws):
        records.append(
            {
                "method": "oracle",
                "arm": "",
                "gru": False,
                "seed": j,
                **base,
                **ev.summarise(raw, oracle_raw),
            }
        )
    forget = encode_qa(
        codec, [r["question"] for r in data.forget], [r["answer"] for r in data.forget]
    )
    retain = encode_qa(
        codec, [r["question"] for r in data.retain], [r["answer"] for r in data.retain]
    )
    idk = None
    if "IdK-DPO" in cfg.methods:
        idk = encode_qa(
            codec,
            [r["question"] for r in data.forget for _ in data.idk],
            [a for _ in data.forget for a in data.idk],
        )
    ref = target.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    runs = cfg.runs()
    bar = tqdm(total=len(runs) * cfg.steps, desc=f"unlearn ({len(runs)} runs)", mininterval=0.5)
    for method, arm, lr, seed in runs:
        meta = {"method": method, "arm": arm, "gru": arm != "plain", "seed": seed, "lr": lr}
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

        bar.set_postfix_str(f"{method} {arm} lr={lr:g} seed={seed}")
        unlearn(
            cfg,
            ref,
            method,
            arm,
            lr,
            seed,
            forget,
            retain,
            record,
            progress=bar,
            idk=idk if method == "IdK-DPO" else None,
        )
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
            "eval_rows": ev.sizes(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        write_report(records, Path(out_dir), meta_info)
    return records
