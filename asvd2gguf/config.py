"""The options of `convert` and their defaults: the one place a default lives.

Torch-free, so the command line reads its defaults (and `--help` shows them) without loading
the pipeline; asvd2gguf.convert re-exports ConvertConfig.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import UserError
from .llamacpp_tree import cache_root

DEFAULT_RATIO = 0.9  # when neither --ratio nor --ppl-target is given

# Why the default method is what it is, for --help (the numbers are in docs/results.md).
DEFAULT_METHOD_REASON = (
    "the lowest perplexity measured on SmolLM2 (docs/results.md) at every setting but one (--ratio 0.938 without "
    "--kv: 1.6% behind kfac); e.g. --ratio 0.9 --kv 0.5: hybrid 39.25, kfac 41.33, whiten 43.57, asvd 57.07"
)


@dataclass
class ConvertConfig:
    """Every option of `convert` (one field per --option of the command line, same name), with
    its default. Units: ratio, kv in (0, 1] (kept fraction of block-linear parameters, of K+V
    width); ppl_target a perplexity; calib_samples x calib_seqlen tokens; rank_align in ranks."""

    model: str
    out: Path | None = None
    force: bool = False
    ratio: float | None = None  # with ppl_target also None: DEFAULT_RATIO (resolved)
    ppl_target: float | None = None
    kv: float | None = None
    calib: str | None = None
    calib_samples: int = 32
    calib_seqlen: int = 512
    seed: int = 233
    method: str = "hybrid"  # DEFAULT_METHOD_REASON; "asvd" is the paper's method
    scaling: str = "abs_mean"
    alpha: float = 0.5
    rank_align: int = 32
    sensitivity: str = "fisher"
    sweep_samples: int = 4
    allocation: str = "lagrange"
    outtype: str = "f16"
    quant: str = "none"
    quant_dense: str | None = None
    quant_embd: str | None = None
    size: str | None = None  # --size: the whole file's byte budget, e.g. "95M", "1.2G", "80MiB" (parse_size)
    bpw: float | None = None  # --bpw: bits per weight over all of the original model's weights
    types_only: bool = False  # with --size / --bpw: every block linear stays dense, only types are chosen
    runtime: str | None = None  # with --size / --bpw: the backend whose input rounding is priced (resolved: cpu)
    imatrix_out: Path | None = None  # also write the calibration's imatrix (llama-imatrix's GGUF format)
    sigma_split: str = "uv"
    refit_tokens: int = 32768  # --refit-tokens: tokens the factors are refitted on (refit.py); 0: no refit
    dense: bool = False
    device: str = "auto"
    device_map: str | None = None  # accelerate device_map: a strategy name or a JSON file (placement.py)
    max_memory: str | None = None  # "0=20GiB,cpu=60GiB": accelerate's max_memory for a named strategy
    cache_dir: Path = field(default_factory=cache_root)  # ASVD2GGUF_CACHE or ~/.cache/asvd2gguf

    def resolved(self) -> ConvertConfig:
        """This configuration with the defaults that depend on other options filled in, as a new
        object (--ratio DEFAULT_RATIO when neither --ratio nor --ppl-target is given; a size plan's
        --runtime cpu when none is given)."""
        if self.ratio is None and self.ppl_target is None and self.size is None and self.bpw is None:
            return replace(self, ratio=DEFAULT_RATIO)
        if (self.size is not None or self.bpw is not None) and self.runtime is None:
            return replace(self, runtime="cpu")  # the backend docs/results.md measured
        return self


DEFAULTS = ConvertConfig(model="")


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """A file size as --size takes it -> bytes. A positive number and an optional unit: K, M, G, T
    (and KB, MB, GB, TB) are powers of 1000, KiB, MiB, GiB, TiB powers of 1024 (IEC 80000-13), no
    unit means bytes; case-insensitive, e.g. "95M", "1.2G", "80MiB". Raises UserError (one line
    naming --size) for anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text or "")
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise UserError(f"--size '{text}' is not a size: give a number with an optional unit K, M, G (powers of "
                        "1000) or KiB, MiB, GiB (powers of 1024), e.g. 95M or 80MiB")
    value = float(m.group(1)) * _UNITS[unit]
    if not (math.isfinite(value) and value >= 1):
        raise UserError(f"--size '{text}' must be at least 1 byte and finite")
    return int(value)
