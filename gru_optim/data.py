"""Paired forget/retain data for unlearning: :class:`PairedUnlearningDataset` (retain
pairing seeded per rank and per epoch), :class:`PairedCollator`, :func:`pad_examples` and
:func:`encode_example` (prompt/answer tokenisation with the prompt masked)."""

from ._data import PairedCollator, PairedUnlearningDataset, encode_example, pad_examples

__all__ = ["PairedCollator", "PairedUnlearningDataset", "encode_example", "pad_examples"]
