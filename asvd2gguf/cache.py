"""Crash-safe cache entries: written to a temporary name and renamed, so a killed run never
leaves a corrupt entry, and every entry that exists is complete."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def tmp_path(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed to `path` (same folder,
    hidden, unique per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Make `path` by `write(tmp)` and a rename: readers see the old file or the whole new one,
    never a part, and a killed run leaves no entry (only its temp name, removed here on errors)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """write_atomic for a text file."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def save(obj, path: Path) -> None:
    """A torch object as a cache entry (write_atomic)."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


# What torch.load raises for a truncated, corrupt or foreign file: an unreadable entry is recomputed.
UNREADABLE = (OSError, EOFError, RuntimeError, pickle.UnpicklingError)


def load(path: Path):
    """The entry, or None when it is absent or unreadable (UNREADABLE: then it is recomputed).
    Any other exception (a bug, KeyboardInterrupt) propagates."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except UNREADABLE:
        return None
