"""Numerics of the factorizations, the loss predictor and the rank allocator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asvd2gguf.allocate import RankCandidates, Unreachable, allocate
from asvd2gguf.decompose import asvd_scale, factorize, whitening_factor
from asvd2gguf.ranks import break_even_rank
from asvd2gguf.sensitivity import interpolate, tail_curve


def _data(m=48, n=40, t=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(t, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    return w, x


@pytest.mark.parametrize("r", [1, 8, 20, 40])
def test_asvd_factors_equal_truncated_scaled_svd(r):
    w, x = _data()
    stat = x.abs().mean(0)
    f = factorize(w, "asvd", abs_stat=stat, alpha=0.5)
    a, b = f.factors(r)
    assert a.shape == (48, r) and b.shape == (r, 40)
    s = stat.sqrt()
    u, sig, vt = torch.linalg.svd(w * s, full_matrices=False)
    ref = (u[:, :r] * sig[:r]) @ vt[:r] / s
    assert torch.allclose((a @ b).double(), ref, atol=1e-4, rtol=1e-4)
    # sqrt(Sigma) is split into both factors: their column/row norms match
    assert torch.allclose(a.norm(dim=0), b.double().mul(s).norm(dim=1).float(), rtol=1e-3)


def test_full_rank_reconstructs_every_method():
    w, x = _data()
    for method in ("svd", "asvd", "whiten"):
        f = factorize(w, method, abs_stat=x.abs().mean(0), alpha=0.5, gram=x.T @ x / len(x))
        assert torch.allclose(f.weight(f.max_rank).double(), w, atol=1e-4), method


def test_svd_method_is_optimal_in_frobenius_norm():
    w, _ = _data()
    f = factorize(w, "svd")
    sig = torch.linalg.svdvals(w)
    err = (w - f.weight(10).double()).norm()
    assert abs(float(err) - float(sig[10:].norm())) < 1e-4


def test_whitening_minimises_output_error():
    w, x = _data()
    fw = factorize(w, "whiten", gram=x.T @ x)
    fa = factorize(w, "asvd", abs_stat=x.abs().mean(0), alpha=0.5)
    fs = factorize(w, "svd")
    errs = {k: float(((w - f.weight(12).double()) @ x.T).norm()) for k, f in (("w", fw), ("a", fa), ("s", fs))}
    assert errs["w"] <= errs["a"] + 1e-6 and errs["w"] <= errs["s"] + 1e-6


def test_whitening_survives_singular_gram():
    w, x = _data(t=10)  # 10 tokens for 40 channels: X^T X has rank 10
    x[:, 3] = 0  # a dead channel
    lo, _, note = whitening_factor(x.T @ x)
    assert torch.isfinite(lo).all() and note
    f = factorize(w, "whiten", gram=x.T @ x)
    assert torch.isfinite(f.U).all() and torch.isfinite(f.Vt).all()


def test_asvd_scale_floors_dead_channels():
    s = asvd_scale(torch.tensor([0.0, 1.0, 4.0]), 0.5)
    assert (s > 0).all() and s[2] == 2.0


def test_tail_curve_matches_brute_force_second_order_term():
    w, x = _data()
    g = torch.randn(300, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gx, gg = x.T @ x / 300, g.T @ g / 300
    f = factorize(w, "asvd", abs_stat=x.abs().mean(0), alpha=0.5)
    curve = tail_curve(f, gx, gg)
    assert curve.shape == (41,) and curve[-1] == pytest.approx(0, abs=1e-8)
    for r in (0, 5, 17, 39):
        dw = w - f.weight(r).double() if r else w
        ref = 0.5 * torch.trace(dw.T @ gg @ dw @ gx)
        assert curve[r] == pytest.approx(float(ref), rel=1e-4)
    err = tail_curve(f, gx, None)
    dw = w - f.weight(7).double()
    assert err[7] == pytest.approx(float(0.5 * torch.trace(dw @ gx @ dw.T)), rel=1e-4)


def test_interpolate_is_monotone_and_zero_at_full_rank():
    c = interpolate({8: 3.0, 16: 4.0, 24: 1.0}, 32)  # a noisy, non-monotone sweep
    assert c[32] == 0 and all(c[i] >= c[i + 1] for i in range(32))
    assert c[8] == 4.0 and c[24] == 1.0


def _random_opts(n_lin=12, seed=0, kv=False):
    rng = np.random.default_rng(seed)
    opts = []
    for i in range(n_lin):
        m, n = int(rng.integers(64, 256)), int(rng.integers(64, 256))
        ranks = np.arange(8, break_even_rank(m, n) + 1, 8)
        sens = rng.uniform(0.1, 5)
        cost = sens * np.exp(-ranks / rng.uniform(10, 60))
        is_kv = kv and i % 3 == 0
        r = ranks if is_kv else np.append(ranks, 0)
        params = np.where(r == 0, m * n, r * (m + n))
        c = np.append(cost, 0.0) if not is_kv else cost
        opts.append(RankCandidates(f"l{i}", r, params, r if is_kv else np.zeros_like(r), c))
    return opts


@pytest.mark.parametrize("method", ["lagrange", "strs"])
def test_allocation_meets_budget_and_is_monotone(method):
    opts = _random_opts()
    dense = sum(int(o.params.max()) for o in opts)
    prev_cost = None
    for frac in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        a = allocate(opts, int(frac * dense), 1 << 62, method)
        assert a.params <= frac * dense
        if prev_cost is not None:
            assert a.cost <= prev_cost + 1e-12  # more budget never predicts a worse model
        prev_cost = a.cost
    assert allocate(opts, dense, 1 << 62, method).cost == 0


def test_lagrange_beats_or_ties_threshold_search():
    for seed in range(5):
        opts = _random_opts(seed=seed)
        dense = sum(int(o.params.max()) for o in opts)
        lg = allocate(opts, int(0.7 * dense), 1 << 62, "lagrange")
        st = allocate(opts, int(0.7 * dense), 1 << 62, "strs")
        assert lg.cost <= st.cost + 1e-9


def test_kv_width_budget_is_met():
    opts = _random_opts(kv=True)
    full = sum(int(o.width.max()) for o in opts)
    a = allocate(opts, 1 << 62, int(0.5 * full), "lagrange")
    assert a.width <= 0.5 * full


def test_flat_measured_curves_still_fill_the_budget():
    """A sweep flat at zero (truncation under the calibration noise) must not leave budget unspent."""
    from asvd2gguf.ranks import tie_broken

    rng = np.random.default_rng(1)
    m, n = 192, 256
    r = np.append(np.arange(8, break_even_rank(m, n) + 1, 8), 0)
    params = np.where(r == 0, m * n, r * (m + n))
    full = min(m, n)
    curve = np.maximum(0.0, 1.0 - np.arange(full + 1) / 40)  # zero from rank 40 on

    def options(i, c):
        return RankCandidates(f"l{i}", r, params, np.zeros_like(r), np.array([c[x] if x else 0.0 for x in r]))

    raw, tie = [], []
    for i in range(10):
        error = np.cumsum(rng.uniform(0.1, 1, full + 1)[::-1])[::-1]  # falls with rank
        error[-1] = 0
        raw.append(options(i, curve))
        tie.append(options(i, tie_broken(curve, error)))
    budget = int(0.6 * sum(int(o.params.max()) for o in raw))
    step = 8 * (m + n)
    assert allocate(raw, budget, 1 << 62).params < budget - 10 * step  # the flaw: budget left unspent
    a = allocate(tie, budget, 1 << 62)
    assert budget - step < a.params <= budget


def test_unreachable_reports_minimum():
    opts = _random_opts()
    with pytest.raises(Unreachable) as e:
        allocate(opts, 10, 1 << 62, "lagrange")
    assert e.value.min_params == sum(int(o.params.min()) for o in opts)


def test_kfac_minimises_the_predicted_loss():
    w, x = _data()
    g = torch.randn(300, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * torch.linspace(
        0.1, 2, 48, dtype=torch.float64)
    gx, gg = x.T @ x / 300, g.T @ g / 300
    preds = {}
    for method in ("asvd", "whiten", "kfac"):
        f = factorize(w, method, abs_stat=x.abs().mean(0), alpha=0.5, gram=gx, out_gram=gg)
        assert torch.allclose(f.weight(f.max_rank).double(), w, atol=1e-3), method
        preds[method] = tail_curve(f, gx, gg + 1e-2 * gg.diagonal().mean() * torch.eye(48, dtype=gg.dtype))[12]
    assert preds["kfac"] <= preds["whiten"] + 1e-9 and preds["kfac"] <= preds["asvd"] + 1e-9


def test_llama_windows_and_second_half_scoring(tmp_path):
    from asvd2gguf.perplexity import mean_loss
    from asvd2gguf.text import llama_windows

    class Tok:
        def __call__(self, text, return_attention_mask=False):
            return {"input_ids": [ord(c) % 50 + 2 for c in text]}

    p = tmp_path / "t.txt"
    p.write_text("abcdefghij" * 10)
    w = llama_windows(Tok(), p, 16, 3, add_bos=True, bos_id=1)
    assert w.shape == (3, 16) and (w[:, 0] == 1).all()
    w2 = llama_windows(Tok(), p, 16, None, add_bos=False, bos_id=1)
    assert w2.shape == (6, 16) and (w2[:, 0] != 1).all()

    class Uniform(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):
            logits = torch.zeros(*input_ids.shape, 64)
            logits[:, : input_ids.shape[1] // 2, 0] = 100.0  # confident and wrong in the first half
            return type("O", (), {"logits": logits})()

    assert mean_loss(Uniform(), w, first=8) == pytest.approx(np.log(64), rel=1e-6)
    assert mean_loss(Uniform(), w) > np.log(64)
