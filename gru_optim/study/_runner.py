"""The study runner: per seed, its corpus split, tokenizer, target and oracles; every
unlearning run of that seed, evaluated along the way on the validation and held-out
halves; each run's records saved on its own so that a study can be run in pieces and
resumed (a run whose records are on disk is not run again)."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._config import ARMS, METHODS, StudyConfig
from ._corpus import write_corpus
from ._halves import halves, take
from ._lm import (
    Codec,
    cache_key,
    encode_qa,
    load_or_train,
    load_pretrained,
    load_tokenizer,
    train_tokenizer,
)
from ._metrics import Evaluator
from ._tofu import TofuData, load_tofu
from ._unlearn import unlearn

__all__ = ["VAL_KEYS", "load_records", "run_study"]

VAL_KEYS = ("forget_prob", "forget_quality", "model_utility", "forget_truth_ratio", "retain_prob")
"""The metrics also recorded on the validation half (prefixed ``val_``)."""

_PER_RUN = ("name", "methods", "arms", "lrs", "seeds", "threads")
"""Configuration fields a run's own name covers, or that do not change its numbers: left
out of the fingerprint that ties a saved run to its study."""


def fingerprint(cfg: StudyConfig) -> str:
    """What a saved run's records depend on beyond its own (method, arm, lr, seed)."""
    d = asdict(cfg)
    for k in _PER_RUN:
        d.pop(k)
    return cache_key(**d)


def _run_file(runs: Path, method: str, arm: str, lr: float, seed: int) -> Path:
    return runs / f"{method}__{arm}__lr{lr:g}__seed{seed}.json"


def _models_file(runs: Path, seed: int) -> Path:
    return runs / f"models__seed{seed}.json"


def load_records(out_dir: str | Path, key: str | None = None) -> list[dict[str, Any]]:
    """Every record saved under ``out_dir/runs`` (each seed's target and oracles, then the
    runs), in a stable order. ``key``: refuse files written by another configuration."""
    runs = Path(out_dir) / "runs"
    records: list[dict[str, Any]] = []
    files = sorted(runs.glob("models__*.json")) + sorted(
        f for f in runs.glob("*.json") if not f.name.startswith("models__")
    )
    for f in files:
        blob = json.loads(f.read_text())
        if key is not None and blob["key"] != key:
            raise ValueError(
                f"{f} was written by another study configuration; choose another --out or "
                "remove that folder's runs/"
            )
        records += [
            {k: (np.nan if v is None else v) for k, v in r.items()} for r in blob["records"]
        ]
    return sorted(records, key=_record_order)


def _record_order(r: dict[str, Any]) -> tuple[Any, ...]:
    """Models first (per seed), then runs in the order of :data:`METHODS` and
    :data:`ARMS`, by learning rate, seed and step."""
    m, a = r["method"], r.get("arm", "")
    if m in ("target", "oracle"):
        return (0, r["seed"], m != "target", r.get("index", 0), 0.0, 0)
    mi = METHODS.index(m) if m in METHODS else len(METHODS)
    ai = ARMS.index(a) if a in ARMS else len(ARMS)
    return (1, mi, ai, r["lr"], r["seed"], r["step"])


def _save(path: Path, key: str, records: list[dict[str, Any]]) -> None:
    clean = [
        {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in records
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "records": clean}, indent=0))
    tmp.replace(path)


@dataclass
class _World:
    """One seed's data, codec, evaluator, halves and model loaders."""

    data: TofuData
    codec: Codec
    ev: Evaluator
    parts: dict[str, dict[str, np.ndarray]]
    target: Callable[[], tuple[Any, dict[str, Any]]]
    oracles: list[Callable[[], tuple[Any, dict[str, Any]]]]


def _world(cfg: StudyConfig, seed: int, cache: Path | None) -> _World:
    if cfg.data_dir is not None:
        data, root = load_tofu(cfg.data_dir, cfg.split), Path(cfg.data_dir)
    else:
        corpus = replace(cfg.corpus, split_seed=seed) if cfg.resplit else cfg.corpus
        root = (cache or Path("results/cache")) / f"corpus-{cache_key(**asdict(corpus))}"
        write_corpus(corpus, root)
        data = load_tofu(root, cfg.split)
    if cfg.model_path is not None:
        codec = Codec(
            load_tokenizer(cfg.tokenizer_path or cfg.model_path),
            cfg.prompt_format,
            cfg.system_prompt,
            cfg.date_string,
        )

        def pretrained(path: str) -> Callable[[], tuple[Any, dict[str, Any]]]:
            return lambda: (
                load_pretrained(path, cfg.device, cfg.dtype),
                {"cached": True, "path": path},
            )

        target, oracles = pretrained(cfg.model_path), [pretrained(p) for p in cfg.oracle_paths]
    else:
        texts = [
            f"Question: {r['question']}\nAnswer: {r['answer']}"
            for r in data.retain + data.forget + data.real + data.world + data.holdout
        ]
        codec = Codec(train_tokenizer(texts + data.idk, cfg.model.vocab_size))
        model_cfg = replace(cfg.model, vocab_size=codec.vocab_size)
        key = {"corpus": str(root), "vocab": codec.fingerprint(), "split": cfg.split}
        common = data.real + data.world

        def trained(name: str, rows: list[Any], init: int) -> Any:
            return lambda: load_or_train(
                name, rows, codec, model_cfg, cfg.train, init, cache, key, device=cfg.device
            )

        target = trained("target", data.retain + data.forget + common, seed)
        oracles = [trained("oracle", data.retain + common, 1000 + j) for j in range(cfg.n_oracles)]
    ev = Evaluator(
        codec,
        data,
        reference=cfg.truth_reference,
        max_length=cfg.generation_max_length,
        batch_size=cfg.eval_batch_size,
    )
    split_seed = seed if cfg.resplit else 0
    return _World(data, codec, ev, halves(ev.sizes(), split_seed), target, oracles)


def _how(info: dict[str, Any]) -> str:
    if "path" in info:
        return f"loaded from {info['path']}"
    return "cached" if info["cached"] else f"trained in {info['seconds']:.0f} s"


def _scores(w: _World, raw: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """Held-out metrics, and the validation ones prefixed ``val_``."""
    test = w.ev.summarise(take(raw, w.parts, "test"), take(ref, w.parts, "test"))
    val = w.ev.summarise(take(raw, w.parts, "val"), take(ref, w.parts, "val"))
    return {**test, **{f"val_{k}": val[k] for k in VAL_KEYS}}


def run_study(
    cfg: StudyConfig,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = "results/cache",
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """Run the study of ``cfg`` and return its records: per seed the target and the
    oracles, per run and evaluation the held-out metrics and the validation ones
    (``val_*``). With ``out_dir``, each seed's models and each run are saved under
    ``out_dir/runs`` as they finish; runs already there (from an earlier, interrupted or
    partial call with the same configuration) are not run again, and the report
    (:func:`~._report.write_report`) covers every run saved there."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    torch.set_num_threads(max(1, cfg.threads))
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    key = fingerprint(cfg)
    runs_dir = Path(out_dir) / "runs" if out_dir is not None else None
    if runs_dir is not None:
        runs_dir.mkdir(parents=True, exist_ok=True)
        load_records(Path(out_dir or "."), key)  # refuse another study's runs before any work
    records: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    sizes: dict[str, Any] = {}
    todo = {
        s: [
            r
            for r in cfg.runs()
            if r[3] == s and (runs_dir is None or not _run_file(runs_dir, *r).exists())
        ]
        for s in cfg.seeds
    }
    bar = tqdm(
        total=sum(len(v) for v in todo.values()) * cfg.steps, desc="unlearn", mininterval=0.5
    )
    for seed in cfg.seeds:
        if runs_dir is not None and not todo[seed] and _models_file(runs_dir, seed).exists():
            log(f"seed {seed}: every run already in {runs_dir}")
            continue
        w = _world(cfg, seed, cache)
        sizes = {k: {h: len(v) for h, v in p.items()} for k, p in w.parts.items()}
        if "IdK-DPO" in cfg.methods and not w.data.idk:
            raise ValueError("IdK-DPO needs refusal answers: idontknow.jsonl in the data folder")
        target, tinfo = w.target()
        log(f"seed {seed}: target {_how(tinfo)}")
        infos.append(tinfo)
        oracle_raws = []
        for j, loader in enumerate(w.oracles):
            m, info = loader()
            infos.append(info)
            log(f"seed {seed}: oracle {j} {_how(info)}")
            oracle_raws.append(w.ev.raw(m))
            del m  # only the oracles' scores are kept
        ref_raw = oracle_raws[0]
        target_m = _scores(w, w.ev.raw(target), ref_raw)
        base = {"arm": "", "gru": False, "seed": seed, "lr": 0.0, "step": 0}
        anchors = [{"method": "target", "index": 0, **base, **target_m}] + [
            {"method": "oracle", "index": j, **base, **_scores(w, raw, ref_raw)}
            for j, raw in enumerate(oracle_raws)
        ]
        if runs_dir is not None:
            _save(_models_file(runs_dir, seed), key, anchors)
        records += anchors
        data = w.data
        forget = encode_qa(
            w.codec, [r["question"] for r in data.forget], [r["answer"] for r in data.forget]
        )
        retain = encode_qa(
            w.codec, [r["question"] for r in data.retain], [r["answer"] for r in data.retain]
        )
        idk = None
        if "IdK-DPO" in cfg.methods:
            idk = encode_qa(
                w.codec,
                [r["question"] for r in data.forget for _ in data.idk],
                [a for _ in data.forget for a in data.idk],
            )
        ref = target.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        for method, arm, lr, s in todo[seed]:
            meta = {"method": method, "arm": arm, "gru": arm != "plain", "seed": s, "lr": lr}
            run = [{**meta, "step": 0, **target_m, "seconds": 0.0}]
            t0 = time.perf_counter()

            def record(
                step: int,
                model: Any,
                run: list[Any] = run,
                meta: Any = meta,
                t0: float = t0,
                w: _World = w,
                ref_raw: dict[str, Any] = ref_raw,
            ) -> None:
                scores = _scores(w, w.ev.raw(model), ref_raw)
                run.append({**meta, "step": step, **scores, "seconds": time.perf_counter() - t0})

            bar.set_postfix_str(f"{method} {arm} lr={lr:g} seed={s}")
            unlearn(
                cfg, ref, method, arm, lr, s, forget, retain, record,
                progress=bar, idk=idk if method == "IdK-DPO" else None,
            )  # fmt: skip
            if runs_dir is not None:
                _save(_run_file(runs_dir, method, arm, lr, s), key, run)
            records += run
    bar.close()
    if out_dir is None:
        return records
    from ._report import write_report

    records = load_records(out_dir, key)
    meta_info = {
        "preset": cfg.name,
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "wall_seconds": time.perf_counter() - t_start,
        "run_seconds": float(
            sum(r["seconds"] for r in records if r.get("seconds") and r["step"] == cfg.steps)
        ),
        "command": command or f"python -m gru_optim.demo --preset {cfg.name}",
        "threads": torch.get_num_threads(),
        "models_cached": all(i["cached"] for i in infos),
        "train_seconds": sum(float(i.get("seconds", 0.0)) for i in infos if not i["cached"]),
        "eval_rows": sizes,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    write_report(records, Path(out_dir), meta_info)
    return records
