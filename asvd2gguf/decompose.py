"""Low-rank factorizations of one weight matrix: plain SVD, ASVD and SVD-LLM whitening.

Every method computes W T = U Sigma V^T for some invertible T (identity, a diagonal activation
scaling, or a Cholesky factor of X^T X) and folds T back into V:

    W ~= U_r Sigma_r V_r^T T^-1,   A = U_r Sigma_r^1/2,   B = Sigma_r^1/2 V_r^T T^-1

so the truncation error is small where the activations are large. sqrt(Sigma) goes into both
factors, which the ASVD paper shows is best for quantizing them later.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

METHODS = ("asvd", "svd", "whiten", "kfac", "hybrid")
KV_METHOD = {"hybrid": "kfac"}  # per-method override for k_proj/v_proj
REST_METHOD = {"hybrid": "whiten"}
KFAC_DAMPING = 1e-2  # relative damping of the output-gradient Gram: unseen output directions still count
SCALINGS = ("abs_mean", "abs_max")


@dataclass
class Factorization:
    """W ~= U diag(s) Vt for one weight W (m, n), p = min(m, n) or fewer columns kept: the
    activation-aware SVD of W T with T folded back into Vt (ASVD, arXiv 2312.05821, or the
    whitened variants; see the module docstring)."""

    U: torch.Tensor  # (m, p)
    s: torch.Tensor  # (p,) singular values of W T, descending
    Vt: torch.Tensor  # (p, n): V^T T^-1, so that W = U diag(s) Vt
    fell_back: str = ""  # why a robust fallback was taken, for the log

    @property
    def max_rank(self) -> int:
        """Singular values held (p)."""
        return self.s.shape[0]

    def factors(self, r: int, split: str = "uv") -> tuple[torch.Tensor, torch.Tensor]:
        """A (m, r) and B (r, n); Sigma goes half into each ("uv"), or all into A ("u") or B ("v").

        The product is the same; the split decides how well each factor quantizes (the paper's
        Table 6: "uv" is best, since both factors then have comparable row scales).
        """
        s = self.s[:r].to(self.U.dtype)
        if split == "u":
            return self.U[:, :r] * s, self.Vt[:r].clone()
        if split == "v":
            return self.U[:, :r].clone(), s[:, None] * self.Vt[:r]
        root = s.sqrt()
        return self.U[:, :r] * root, root[:, None] * self.Vt[:r]

    def weight(self, r: int) -> torch.Tensor:
        """The rank-r approximation A @ B, (m, n)."""
        a, b = self.factors(r)
        return a @ b


@contextmanager
def lapack_threads(n: int = 1):
    """Run LAPACK calls single-threaded on the CPU.

    MKL's multi-threaded eigh/cholesky collapse when the cores are shared (20x slower for a
    576 x 576 eigh with 2 threads on a busy 2-core machine, 0.27 s with one); matmuls keep all
    threads.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


GRAM_SVD_RTOL = 1e-6  # smallest s_min / s_max the Gram route computes left vectors for


def _svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (float64): U (rows, p) and V^T (p, cols) orthonormal, s (p,) descending, p = min shape.

    Through the eigenproblem of the smaller Gram matrix: on 2 CPU cores this is 4x faster than
    gesdd for our shapes. Squaring the condition number only blurs singular directions below
    ~1e-8 of the largest, which truncation drops anyway; but the left vectors u = M v / s of
    those directions are noise divided by almost nothing (a weight with zero or repeated rows
    or columns, or all zero, has s = 0 up to rounding: u then overflows to inf and every
    factor and cost curve of that linear turns NaN). So a matrix that is numerically rank
    deficient (s_min < GRAM_SVD_RTOL s_max, or s_max = 0) takes LAPACK's SVD, whose U and V
    are orthonormal whatever the rank: its factors are finite and exact up to the rank.
    """
    if m.shape[0] < m.shape[1]:
        u, s, vt = _svd(m.T)
        return vt.T, s, u.T
    g = m.T @ m
    threads = 1 if g.device.type == "cpu" else torch.get_num_threads()
    with lapack_threads(threads):
        e, v = torch.linalg.eigh(g)
    e, v = e.flip(0).clamp_min(0), v.flip(1)
    s = e.sqrt()
    if s.numel() and not bool(s[-1] > GRAM_SVD_RTOL * s[0]):  # also true for s[0] = 0 and for NaN
        with lapack_threads(threads):
            return torch.linalg.svd(m, full_matrices=False)
    u = (m @ v) / s
    return u, s, v.T


def asvd_scale(abs_stat: torch.Tensor, alpha: float) -> torch.Tensor:
    """S = stat^alpha, kept away from zero so that S^-1 stays finite on dead channels."""
    s = abs_stat.double().clamp_min(0) ** alpha
    floor = max(float(s.max()) * 1e-6, 1e-12)
    return s.clamp_min(floor)


def whitening_factor(gram: torch.Tensor) -> tuple[torch.Tensor, bool, str]:
    """L with L L^T ~= X^T X, invertible; returns (L, is_lower_triangular, note).

    X^T X is often singular (dead channels, few tokens): add damping that grows until Cholesky
    succeeds, and as a last resort take a clamped eigendecomposition.
    """
    g = gram.double()
    g = (g + g.T) / 2
    mean_diag = float(g.diagonal().mean().clamp_min(1e-30))
    for damp in (0.0, 1e-8, 1e-6, 1e-4, 1e-2):
        eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        with lapack_threads():
            lo, info = torch.linalg.cholesky_ex(g + damp * mean_diag * eye)
        if int(info) == 0 and bool(torch.isfinite(lo).all()):
            return lo, True, ("" if damp == 0 else f"damping {damp:g}")
    with lapack_threads():
        e, q = torch.linalg.eigh(g)
    e = e.clamp_min(1e-6 * mean_diag)
    return q * e.sqrt(), False, "eigen fallback"


def _right_unwhiten(m: torch.Tensor, lo: torch.Tensor, tri: bool) -> torch.Tensor:
    """m L^-1 (= solve(L^T, m^T)^T): folds a whitening factor back out of the right side."""
    if tri:
        return torch.linalg.solve_triangular(lo.T, m.T, upper=True).T
    return torch.linalg.solve(lo.T, m.T).T


def _whitened(w: torch.Tensor, lo: torch.Tensor, tri: bool, cross) -> torch.Tensor:
    """W L, or with `cross` (X^^T X) the whitened regression target W (L^-1 cross)^T."""
    if cross is None:
        return w @ lo
    cross = cross.to(w.device, w.dtype)
    left = torch.linalg.solve_triangular(lo, cross, upper=False) if tri else torch.linalg.solve(lo, cross)
    return w @ left.T


def factorize(w: torch.Tensor, method: str, *, abs_stat=None, alpha: float = 0.5, gram=None,
              out_gram=None, x_factor=None, cross=None) -> Factorization:
    """Factorize W (m, n) by `method` using the input statistics of its group.

    `kfac` whitens both sides, inputs by chol(X^T X) and outputs by chol(G^T G) of the loss
    gradients: its truncation minimises the K-FAC estimate of the loss increase itself, so for
    k_proj it weighs K errors by how the attention scores actually use them. `x_factor` is a
    precomputed whitening_factor(gram): q, k and v share one input Gram.

    Inputs: `abs_stat` (n,) mean or max |x| per input channel (asvd: ASVD, arXiv 2312.05821),
    `gram` (n, n) X^T X / T (whiten: SVD-LLM, arXiv 2403.07378; kfac), `out_gram` (m, m)
    G^T G / T (kfac). Computes in float64; U, Vt come back float32, s float64, all p = min(m, n)
    wide. Raises ValueError for an unknown method (convert.validate checks it first).

    `cross` (n, n), whiten and kfac only: X^^T X / T, the inputs X^ the linear reads in the
    compressed model against the original ones X, with `gram` = X^^T X^ / T. The factors then
    approximate, in the metric of X^, the map that gives W's original output W x from x^ (the
    least-squares M = W cross^T gram^-1): the SVD of W cross^T L^-T (= M L) in place of W L.
    That is reduced-rank regression (Izenman 1975) of the original outputs on the compressed
    inputs; with X^ = X it is the plain factorization. See refit.py.
    """
    w64 = w.double()
    note = ""
    if method == "svd":
        u, s, vt = _svd(w64)
    elif method == "asvd":
        scale = asvd_scale(abs_stat.to(w64.device), alpha)
        u, s, vt = _svd(w64 * scale)
        vt = vt / scale
    elif method == "whiten":
        lo, tri, note = x_factor or whitening_factor(gram.to(w64.device))
        u, s, vt = _svd(_whitened(w64, lo, tri, cross))
        vt = _right_unwhiten(vt, lo, tri)
    elif method == "kfac":
        lo, tri, note = x_factor or whitening_factor(gram.to(w64.device))
        g = out_gram.to(w64.device).double()
        g = g + KFAC_DAMPING * float(g.diagonal().mean().clamp_min(1e-30)) * torch.eye(g.shape[0], dtype=g.dtype,
                                                                                          device=g.device)
        ro, rtri, note2 = whitening_factor(g)
        u, s, vt = _svd(ro.T @ _whitened(w64, lo, tri, cross))
        u = _right_unwhiten(u.T, ro, rtri).T  # R^-T U
        vt = _right_unwhiten(vt, lo, tri)
        note = ", ".join(x for x in (note, note2) if x)
    else:
        raise ValueError(method)
    return Factorization(u.float(), s, vt.float(), note)

