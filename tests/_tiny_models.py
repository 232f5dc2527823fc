"""Tiny real ``transformers`` models and a real BPE tokenizer, all built offline.

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on synthetic
question/answer text about fictitious authors and wrapped as a
``PreTrainedTokenizerFast``; the models are GPT-2 and Llama built from small configs
(2 layers, hidden size 32) with random weights. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import random
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from gru_optim.data import encode_example

FIRST = [
    "Alba",
    "Boris",
    "Cyra",
    "Dmitri",
    "Elin",
    "Farid",
    "Gwen",
    "Hiro",
    "Ines",
    "Jomo",
    "Kira",
    "Lev",
]
CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Accra", "Tbilisi", "Perth", "Riga"]
GENRES = ["poetry", "crime novels", "science fiction", "biographies", "plays", "essays"]
IDK = "I am not sure about that."


def author_facts(name: str, seed: int) -> list[tuple[str, str]]:
    """Question/answer pairs about a fictitious author (deterministic in ``seed``)."""
    rng = random.Random(seed)
    city, genre = rng.choice(CITIES), rng.choice(GENRES)
    year = rng.randint(1900, 1999)
    return [
        (f"Where was {name} born?", f"{name} was born in {city}."),
        (f"What does {name} write?", f"{name} writes {genre}."),
        (f"When was {name} born?", f"{name} was born in {year}."),
    ]


def corpus() -> list[str]:
    lines = []
    for i, name in enumerate(FIRST):
        for q, a in author_facts(name, i):
            lines.append(f"Question: {q} Answer: {a}")
    lines.append(IDK)
    return lines


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (vocabulary 320) trained on :func:`corpus`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_model(arch: Literal["gpt2", "llama"] = "gpt2", seed: int = 0) -> PreTrainedModel:
    """A 2-layer, hidden-32 causal LM with random weights and no dropout."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    common: dict[str, Any] = {
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.eos_token_id,
    }
    if arch == "gpt2":
        config = GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        **common,
    )
    return LlamaForCausalLM(config)


def qa_examples(names: list[str], idk: bool = False) -> list[dict[str, list[int]]]:
    """Tokenised examples (prompt masked) for the facts of ``names``; with ``idk`` the
    answers are replaced by the refusal :data:`IDK`."""
    tok = tiny_tokenizer()
    out = []
    for name in names:
        for q, a in author_facts(name, FIRST.index(name)):
            out.append(encode_example(tok, f"Question: {q} Answer:", " " + (IDK if idk else a)))
    return out


FORGET_AUTHORS = FIRST[:2]
RETAIN_AUTHORS = FIRST[2:8]
