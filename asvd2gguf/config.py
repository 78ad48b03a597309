"""The options of `convert` and their defaults: the one place a default lives.

Torch-free, so the command line reads its defaults (and `--help` shows them) without loading
the pipeline; asvd2gguf.convert re-exports ConvertConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

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
    sigma_split: str = "uv"
    dense: bool = False
    device: str = "auto"
    device_map: str | None = None  # accelerate device_map: a strategy name or a JSON file (placement.py)
    max_memory: str | None = None  # "0=20GiB,cpu=60GiB": accelerate's max_memory for a named strategy
    cache_dir: Path = field(default_factory=cache_root)  # ASVD2GGUF_CACHE or ~/.cache/asvd2gguf

    def resolved(self) -> ConvertConfig:
        """This configuration with the defaults that depend on other options filled in, as a new
        object (--ratio DEFAULT_RATIO when neither --ratio nor --ppl-target is given)."""
        if self.ratio is None and self.ppl_target is None:
            return replace(self, ratio=DEFAULT_RATIO)
        return self


DEFAULTS = ConvertConfig(model="")
