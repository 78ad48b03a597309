"""Crash-safe cache entries: written to a temporary name and renamed, so a killed run never
leaves a corrupt entry, and every entry that exists is complete."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path):
    """The entry, or None when absent or unreadable (then it is simply recomputed)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:
        return None
