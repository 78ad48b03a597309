"""Per-linear analysis: the factorization (kept up to the largest useful rank) and its
predicted loss-vs-rank curves, cached on disk one linear per file.

A second `convert` with another --ratio or --kv reads these files and skips calibration,
factorization and sensitivity altogether.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import cache
from .arch import KV_KEYS, LINEARS, get_module
from .calibrate import LayerStats, cached_stats
from .decompose import KV_METHOD, REST_METHOD, Factorization, factorize, whitening_factor
from .errors import UserError
from .placement import materialized
from .ranks import kept_rank
from .sensitivity import tail_curves
from .text import tokens_digest


@dataclass
class LinearInfo:
    """One block linear as the plan sees it: its place, its shape (m out x n in) and its
    predicted loss-increase curves (nats, one entry per rank 0..min(m, n)) per sensitivity."""

    layer: int
    key: str
    m: int  # n_out
    n: int  # n_in
    curves: dict[str, np.ndarray]  # sensitivity kind -> loss increase for ranks 0..p
    note: str = ""

    @property
    def name(self) -> str:
        """blk.<layer>.<key>, as in warnings and the ppl-sweep cache."""
        return f"blk.{self.layer}.{self.key}"

    @property
    def full_rank(self) -> int:
        """min(m, n): the rank of the exact factor pair."""
        return min(self.m, self.n)


class AnalysisStore:
    """The analysis of every block linear, one cache file per linear under `root`: the truncated
    factorization (U (m, k), s (p,), Vt (k, n) with k = ranks.kept_rank) and its curves."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, layer: int, key: str) -> Path:
        """The cache file of one linear."""
        return self.root / f"L{layer:03d}.{key}.pt"

    def has(self, layer: int, key: str) -> bool:
        """Whether the linear's entry exists (entries are written atomically: existing means complete)."""
        return self.path(layer, key).is_file()

    def complete(self, n_layer: int) -> bool:
        """Whether every block linear of `n_layer` layers has its entry."""
        return all(self.has(i, s.key) for i in range(n_layer) for s in LINEARS)

    def compute_layer(
        self, model_layer, i: int, stats: LayerStats, method: str, alpha: float, scaling: str, device
    ) -> None:
        """Factorize and score the linears of layer `i` that have no entry yet.

        `stats`: the layer's calibration statistics; `method` per decompose.METHODS (hybrid: kfac
        for K/V, whiten for the rest); `alpha`, `scaling`: ASVD's activation scaling (arXiv
        2312.05821); `device`: where to compute. Raises UserError for NaN or inf
        weights.
        """
        x_factors: dict[str, tuple] = {}
        for spec in LINEARS:
            if self.has(i, spec.key):
                continue
            lin = get_module(model_layer, spec.module)
            with materialized(lin):  # an offloaded weight is loaded for this linear only
                w = lin.weight.detach().to(device)
            if not bool(torch.isfinite(w).all()):
                raise UserError(f"blk.{i}.{spec.gguf} has NaN or inf weights")
            absstat = (stats.abs_mean if scaling == "abs_mean" else stats.abs_max)[spec.group]
            gx = stats.gram[spec.group].to(device)
            gg = stats.out_gram.get(spec.key)
            m_used = (KV_METHOD if spec.key in KV_KEYS else REST_METHOD).get(method, method)
            if m_used in ("whiten", "kfac") and spec.group not in x_factors:
                x_factors[spec.group] = whitening_factor(gx)
            f = factorize(w, m_used, abs_stat=absstat, alpha=alpha, gram=gx, out_gram=gg,
                          x_factor=x_factors.get(spec.group))
            curves = tail_curves(f, gx, gg.to(device) if gg is not None else None)
            r = kept_rank(spec.key, *w.shape)
            entry = {
                "U": f.U[:, :r].cpu().contiguous(),
                "s": f.s.cpu(),
                "Vt": f.Vt[:r].cpu().contiguous(),
                "curves": {k: torch.from_numpy(v) for k, v in curves.items()},
                "shape": list(w.shape),
                "note": f.fell_back,
            }
            cache.save(entry, self.path(i, spec.key))

    def info(self, layer: int, key: str) -> LinearInfo:
        """The linear's shape and curves (its entry must exist)."""
        e = cache.load(self.path(layer, key))
        m, n = e["shape"]
        return LinearInfo(layer, key, m, n, {k: v.numpy() for k, v in e["curves"].items()}, e["note"])

    def factorization(self, layer: int, key: str) -> Factorization:
        """The linear's truncated factorization (its entry must exist)."""
        e = cache.load(self.path(layer, key))
        return Factorization(e["U"], e["s"], e["Vt"], e["note"])

    def infos(self, n_layer: int) -> list[LinearInfo]:
        """Every block linear's LinearInfo, layer by layer in LINEARS order."""
        return [self.info(i, s.key) for i in range(n_layer) for s in LINEARS]


def analyse(src, runner, tokens: torch.Tensor, cache_dir: Path, method: str, alpha: float, scaling: str,
            progress=None) -> AnalysisStore:
    """Factorizations and predicted loss curves of every block linear, cached under
    <cache_dir>/analysis by model content, calibration tokens, method, alpha and scaling.

    Computes the calibration statistics (calibrate.cached_stats) only when an entry is missing.
    Raises UserError for a non-finite weight or calibration loss.
    """
    store = AnalysisStore(cache_dir / "analysis" / cache.key(src.fingerprint, tokens_digest(tokens), method, alpha,
                                                             scaling, "v3"))
    if store.complete(src.n_layer):
        return store
    stats = cached_stats(src, runner, tokens, cache_dir, progress, need_fisher=True)
    task = progress.add_task(f"factorizing ({method})", total=src.n_layer) if progress else None
    for i, layer in enumerate(runner.layers):
        store.compute_layer(layer, i, stats[i], method, alpha, scaling, runner.block_device(i))
        if progress:
            progress.advance(task)
    return store
