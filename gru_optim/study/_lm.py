"""The tokenizer, batch encoding and the tiny causal language models of the study.

A byte-level BPE tokenizer is trained on the corpus with ``tokenizers`` (its vocabulary
holds the 256 byte symbols plus merges and two special tokens, so no character is ever
dropped); the models are ``transformers`` GPT-2 models built from a config and trained
here from scratch. Trained models are cached on disk under a key that hashes everything
that determines them, so later runs reuse them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "EncodedBatch",
    "ModelConfig",
    "TrainConfig",
    "build_model",
    "encode_prompts",
    "encode_qa",
    "load_or_train",
    "train_tokenizer",
]

PAD, EOS = "<pad>", "<eos>"


def format_prompt(question: str) -> str:
    """The prompt of a question (the answer follows after one space)."""
    return f"Question: {question}\nAnswer:"


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``.

    ``vocab_size`` must exceed 258 (256 byte symbols + ``<pad>`` + ``<eos>``): below that
    the trainer cannot hold every byte and silently drops characters.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 258:
        raise ValueError(
            f"vocab_size must be > 258 (256 bytes + 2 special tokens), got {vocab_size}: "
            "a smaller byte-level vocabulary drops characters"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


@dataclass
class EncodedBatch:
    """Right-padded token ids with answer-only labels (``-100`` elsewhere)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, index: Tensor | Sequence[int]) -> EncodedBatch:
        """The rows ``index``, trimmed to their longest sequence."""
        idx = torch.as_tensor(index, dtype=torch.long)
        mask = self.attention_mask[idx]
        width = max(int(mask.sum(1).max()), 1)
        return EncodedBatch(self.input_ids[idx, :width], mask[:, :width], self.labels[idx, :width])


def encode_qa(tok: Any, questions: Sequence[str], answers: Sequence[str]) -> EncodedBatch:
    """Encode question/answer pairs as ``prompt + " " + answer + <eos>``; the labels are
    the token ids of the answer and ``<eos>``, ``-100`` on the prompt and the padding."""
    if len(questions) != len(answers):
        raise ValueError("questions and answers differ in length")
    pad = tok.token_to_id(PAD)
    eos = tok.token_to_id(EOS)
    prompts = tok.encode_batch([format_prompt(q) for q in questions])
    outs = tok.encode_batch([" " + a for a in answers])
    seqs, labs = [], []
    for p, a in zip(prompts, outs):
        ids = p.ids + a.ids + [eos]
        seqs.append(ids)
        labs.append([-100] * len(p.ids) + a.ids + [eos])
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    return EncodedBatch(input_ids, mask, labels)


def encode_prompts(tok: Any, questions: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids and attention mask, for batched greedy generation."""
    pad = tok.token_to_id(PAD)
    enc = tok.encode_batch([format_prompt(q) for q in questions])
    width = max(len(e.ids) for e in enc)
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e.ids) :] = torch.tensor(e.ids)
        mask[i, width - len(e.ids) :] = 1
    return ids, mask


@dataclass(frozen=True)
class ModelConfig:
    """Size of the tiny GPT-2."""

    vocab_size: int = 1024
    n_positions: int = 96
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained from scratch to memorise its data (AdamW, linear warm-up
    then cosine decay, batches drawn by epoch)."""

    epochs: int = 60
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: float = 0.05


def build_model(cfg: ModelConfig, seed: int) -> Any:
    """A freshly initialised ``transformers`` GPT-2 language model (no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _train(model: Any, data: EncodedBatch, cfg: TrainConfig, seed: int, desc: str) -> list[float]:
    from tqdm.auto import tqdm

    from ..objectives import nll_loss

    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * per_epoch
    warm = max(1, int(cfg.warmup * total))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm
            if s < warm
            else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
        ),
    )
    model.train()
    losses = []
    bar = tqdm(total=total, desc=desc, leave=False, mininterval=0.5)
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for b in range(per_epoch):
            batch = data.select(perm[b * cfg.batch_size : (b + 1) * cfg.batch_size])
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = nll_loss(logits, batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}")
    bar.close()
    model.eval()
    return losses


def cache_key(**parts: Any) -> str:
    """A short hash of everything that determines a cached artefact."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_train(
    name: str,
    rows: Sequence[dict[str, Any]],
    tok: Any,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    seed: int,
    cache_dir: str | Path | None,
    key_parts: dict[str, Any],
) -> tuple[Any, dict[str, Any]]:
    """The model trained on ``rows`` (question/answer dicts) from seed ``seed``, loaded
    from ``cache_dir`` when it was trained before with the same inputs, otherwise trained
    (with a progress bar) and saved there. Returns the model (in eval mode) and a dict with
    ``cached``, ``seconds`` and ``final_loss``."""
    from transformers import GPT2LMHeadModel

    key = cache_key(
        name=name,
        model=asdict(model_cfg),
        train=asdict(train_cfg),
        seed=seed,
        **key_parts,
    )
    path = Path(cache_dir) / f"{name}-{key}" if cache_dir is not None else None
    if path is not None and (path / "info.json").exists():
        model = GPT2LMHeadModel.from_pretrained(path)
        model.eval()  # type: ignore[no-untyped-call]
        info = json.loads((path / "info.json").read_text())
        info["cached"] = True
        return model, info
    t0 = time.perf_counter()
    data = encode_qa(tok, [r["question"] for r in rows], [r["answer"] for r in rows])
    model = build_model(model_cfg, seed)
    losses = _train(model, data, train_cfg, seed, desc=f"train {name}")
    info = {
        "cached": False,
        "seconds": time.perf_counter() - t0,
        "final_loss": sum(losses[-10:]) / min(10, len(losses)),
        "n_train": len(rows),
    }
    if path is not None:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        (tmp / "info.json").write_text(json.dumps(info))
        try:
            tmp.rename(path)
        except OSError:  # another process saved it first
            pass
    return model, info
