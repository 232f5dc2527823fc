"""The tokenizer, batch encoding and the causal language models of the study.

A byte-level BPE tokenizer is trained on the corpus with ``tokenizers`` (its vocabulary
holds the 256 byte symbols plus merges and two special tokens, so no character is ever
dropped); the models are ``transformers`` GPT-2 models built from a config and trained
here from scratch. Trained models are cached on disk under a key that hashes everything
that determines them, so later runs reuse them. A Hugging Face model and its tokenizer
(a folder or a hub name) go through the same code: :class:`Codec` encodes for both.
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
    "PROMPT_FORMATS",
    "Codec",
    "EncodedBatch",
    "ModelConfig",
    "TrainConfig",
    "build_model",
    "encode_prompts",
    "encode_qa",
    "load_or_train",
    "load_pretrained",
    "load_tokenizer",
    "train_tokenizer",
]

PAD, EOS = "<pad>", "<eos>"

PROMPT_FORMATS = ("plain", "llama2", "chat")
"""How a question becomes a prompt: ``plain`` is TOFU's format for phi-1.5, StableLM and
Pythia (``"Question: {q}\\nAnswer: {a}"``, TOFU ``config/model_config.yaml``), ``llama2``
TOFU's for Llama-2-7b (``"[INST] {q} [/INST]{a}"``), ``chat`` the tokenizer's chat
template with an optional system prompt (open-unlearning ``src/data/utils.py``,
``preprocess_chat_instance``; its TOFU models use the system prompt "You are a helpful
assistant." and, for Llama 3, the template's date "10 Apr 2025")."""


def format_prompt(question: str) -> str:
    """The prompt of a question in the ``plain`` format (the answer follows after one
    space)."""
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


class Codec:
    """The tokenizer as the study uses it: token ids of prompts and answers, the
    end-of-sequence and padding ids, decoding.

    ``tok`` is a ``tokenizers.Tokenizer`` trained here (``plain`` format only: prompt ids,
    then the ids of ``" " + answer``, then ``<eos>``) or a Hugging Face tokenizer. For the
    latter a pair is encoded as TOFU does (``data_module.py``,
    ``convert_raw_data_to_model_format``) and open-unlearning (``src/data/utils.py``,
    ``preprocess_chat_instance``): the whole text ``prompt + answer`` is tokenized, the
    labels are the tokens after those of the prompt alone, and the end-of-sequence token
    is appended unless it is already last. The padding id is the tokenizer's, or its
    end-of-sequence id when it has none (as TOFU pads).
    """

    def __init__(
        self,
        tok: Any,
        prompt_format: str = "plain",
        system_prompt: str | None = None,
        date_string: str | None = None,
    ) -> None:
        from tokenizers import Tokenizer

        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(
                f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}"
            )
        self.tok = tok
        self.prompt_format = prompt_format
        self.system_prompt = system_prompt
        # Llama 3 chat templates print a date (today's unless given): open-unlearning
        # passes date_string="10 Apr 2025" (configs/model/Llama-3.2-1B-Instruct.yaml)
        self.template_kwargs = {"date_string": date_string} if date_string is not None else {}
        self.local = isinstance(tok, Tokenizer)
        if self.local:
            if prompt_format != "plain" or system_prompt is not None or date_string is not None:
                raise ValueError("a tokenizer trained here uses the plain prompt format only")
            self.eos_id: int = tok.token_to_id(EOS)
            self.pad_id: int = tok.token_to_id(PAD)
        else:
            if tok.eos_token_id is None:
                raise ValueError("the tokenizer has no end-of-sequence token")
            if prompt_format == "chat" and not getattr(tok, "chat_template", None):
                raise ValueError("prompt_format='chat' needs a tokenizer with a chat template")
            self.eos_id = int(tok.eos_token_id)
            pad = tok.pad_token_id
            self.pad_id = int(pad) if pad is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return int(self.tok.get_vocab_size()) if self.local else len(self.tok)

    def fingerprint(self) -> str:
        """A string that changes when the encoding changes (part of cache keys)."""
        if self.local:
            return str(self.tok.to_str())
        return json.dumps(
            [
                getattr(self.tok, "name_or_path", ""),
                len(self.tok),
                self.prompt_format,
                self.system_prompt,
                self.template_kwargs,
            ],
        )

    def _messages(self, question: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": question}]

    def prompt_text(self, question: str) -> str:
        """The prompt of ``question`` as text."""
        if self.prompt_format == "plain":
            return format_prompt(question)
        if self.prompt_format == "llama2":
            return f"[INST] {question} [/INST]"
        text = self.tok.apply_chat_template(
            self._messages(question),
            tokenize=False,
            add_generation_prompt=True,
            **self.template_kwargs,
        )
        return str(text)

    def _hf_ids(self, text: str) -> list[int]:
        # a chat template already holds the special tokens it wants (the BOS among them)
        special = self.prompt_format != "chat"
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def encode_prompts(self, questions: Sequence[str]) -> list[list[int]]:
        """The token ids of each question's prompt (what generation starts from)."""
        if self.local:
            return [e.ids for e in self.tok.encode_batch([format_prompt(q) for q in questions])]
        return [self._hf_ids(self.prompt_text(q)) for q in questions]

    def encode_pairs(
        self, questions: Sequence[str], answers: Sequence[str]
    ) -> list[tuple[list[int], list[int]]]:
        """Per pair: the prompt's token ids and the answer's, end-of-sequence included."""
        if len(questions) != len(answers):
            raise ValueError("questions and answers differ in length")
        if self.local:
            prompts = self.encode_prompts(questions)
            outs = self.tok.encode_batch([" " + a for a in answers])
            return [(p, a.ids + [self.eos_id]) for p, a in zip(prompts, outs)]
        pairs = []
        for q, a in zip(questions, answers):
            if self.prompt_format == "chat":
                full_text = self.tok.apply_chat_template(
                    self._messages(q) + [{"role": "assistant", "content": a}],
                    tokenize=False,
                    add_generation_prompt=False,
                    **self.template_kwargs,
                )
            else:
                sep = " " if self.prompt_format == "plain" else ""
                full_text = self.prompt_text(q) + sep + a
            prompt = self._hf_ids(self.prompt_text(q))
            full = self._hf_ids(str(full_text))
            answer = full[len(prompt) :]
            if not answer or answer[-1] != self.eos_id:
                answer = answer + [self.eos_id]
            pairs.append((full[: len(prompt)], answer))
        return pairs

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Texts of token id lists, special tokens skipped."""
        if self.local:
            return list(self.tok.decode_batch([list(x) for x in ids]))
        return list(self.tok.batch_decode([list(x) for x in ids], skip_special_tokens=True))


def as_codec(tok: Any) -> Codec:
    """``tok`` itself when it is a :class:`Codec`, else the plain-format codec of it."""
    return tok if isinstance(tok, Codec) else Codec(tok)


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
        idx = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        mask = self.attention_mask[idx]
        width = max(int(mask.sum(1).max()), 1)
        return EncodedBatch(self.input_ids[idx, :width], mask[:, :width], self.labels[idx, :width])

    def to(self, device: str | torch.device) -> EncodedBatch:
        """The batch on ``device``."""
        return EncodedBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device)
        )


def encode_qa(tok: Any, questions: Sequence[str], answers: Sequence[str]) -> EncodedBatch:
    """Encode question/answer pairs as prompt + answer + end of sequence (see
    :class:`Codec`; ``tok`` is a codec or a tokenizer trained here); the labels are the
    token ids of the answer and the end of sequence, ``-100`` on the prompt and the
    padding."""
    codec = as_codec(tok)
    pairs = codec.encode_pairs(questions, answers)
    seqs = [p + a for p, a in pairs]
    labs = [[-100] * len(p) + a for p, a in pairs]
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), codec.pad_id, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    return EncodedBatch(input_ids, mask, labels)


def encode_prompts(tok: Any, questions: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids and attention mask, for batched greedy generation."""
    codec = as_codec(tok)
    enc = codec.encode_prompts(questions)
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), codec.pad_id, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e) :] = torch.tensor(e)
        mask[i, width - len(e) :] = 1
    return ids, mask


@dataclass(frozen=True)
class ModelConfig:
    """Size of the tiny GPT-2. ``n_positions`` (its context) is 200, TOFU's generation
    length (``max_length=200``, prompt included), so that generation can run as TOFU's."""

    vocab_size: int = 1024
    n_positions: int = 200
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
    device = next(model.parameters()).device
    data = data.to(device)
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
            batch = data.select(perm[b * cfg.batch_size : (b + 1) * cfg.batch_size].to(device))
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
    device: str = "cpu",
) -> tuple[Any, dict[str, Any]]:
    """The model trained on ``rows`` (question/answer dicts) from seed ``seed``, loaded
    from ``cache_dir`` when it was trained before with the same inputs, otherwise trained
    (with a progress bar) and saved there. Returns the model (in eval mode, on ``device``)
    and a dict with ``cached``, ``seconds`` and ``final_loss``."""
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
        model: Any = GPT2LMHeadModel.from_pretrained(path)
        model.to(device)
        model.eval()
        info = json.loads((path / "info.json").read_text())
        info["cached"] = True
        return model, info
    t0 = time.perf_counter()
    data = encode_qa(tok, [r["question"] for r in rows], [r["answer"] for r in rows])
    model = build_model(model_cfg, seed).to(device)
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The ``dtype`` names a pretrained model may be loaded in."""


def load_pretrained(path: str, device: str = "cpu", dtype: str = "float32") -> Any:
    """A Hugging Face causal language model (``AutoModelForCausalLM``) from a folder or a
    hub name, in ``dtype`` (a :data:`DTYPES` name) on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    model.to(device)
    model.eval()
    return model


def load_tokenizer(path: str) -> Any:
    """The Hugging Face tokenizer (``AutoTokenizer``) of a folder or a hub name."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
