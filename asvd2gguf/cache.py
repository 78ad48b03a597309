"""Crash-safe cache entries: written to a temporary name and renamed (atomic.py), so a killed run
never leaves a corrupt entry, and every entry that exists is complete."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch

from .atomic import write_atomic


def key(*parts) -> str:
    """A 20-hex-digit content key for a cache entry from everything that determines it (JSON-able)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def save(obj, path: Path) -> None:
    """A torch object as a cache entry (atomic.write_atomic)."""
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
