"""The memory in a DeepSpeed checkpoint: one file per rank in the tag directory, next to
DeepSpeed's files (saved and re-partitioned by :mod:`gru_optim.engine._fragments`)."""

from __future__ import annotations

import glob
import os

__all__ = ["MEMORY_FILE", "find_files"]

MEMORY_FILE = "gru_memory_rank{rank:05d}.pt"
"""Name of each rank's memory shard inside a checkpoint's tag directory."""


def find_files(tag_dir: str) -> list[str]:
    """The memory files of a checkpoint's tag directory (raises if there are none)."""
    files = sorted(glob.glob(os.path.join(tag_dir, MEMORY_FILE.replace("{rank:05d}", "*"))))
    if not files:
        raise FileNotFoundError(
            f"no GRU memory in {tag_dir} (the checkpoint was not saved with "
            "GRUDeepSpeed.save_checkpoint)"
        )
    return files
