"""Write-to-a-temporary-name-and-rename: the one helper for every file and folder we make.

A reader sees the old entry or the whole new one, never a part; a killed run leaves only a
hidden temporary name (removed here on errors; gguf_write.clean_stale_partials removes those of
dead processes beside an output). Torch-free, so the command line and llamacpp_tree can use it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def tmp_path(path: Path, tag: str = "tmp") -> Path:
    """The temporary name `path` is written under: hidden, same folder, unique per process
    (.<name>.<tag>-<pid>)."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def write_atomic(path: Path, write: Callable[[Path], object], tag: str = "tmp") -> None:
    """Make the file `path` by `write(tmp)` then a rename (os.replace; overwrites `path`).

    Creates the parent folder. Whatever `write` raises propagates, and the temporary file is
    removed then.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path, tag)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str, encoding: str | None = None) -> None:
    """write_atomic for a text file."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding=encoding))


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `dest`, renamed to `dest` when the block ends normally.

    When another process made `dest` first, its copy is kept (it was made from the same
    inputs) and ours removed; on an exception the temporary folder is removed and nothing is
    renamed. Raises OSError when the rename fails and `dest` still does not exist.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
