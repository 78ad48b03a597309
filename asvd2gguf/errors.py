"""One exception type for everything a user can cause, so the CLI can print one line and exit;
warnings and fallbacks (what was done instead of what was asked) as typed records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input or environment; the message is shown as-is, no traceback."""


def require_file(path, what: str = "file") -> Path:
    """`path` as a Path when it is an existing file; else UserError naming `what` and whether it
    is missing or a folder (the one check every input file of every command goes through)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {p} is a directory, not a file")
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    return p


class AsvdWarning(UserWarning):
    """Something the user should know that does not stop the command; the CLI prints it as one line."""


@dataclass(frozen=True)
class Fallback:
    """A tensor written otherwise than planned: which one, why, and what was written instead.

    name: a linear ("blk.3.attn_k") or a GGUF tensor ("token_embd.weight"). The CLI prints
    str(fallback) as a warning.
    """

    name: str
    reason: str  # e.g. "non-finite factors"
    written: str  # e.g. "dense", "as the exact full-width latent", "kept as float"

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}; written {self.written}"
