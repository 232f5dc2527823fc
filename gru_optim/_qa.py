"""Question/answer and plain-text rows -> tokenized examples for unlearning.

Rows are mappings (a list of dicts, or a ``datasets.Dataset``) with either ``question``
and ``answer`` columns (prompt-answer pairs: the loss is on the answer tokens only) or a
``text`` column (plain language modelling: the loss is on every token). The prompt is the
tokenizer's chat template when it has one, else the plain format ``"Question: {q}\\nAnswer:"``
followed by ``" " + answer`` (TOFU's format for models without a chat template, and the
study's). Every answer ends with the end-of-sequence token.

:func:`read_rows` reads JSONL, JSON, CSV and Parquet files and ``datasets.save_to_disk``
folders (Parquet and folders need the ``datasets`` package).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ._data import PairedUnlearningDataset
from .objectives import IGNORE_INDEX

__all__ = [
    "PLAIN_PROMPT",
    "PromptFormat",
    "RowsError",
    "RowsOverlapWarning",
    "encode_pair",
    "encode_qa_rows",
    "format_prompt",
    "qa_paired_dataset",
    "read_rows",
    "row_kind",
    "shared_rows",
]

PLAIN_PROMPT = "Question: {question}\nAnswer:"
"""The plain prompt format (TOFU's for models without a chat template); the answer
follows after one space."""

PromptFormat = Literal["auto", "chat", "plain"]
"""``"chat"``: the tokenizer's chat template; ``"plain"``: :data:`PLAIN_PROMPT`;
``"auto"``: the chat template when the tokenizer has one, else plain."""

ROW_FORMATS = (".jsonl", ".json", ".csv", ".parquet")
"""File suffixes :func:`read_rows` reads (besides ``datasets.save_to_disk`` folders)."""


class RowsOverlapWarning(UserWarning):
    """Forget and retain rows share rows: the objective then pushes the same example down
    and up."""


class RowsError(ValueError):
    """Rows that cannot be used: a missing column, an empty or unreadable file. The message
    names the file (when there is one) and the fix."""


def _list_cell(value: Any) -> Any:
    """A CSV cell holding a JSON list (``perturbed_answer``) as the list."""
    if isinstance(value, str) and value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_with_datasets(path: Path) -> list[dict[str, Any]]:
    try:
        import datasets  # type: ignore[import-untyped]
    except ImportError as e:
        raise RowsError(
            f"{path}: reading Parquet files and datasets folders needs the 'datasets' "
            "package: pip install datasets (or convert the file to JSONL)"
        ) from e
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise RowsError(
                f"{path} holds several splits ({', '.join(ds)}): pass the folder of one "
                f"split, e.g. {path / next(iter(ds))}"
            )
    else:
        ds = datasets.Dataset.from_parquet(str(path))
    return [dict(r) for r in ds]


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL (``.jsonl``; a ``.json`` file may also be JSON lines), JSON (a
    list of objects), CSV (header row; a cell holding a JSON list is read as the list) or
    Parquet file, or of a ``datasets.save_to_disk`` folder. Raises :class:`RowsError`
    (a ``ValueError``) naming the file for a missing, unreadable or empty file."""
    p = Path(path)
    if not p.exists():
        raise RowsError(f"{p} does not exist: pass the path of a JSONL, JSON, CSV or Parquet file")
    if p.is_dir():
        rows = _read_with_datasets(p)
    elif p.suffix.lower() == ".parquet":
        rows = _read_with_datasets(p)
    elif p.suffix.lower() == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            rows = [{k: _list_cell(v) for k, v in r.items()} for r in csv.DictReader(f)]
    elif p.suffix.lower() in (".jsonl", ".json"):
        text = p.read_text(encoding="utf-8").strip()
        try:
            if text.startswith("["):
                rows = list(json.loads(text))
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise RowsError(f"{p} is not valid JSON lines or JSON: {e}") from e
    else:
        raise RowsError(
            f"{p}: unknown file type {p.suffix!r}; use one of {', '.join(ROW_FORMATS)} or a "
            "datasets.save_to_disk folder"
        )
    if not rows:
        raise RowsError(f"{p} has no rows: give it at least one row")
    if not all(isinstance(r, Mapping) for r in rows):
        raise RowsError(f"{p}: every row must be an object with named columns")
    return [dict(r) for r in rows]


def row_kind(rows: Sequence[Mapping[str, Any]] | Any, name: str = "the rows") -> str:
    """``"qa"`` when the rows have ``question`` and ``answer`` columns, ``"text"`` when they
    have a ``text`` column; otherwise :class:`RowsError` naming the missing column. Every
    row must have the columns of the first kind found (the error names the row)."""
    rows = list(rows)
    if not rows:
        raise RowsError(f"{name} has no rows: give it at least one row")
    first = rows[0]
    if "question" in first or "answer" in first:
        needed: tuple[str, ...] = ("question", "answer")
        kind = "qa"
    elif "text" in first:
        needed, kind = ("text",), "text"
    else:
        raise RowsError(
            f"{name} has no 'question'/'answer' or 'text' column (columns: "
            f"{', '.join(map(str, first)) or 'none'}): add a 'question' and an 'answer' "
            "column, or a 'text' column"
        )
    for i, r in enumerate(rows):
        for col in needed:
            if col not in r:
                raise RowsError(f"{name} row {i} has no '{col}' column: add it to every row")
            if not isinstance(r[col], str):
                raise RowsError(
                    f"{name} row {i}: '{col}' must be a string, got {type(r[col]).__name__}"
                )
    return kind


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _resolve_format(tokenizer: Any, prompt_format: str) -> str:
    if prompt_format not in ("auto", "chat", "plain"):
        raise ValueError(f"prompt_format must be 'auto', 'chat' or 'plain', got {prompt_format!r}")
    if prompt_format == "auto":
        return "chat" if _has_chat_template(tokenizer) else "plain"
    if prompt_format == "chat" and not _has_chat_template(tokenizer):
        raise ValueError("prompt_format='chat' needs a tokenizer with a chat template")
    return prompt_format


def format_prompt(tokenizer: Any, question: str, prompt_format: PromptFormat = "auto") -> str:
    """The prompt text of ``question``: the chat template's user turn with the generation
    prompt, or :data:`PLAIN_PROMPT`."""
    if _resolve_format(tokenizer, prompt_format) == "chat":
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": question}],
                tokenize=False,
                add_generation_prompt=True,
            )
        )
    return PLAIN_PROMPT.format(question=question)


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: set one (tokenizer.eos_token = ...)")
    return int(tokenizer.eos_token_id)


def encode_pair(
    tokenizer: Any, question: str, answer: str, prompt_format: PromptFormat = "auto"
) -> tuple[list[int], list[int]]:
    """The prompt's token ids and the answer's (end of sequence included).

    Plain format: the prompt is tokenized with the tokenizer's special tokens (a BOS when
    it adds one) and ``" " + answer`` separately, so the boundary is exact. Chat format:
    the whole conversation is tokenized and the answer is what follows the prompt's
    tokens (the template holds its own special tokens)."""
    eos = _eos(tokenizer)
    if _resolve_format(tokenizer, prompt_format) == "plain":
        prompt = _ids(tokenizer, PLAIN_PROMPT.format(question=question), True)
        ans = _ids(tokenizer, " " + answer, False)
    else:
        prompt = _ids(tokenizer, format_prompt(tokenizer, question, "chat"), False)
        full_text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            tokenize=False,
        )
        full = _ids(tokenizer, str(full_text), False)
        if full[: len(prompt)] == prompt:
            ans = full[len(prompt) :]
        else:  # the template re-tokenizes across the boundary: tokenize apart
            ans = _ids(tokenizer, answer, False)
    if not ans or ans[-1] != eos:
        ans = ans + [eos]
    return prompt, ans


def encode_qa_rows(
    tokenizer: Any,
    rows: Iterable[Mapping[str, Any]],
    *,
    answer_key: str = "answer",
    prompt_format: PromptFormat = "auto",
    max_length: int | None = None,
    name: str = "the rows",
) -> list[dict[str, list[int]]]:
    """Tokenized examples ``{"input_ids", "attention_mask", "labels"}`` of ``rows`` (a
    sequence of mappings or a ``datasets.Dataset``), ready for
    :class:`~gru_optim.data.PairedUnlearningDataset` and
    :func:`~gru_optim.data.pad_examples`.

    Question/answer rows: the prompt (see :func:`encode_pair`) then the answer under
    ``answer_key`` (``"paraphrased_answer"`` for the truth ratio's reference, say), labels
    ``-100`` on the prompt. ``text`` rows: the text then the end of sequence, every token
    labelled. ``max_length`` truncates from the right (a row left without an answer token
    is refused). A missing column raises :class:`RowsError` naming it."""
    rows = list(rows)
    kind = row_kind(rows, name)
    out: list[dict[str, list[int]]] = []
    for i, r in enumerate(rows):
        if kind == "text":
            ids = _ids(tokenizer, r["text"], True) + [_eos(tokenizer)]
            labels = list(ids)
        else:
            if answer_key not in r or not isinstance(r[answer_key], str):
                raise RowsError(f"{name} row {i} has no '{answer_key}' string: add it")
            prompt, ans = encode_pair(tokenizer, r["question"], r[answer_key], prompt_format)
            ids = prompt + ans
            labels = [IGNORE_INDEX] * len(prompt) + ans
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
            if all(x == IGNORE_INDEX for x in labels):
                raise RowsError(
                    f"{name} row {i}: its prompt fills max_length={max_length} tokens, "
                    "leaving no answer token: raise max_length (--max-length)"
                )
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def qa_paired_dataset(
    tokenizer: Any,
    forget: Iterable[Mapping[str, Any]],
    retain: Iterable[Mapping[str, Any]],
    *,
    prompt_format: PromptFormat = "auto",
    max_length: int | None = None,
    seed: int = 0,
    rank: int | None = None,
) -> PairedUnlearningDataset:
    """A :class:`~gru_optim.data.PairedUnlearningDataset` of the forget and retain rows
    (question/answer or ``text`` rows, lists of mappings or ``datasets.Dataset``s), each
    encoded by :func:`encode_qa_rows`: the training set of
    :class:`~gru_optim.hf.GRUTrainer`."""
    return PairedUnlearningDataset(
        encode_qa_rows(
            tokenizer, forget, prompt_format=prompt_format, max_length=max_length, name="forget"
        ),
        encode_qa_rows(
            tokenizer, retain, prompt_format=prompt_format, max_length=max_length, name="retain"
        ),
        seed=seed,
        rank=rank,
    )


def _row_key(r: Mapping[str, Any]) -> tuple[str, ...]:
    if "question" in r:
        return (str(r.get("question")).strip(), str(r.get("answer")).strip())
    return (str(r.get("text")).strip(),)


def shared_rows(
    forget: Iterable[Mapping[str, Any]], retain: Iterable[Mapping[str, Any]]
) -> list[int]:
    """Indices of the forget rows that also appear in the retain rows (same question and
    answer, or same text, up to surrounding white space)."""
    keys = {_row_key(r) for r in retain}
    return [i for i, r in enumerate(forget) if _row_key(r) in keys]
