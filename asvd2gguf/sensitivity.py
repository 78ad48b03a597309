"""How much the calibration loss grows when one linear is truncated to rank r.

Two estimators feed the same allocator:

* `fisher` (default): a second-order (K-FAC) prediction. With E[x x^T] = Gx and the output
  gradient Gram E[g g^T] = Gg, truncating W to W_r changes the mean loss by about
  0.5 tr(dW^T Gg dW Gx). With dW = sum_{i>=r} s_i u_i vt_i this is the tail sum of
  C = (s s^T) * (U^T Gg U) * (Vt Gx Vt^T), so one p x p matrix gives every rank at once,
  seconds per model instead of hours.
* `ppl`: the paper's exact sweep, the calibration loss with only that linear truncated, for a
  grid of ranks (interpolated in between). Only the blocks from the changed one onwards are
  re-run, from cached block inputs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import cache
from .blocks import BlockRunner
from .decompose import Factorization
from .ranks import sweep_grid
from .text import tokens_digest

if TYPE_CHECKING:
    from .analysis import AnalysisStore, LinearInfo

SENSITIVITIES = ("fisher", "ppl", "error")


def tail_curves(f: Factorization, gx: torch.Tensor, gg: torch.Tensor | None) -> dict[str, np.ndarray]:
    """Predicted loss increase for every rank 0..p (entry p is 0: nothing truncated).

    `error` is the plain output error 0.5 ||dW X||^2 / T (U^T U = I leaves only a diagonal);
    `fisher` weighs it by the output-gradient Gram. The p x p products run in float32 (they
    dominate the analysis time on CPU); the tail sums accumulate in float64.

    `weight` is 0.5 sum_{i>=r} s_i^2 ||u_i||^2 ||vt_i||^2, the weight's own truncation error
    ||dW||_F^2 / 2 (exact when U or V is orthonormal, its diagonal part for kfac). It is no loss
    estimate but it falls with rank for every direction of a non-zero weight, also for those the
    calibration never excited: past the rank of X^T X (fewer tokens than input channels) the
    whitened curves are exactly 0 and only this one still orders the directions (tie-break).
    """
    s = f.s.double()
    dt = torch.float32
    vt = f.Vt.to(dt)
    t2 = (vt @ gx.to(dt) @ vt.T).double()
    norms = f.U.double().norm(dim=0) ** 2 * f.Vt.double().norm(dim=1) ** 2
    out = {"error": _tail(torch.diag(s * s * t2.diagonal())), "weight": _tail(torch.diag(s * s * norms))}
    if gg is not None:
        u = f.U.to(dt)
        t1 = (u.T @ (gg.to(dt) @ u)).double()
        out["fisher"] = _tail(torch.outer(s, s) * t1 * t2)
    return out


def _tail(c: torch.Tensor) -> np.ndarray:
    d = c.flip(0, 1).cumsum(0).cumsum(1).flip(0, 1)
    tail = torch.cat([d.diagonal(), torch.zeros(1, dtype=d.dtype, device=d.device)])
    return (0.5 * tail).clamp_min(0).cpu().numpy()


def tail_curve(f: Factorization, gx: torch.Tensor, gg: torch.Tensor | None) -> np.ndarray:
    """One curve: `fisher` when the gradient Gram is given, else `error`."""
    c = tail_curves(f, gx, gg)
    return c["fisher"] if gg is not None else c["error"]


def ppl_curve(
    runner: BlockRunner, layer_idx: int, key: str, f: Factorization, hidden_in: torch.Tensor,
    tokens: torch.Tensor, base_loss: float, ranks: list[int],
) -> dict[int, float]:
    """Exact loss increase (nats, mean over `tokens`) at each rank in `ranks` with only this linear
    truncated, re-running blocks layer_idx..end from `hidden_in` (the block's cached input,
    (n, seqlen, hidden)); `base_loss`: the untruncated loss. The ASVD paper's sensitivity
    (arXiv 2312.05821, STRS), measured instead of predicted."""
    out = {}
    for r in ranks:
        with runner.trial(layer_idx, {key: f.factors(r)}) as trial:
            h = runner.run_block(layer_idx, hidden_in, trial)
        out[r] = runner.forward_from(layer_idx + 1, h, tokens) - base_loss
    return out


def interpolate(points: dict[int, float], p: int) -> np.ndarray:
    """A full 0..p curve from a sparse grid: linear in rank, 0 at full rank, non-increasing."""
    rs = sorted(points)
    xs = np.array(rs + ([p] if p not in points else []), dtype=float)
    ys = np.array([points[r] for r in rs] + ([0.0] if p not in points else []), dtype=float)
    curve = np.interp(np.arange(p + 1), xs, ys, left=ys[0])
    return np.maximum.accumulate(curve[::-1])[::-1]  # more rank never costs more


def ppl_sensitivity(src, runner: BlockRunner, tokens: torch.Tensor, store: AnalysisStore, infos: list[LinearInfo],
                    *, cache_dir: Path, method: str, alpha: float, scaling: str, rank_align: int,
                    sweep_samples: int, progress=None) -> list[LinearInfo]:
    """The paper's exact sweep (ASVD, arXiv 2312.05821, STRS): `infos` with a "ppl" curve
    added, measured over the first `sweep_samples` calibration windows at ranks.sweep_grid and
    interpolated; cached per linear under <cache_dir>/sens_ppl. Returns new LinearInfo objects.
    """
    toks = tokens[:sweep_samples]
    root = cache_dir / "sens_ppl" / cache.key(src.fingerprint, tokens_digest(toks), method, alpha, scaling, rank_align,
                                              "v2")
    todo = [info for info in infos if cache.load(root / f"{info.name}.pt") is None]
    if todo:
        hidden = [runner.embed(toks)]
        for i in range(src.n_layer):
            hidden.append(runner.run_block(i, hidden[-1]))
        base = float(runner.loss(hidden[-1], toks).mean())
        task = progress.add_task("sensitivity sweep (exact)", total=len(todo)) if progress else None
        for info in todo:
            pts = ppl_curve(runner, info.layer, info.key, store.factorization(info.layer, info.key), hidden[info.layer],
                            toks, base, sweep_grid(info, rank_align))
            cache.save({str(k): v for k, v in pts.items()}, root / f"{info.name}.pt")
            if progress:
                progress.advance(task)
    out = []
    for info in infos:
        pts = {int(k): float(v) for k, v in cache.load(root / f"{info.name}.pt").items()}
        out.append(replace(info, curves={**info.curves, "ppl": interpolate(pts, info.full_rank)}))
    return out
