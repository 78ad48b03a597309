"""Shared by the bench scripts (run as `python bench/X.py`, so this folder is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path


def load_results(log: Path) -> dict[str, dict]:
    """Rows of an earlier run's results.jsonl by their "file" (a rerun skips what is measured)."""
    if not log.is_file():
        return {}
    rows = (json.loads(line) for line in log.read_text().splitlines() if line.strip())
    return {row["file"]: row for row in rows}
