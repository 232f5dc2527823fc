"""The embedded default of ``gru-unlearn`` (no ``--model``): the study's tiny GPT-2
trained on its TOFU-like corpus (:mod:`gru_optim.study`, the ``demo`` preset's corpus,
model and training), saved as a ``save_pretrained`` directory with its tokenizer, and the
forget (``forget10``), retain (``retain90``) and holdout (``holdout10``) rows written as
JSONL files: the same inputs a user gives the command."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

__all__ = ["DEMO_SETTINGS", "DEMO_THREADS", "prepare_demo"]

DEMO_SETTINGS: dict[str, Any] = {
    "method": "npo",
    "lr": 5e-4,
    "steps": 30,
    "batch_size": 8,
    "output": "results/gru-unlearn-demo",
}
"""The options the embedded default changes (a flag or a ``--config`` key still wins);
without ``--sweep`` it runs GRU and the plain baseline (``--sweep no_gru=false,true``)."""

DEMO_THREADS = 1
"""CPU threads of the embedded demo (the study's ``demo`` preset's: a tiny model gains
nothing from more, and a shared machine loses)."""

_FIELDS = ("question", "answer", "perturbed_answer")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            # no paraphrased_answer: a tiny model trained from scratch never generalises to
            # a wording it has not seen, so the truth ratio is taken against the trained
            # answer (the study's default reference)
            f.write(json.dumps({k: r[k] for k in _FIELDS}, ensure_ascii=False) + "\n")


def prepare_demo(cache_dir: str | Path) -> dict[str, str]:
    """Build (once, cached under ``cache_dir``) the demo's model directory and row files;
    returns ``{"model", "forget", "retain", "holdout"}`` paths."""
    from transformers import PreTrainedTokenizerFast

    from ..study import (
        PRESETS,
        Codec,
        generate_corpus,
        load_or_train,  # the study's cached training of the target
        train_tokenizer,
    )

    preset = PRESETS["demo"]
    parts = {"corpus": asdict(preset.corpus), "model": asdict(preset.model)}
    parts["train"] = asdict(preset.train)
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(cache_dir)
    root = cache / f"gru-unlearn-demo-{key}"
    paths = {
        "model": str(root / "model"),
        "forget": str(root / "forget.jsonl"),
        "retain": str(root / "retain.jsonl"),
        "holdout": str(root / "holdout.jsonl"),
    }
    if (root / "done").exists():
        return paths
    corpus = generate_corpus(preset.corpus)
    forget, retain = corpus["forget10"], corpus["retain90"]
    common = corpus["real_authors"] + corpus["world_facts"]
    texts = [
        f"Question: {r['question']}\nAnswer: {r['answer']}"
        for r in retain + forget + common + corpus["holdout10"]
    ]
    tok = train_tokenizer(texts, preset.model.vocab_size)
    codec = Codec(tok)
    model_cfg = replace(preset.model, vocab_size=codec.vocab_size)
    cache.mkdir(parents=True, exist_ok=True)
    model, _ = load_or_train(
        "gru-unlearn-target",
        retain + forget + common,
        codec,
        model_cfg,
        preset.train,
        0,
        cache,
        {"demo": key, "vocab": codec.fingerprint()},
    )
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "model")
    hf_tok = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>"
    )
    hf_tok.save_pretrained(tmp / "model")
    _write_jsonl(tmp / "forget.jsonl", forget)
    _write_jsonl(tmp / "retain.jsonl", retain)
    _write_jsonl(tmp / "holdout.jsonl", corpus["holdout10"])
    (tmp / "done").write_text("")
    try:
        tmp.rename(root)
    except OSError:  # another process prepared it first
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
