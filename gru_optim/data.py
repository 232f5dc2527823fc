"""Paired forget/retain data for unlearning: :class:`PairedUnlearningDataset` (retain
pairing seeded per rank and per epoch), :class:`PairedCollator`, :func:`pad_examples` and
:func:`encode_example` (prompt/answer tokenisation with the prompt masked); question/answer
rows to examples: :func:`read_rows` (JSONL, JSON, CSV, Parquet, ``datasets`` folders),
:func:`encode_qa_rows` and :func:`qa_paired_dataset`."""

from ._data import PairedCollator, PairedUnlearningDataset, encode_example, pad_examples
from ._qa import (
    PLAIN_PROMPT,
    PromptFormat,
    RowsError,
    RowsOverlapWarning,
    encode_pair,
    encode_qa_rows,
    format_prompt,
    qa_paired_dataset,
    read_rows,
    row_kind,
    shared_rows,
)

__all__ = [
    "PLAIN_PROMPT",
    "PairedCollator",
    "PairedUnlearningDataset",
    "PromptFormat",
    "RowsError",
    "RowsOverlapWarning",
    "encode_example",
    "encode_pair",
    "encode_qa_rows",
    "format_prompt",
    "pad_examples",
    "qa_paired_dataset",
    "read_rows",
    "row_kind",
    "shared_rows",
]
