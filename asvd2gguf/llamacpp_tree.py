"""The pinned llama.cpp tree: fetched once from PyPI, checked by sha256, cached.

llama.cpp 0c1e570 is vendored in the llama-cpp-python 0.3.36 source distribution; PyPI is the
one registry every machine of ours reaches, so that is where the tree comes from.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .atomic import atomic_dir
from .errors import UserError

SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SPEC = "llama-cpp-python==0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
COMMIT = "0c1e570"


def cache_root() -> Path:
    """The cache folder: $ASVD2GGUF_CACHE, else ~/.cache/asvd2gguf (ConvertConfig.cache_dir's default)."""
    return Path(os.environ.get("ASVD2GGUF_CACHE", Path.home() / ".cache" / "asvd2gguf"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sdist_path() -> Path:
    """The verified source archive, downloaded with pip on first use."""
    src = cache_root() / "src"
    path = src / SDIST
    if not path.is_file():
        src.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=src) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST_SPEC, "-d", tmp]
            res = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / SDIST
            if res.returncode != 0 or not got.is_file():
                last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
                raise UserError(f"cannot download {SDIST_SPEC} from PyPI: {last[0]}")
            os.replace(got, path)
    digest = _sha256(path)
    if digest != SDIST_SHA256:
        bad = path.with_suffix(".bad")
        os.replace(path, bad)
        raise UserError(f"{SDIST} has sha256 {digest}, expected {SDIST_SHA256} (moved to {bad.name})")
    return path


def source_tree() -> Path:
    """The unpacked, unpatched llama.cpp tree (read-only use: builds copy it)."""
    dest = cache_root() / "src" / f"llama.cpp-{COMMIT}"
    if (dest / "CMakeLists.txt").is_file():
        return dest
    archive = sdist_path()
    prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    with atomic_dir(dest) as tmp:  # another process may unpack it first; its copy is as good
        with tarfile.open(archive) as tf:
            members = []
            for m in tf.getmembers():
                if m.name.startswith(prefix) and len(m.name) > len(prefix):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            tf.extractall(tmp, members=members, filter="data")
    return dest
