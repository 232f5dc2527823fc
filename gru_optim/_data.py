"""Paired forget/retain data: a dataset, its collator and a tokenisation helper.

Every forget example is paired with a retain example (and optionally with an "I don't
know" example for IdK objectives). The retain example is drawn from a permutation of the
retain set seeded by ``(seed, epoch, rank)``: each rank of a distributed run sees its own
retain items, each epoch a new pairing, and the pairing is a pure function of the index,
so it is the same in every DataLoader worker and after resuming from a checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .objectives import IGNORE_INDEX

__all__ = [
    "PairedCollator",
    "PairedUnlearningDataset",
    "encode_example",
    "pad_examples",
]

Example = Mapping[str, Any]


def _check_example(example: Any, what: str) -> None:
    """Refuse what is not a tokenised example (the first of each set is looked at)."""
    if isinstance(example, Mapping) and "input_ids" in example:
        return
    got = (
        f"a {type(example).__name__} ({example!r:.60})"
        if isinstance(example, (str, bytes))
        else f"a {type(example).__name__}"
        + (f" with keys {sorted(example)}" if isinstance(example, Mapping) else "")
    )
    raise TypeError(
        f"PairedUnlearningDataset takes tokenised examples, mappings with 'input_ids' (and "
        f"'labels', 'attention_mask'), but the first {what} example is {got}: tokenise "
        "first, e.g. [encode_example(tokenizer, prompt, answer) for prompt, answer in "
        "pairs] (gru_optim.data.encode_example masks the prompt out of the labels)"
    )


def _default_rank() -> int:
    """The process's rank: ``torch.distributed`` when initialised, else ``$RANK``, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class PairedUnlearningDataset(Dataset[dict[str, Example]]):
    """Forget examples, each paired with a retain example (and an IdK example).

    Item ``i`` is ``{"forget": forget[i], "retain": retain[j], "idk": idk[i]}`` (``"idk"``
    only when given), with ``j = perm[i mod len(retain)]`` and ``perm`` a permutation of
    the retain indices drawn from ``numpy.random.default_rng([seed, epoch, rank])``. Within
    an epoch retain items are therefore drawn without replacement (cycling when the forget
    set is larger), differently on each rank and in each epoch.

    Args:
        forget: forget examples (mappings such as ``{"input_ids", "labels"}``, see
            :func:`encode_example`).
        retain: retain examples.
        idk: optional examples aligned with ``forget`` (same prompts, refusal answers).
        seed: base seed of the retain pairing.
        rank: the process's rank; ``None`` reads it from ``torch.distributed`` (or
            ``$RANK``) when first needed.

    Call :meth:`set_epoch` at the start of each epoch (:class:`~gru_optim.hf.GRUTrainer`
    does; Accelerate's data loaders forward ``set_epoch`` to the dataset only on a single
    process). DataLoader workers copy the dataset when they start, so with
    ``persistent_workers=True`` they keep the pairing of the epoch they started in.
    """

    def __init__(
        self,
        forget: Sequence[Example],
        retain: Sequence[Example],
        idk: Sequence[Example] | None = None,
        *,
        seed: int = 0,
        rank: int | None = None,
    ) -> None:
        if len(forget) == 0:
            raise ValueError("the forget set is empty")
        if len(retain) == 0:
            raise ValueError("the retain set is empty")
        for what, examples in (("forget", forget), ("retain", retain), ("idk", idk)):
            if examples is not None:
                _check_example(examples[0], what)
        if idk is not None and len(idk) != len(forget):
            raise ValueError(
                f"idk examples must align with the forget examples: got {len(idk)} for "
                f"{len(forget)} forget examples"
            )
        self.forget = forget
        self.retain = retain
        self.idk = idk
        self.seed = int(seed)
        self._rank = rank
        self.epoch = 0
        self._perm: np.ndarray | None = None

    @property
    def rank(self) -> int:
        """The rank whose retain pairing this dataset draws."""
        if self._rank is None:
            self._rank = _default_rank()
        return self._rank

    def set_epoch(self, epoch: int) -> None:
        """Select the pairing of epoch ``epoch``."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._perm = None

    def retain_indices(self) -> np.ndarray:
        """The permutation of retain indices for the current epoch and rank."""
        if self._perm is None:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank])
            self._perm = rng.permutation(len(self.retain))
        return self._perm

    def retain_index(self, i: int) -> int:
        """Index in ``retain`` of the example paired with forget example ``i``."""
        perm = self.retain_indices()
        return int(perm[i % len(perm)])

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict[str, Example]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} forget examples")
        i = i % len(self)
        item = {"forget": self.forget[i], "retain": self.retain[self.retain_index(i)]}
        if self.idk is not None:
            item["idk"] = self.idk[i]
        return item


def encode_example(
    tokenizer: Any,
    prompt: str,
    answer: str,
    *,
    max_length: int | None = None,
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """Tokenise a prompt/answer pair for a causal LM: ``input_ids`` is prompt then answer
    (then EOS), ``labels`` is ``-100`` on the prompt and the answer's ids elsewhere,
    ``attention_mask`` is all ones. Prompt and answer are tokenised separately, so the
    boundary between them is exact. ``max_length`` truncates from the right."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; pass add_eos=False")
        answer_ids.append(tokenizer.eos_token_id)
    ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _as_list(x: Any) -> list[int]:
    if isinstance(x, Tensor):
        return x.tolist()
    return list(x)


def pad_examples(
    examples: Sequence[Example],
    pad_token_id: int,
    *,
    padding_side: Literal["right", "left"] = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, Tensor]:
    """Pad examples to one batch: ``input_ids`` with ``pad_token_id``, ``attention_mask``
    with ``0`` (all ones when the examples have none), ``labels`` with ``-100`` (a copy of
    ``input_ids`` when the examples have none). Returns ``int64`` tensors ``(B, T)``."""
    if not examples:
        raise ValueError("no examples to pad")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    ids = [_as_list(e["input_ids"]) for e in examples]
    masks = [
        _as_list(e["attention_mask"]) if "attention_mask" in e else [1] * len(i)
        for e, i in zip(examples, ids)
    ]
    labels = [_as_list(e["labels"]) if "labels" in e else list(i) for e, i in zip(examples, ids)]
    length = max(len(i) for i in ids)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of

    def pad(rows: list[list[int]], value: int) -> Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for r, row in enumerate(rows):
            if row:
                if padding_side == "right":
                    out[r, : len(row)] = torch.tensor(row, dtype=torch.long)
                else:
                    out[r, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        return out

    return {
        "input_ids": pad(ids, pad_token_id),
        "attention_mask": pad(masks, 0),
        "labels": pad(labels, IGNORE_INDEX),
    }


class PairedCollator:
    """Collate items of :class:`PairedUnlearningDataset` into
    ``{"forget": batch, "retain": batch[, "idk": batch]}``, each batch padded by
    :func:`pad_examples`.

    Args:
        pad_token_id: the padding id, or a tokenizer (its ``pad_token_id``, else its
            ``eos_token_id``).
        padding_side: ``"right"`` (default) or ``"left"``.
        pad_to_multiple_of: round each batch's length up to a multiple of this.
    """

    def __init__(
        self,
        pad_token_id: int | Any,
        *,
        padding_side: Literal["right", "left"] = "right",
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if not isinstance(pad_token_id, int):
            tok = pad_token_id
            pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            if pad_token_id is None:
                raise ValueError("the tokenizer has neither a pad_token nor an eos_token")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[Mapping[str, Example]]) -> dict[str, dict[str, Tensor]]:
        if not items:
            raise ValueError("no items to collate")
        first = items[0]
        if not (isinstance(first, Mapping) and "forget" in first and "retain" in first):
            got = sorted(first) if isinstance(first, Mapping) else type(first).__name__
            raise ValueError(
                "PairedCollator collates paired items {'forget': example, 'retain': example"
                f"[, 'idk': example]}}, got an item {got}: wrap the examples in "
                "PairedUnlearningDataset(forget, retain) (gru_optim.data), which pairs each "
                "forget example with a retain example"
            )
        keys = [k for k in ("forget", "retain", "idk") if k in first]
        return {
            k: pad_examples(
                [it[k] for it in items],
                self.pad_token_id,
                padding_side=self.padding_side,
                pad_to_multiple_of=self.pad_to_multiple_of,
            )
            for k in keys
        }
