"""Helpers for tests that run the patched llama.cpp tools on small GGUF files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from asvd2gguf import llamacpp


def ppl(model: Path, text: Path, **kw) -> dict:
    """llamacpp.perplexity with the small defaults of these tests (3 chunks of 128 tokens)."""
    kw.setdefault("ctx", 128)
    kw.setdefault("chunks", 3)
    return llamacpp.perplexity(model, text, **kw)


def kld_base(model: Path, text: Path, base: Path, env: dict, *extra: str) -> Path:
    """Write llama-perplexity's logits of `model` (3 x 128 tokens) under `env` to `base`: a KLD reference."""
    subprocess.run([str(llamacpp.binary("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", "128",
                    "--chunks", "3", "--kl-divergence-base", str(base), *extra], check=True, capture_output=True,
                   env=dict(os.environ, **env), timeout=300)
    return base


def complete(model: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Greedy llama-completion with debug logging; with check, fails the test on a non-zero exit."""
    res = subprocess.run([str(llamacpp.binary("llama-completion")), "-m", str(model), "--ignore-eos", "-no-cnv",
                          "--temp", "0", "-s", "1", "-t", "2", "--no-warmup", "-v", *args], capture_output=True,
                         text=True, errors="replace", timeout=600, env=dict(os.environ, **(env or {})))
    if check:
        assert res.returncode == 0, res.stderr[-2000:]
    return res
