"""Atomic file output: write to a temporary name beside the target, rename on success."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


def temp_path_for(path: Path) -> Path:
    """A temporary name in the same folder (same filesystem, so the rename is atomic)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_path(path: Path | str):
    """Yield a temporary path to write; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Path | str, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
