"""The output-factor refit (refit.py) and the cross-Gram factorization (decompose.factorize(cross=)):
closed forms against explicit least squares, and the block-sequential driver on a tiny model."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from asvd2gguf.decompose import factorize
from asvd2gguf.refit import GROUPS, refit_metric, refit_pair, solve_output_factor


def _data(seed: int = 0, t: int = 400, n: int = 24, m: int = 16, noise: float = 0.3):
    """X (t x n) with uneven channel scales, X^ = X + noise (the compressed model's inputs), W (m x n)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g, dtype=torch.float64) * torch.logspace(0, 1, n, dtype=torch.float64)
    xh = x + noise * torch.randn(t, n, generator=g, dtype=torch.float64) * x.std(0)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    return x, xh, w


def test_output_factor_is_the_least_squares_solution():
    x, xh, w = _data()
    b = torch.randn(6, x.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = solve_output_factor(w, b, xh.T @ xh, xh.T @ x, damp=0.0).double()
    ref = torch.linalg.lstsq(xh @ b.T, x @ w.T).solution.T  # min ||X^ B^T A^T - X W^T||
    torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5)
    assert a.shape == (w.shape[0], b.shape[0]) and a.dtype == torch.float64


def test_prior_keeps_factors_that_are_already_exact():
    """X^ = X and A0 B = W: the ridge towards A0 returns A0 whatever the damping."""
    x, _, _ = _data()
    g = torch.Generator().manual_seed(2)
    a0, b = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randn(6, 24, generator=g, dtype=torch.float64)
    for damp in (0.0, 0.01, 1.0):
        a = solve_output_factor(a0 @ b, b, x.T @ x, x.T @ x, damp=damp, prior=a0)
        torch.testing.assert_close(a.double(), a0, rtol=1e-4, atol=1e-5)


def test_damping_without_prior_shrinks_towards_zero():
    x, xh, w = _data()
    b = torch.randn(6, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    c, d = xh.T @ xh, xh.T @ x
    norms = [float(solve_output_factor(w, b, c, d, damp=k).norm()) for k in (0.0, 0.1, 10.0)]
    assert norms[0] > norms[1] > norms[2]


def _rrr_optimum(x, xh, w, r):
    """Reduced-rank regression by its textbook route: fitted values of the full least squares,
    truncated by SVD (Eckart-Young on X^ M, the columns of X^ spanning the fit)."""
    y = x @ w.T
    m = torch.linalg.lstsq(xh, y).solution  # (n, m)
    fitted = xh @ m
    u, s, vt = torch.linalg.svd(fitted, full_matrices=False)
    return float(((u[:, :r] * s[:r]) @ vt[:r] - y).square().sum())


@pytest.mark.parametrize("method", ["whiten", "kfac"])
def test_cross_factorization_is_reduced_rank_regression(method):
    """With cross = X^^T X the rank-r factors reach the reduced-rank regression optimum of the original
    outputs on the compressed inputs (kfac with a scalar output Gram: the same problem)."""
    x, xh, w = _data(noise=0.5)
    t = x.shape[0]
    c, d = xh.T @ xh / t, xh.T @ x / t
    out_gram = torch.eye(w.shape[0], dtype=torch.float64) if method == "kfac" else None
    for r in (2, 5, 9):
        a, b = factorize(w, method, gram=c, cross=d, out_gram=out_gram).factors(r)
        got = float((xh @ (a.double() @ b.double()).T - x @ w.T).square().sum())
        assert got == pytest.approx(_rrr_optimum(x, xh, w, r), rel=1e-3)
        # the plain factorization (no cross term) is worse on this objective
        a0, b0 = factorize(w, method, gram=c, out_gram=out_gram).factors(r)
        assert float((xh @ (a0.double() @ b0.double()).T - x @ w.T).square().sum()) > got


def test_cross_equal_to_gram_is_the_plain_factorization():
    x, _, w = _data()
    c = x.T @ x / x.shape[0]
    f0, f1 = factorize(w, "whiten", gram=c), factorize(w, "whiten", gram=c, cross=c)
    torch.testing.assert_close(f1.weight(7), f0.weight(7), rtol=1e-4, atol=1e-4)


def test_rank_deficient_compressed_inputs_keep_the_factors_bounded():
    """attn_output after a low-rank V reads inputs in a subspace: the ridge keeps B's weight out of
    the directions they never take, and the fit stays close to the reduced-rank optimum."""
    x, _, w = _data(noise=0.0, t=400, n=24)
    g = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(24, 16, generator=g, dtype=torch.float64)).Q
    xh = x @ basis @ basis.T  # compressed inputs span 16 of 24 directions
    t = x.shape[0]
    c, d = xh.T @ xh / t, xh.T @ x / t
    a, b = refit_pair(w, c, d, 6)
    a0, b0 = factorize(w, "whiten", gram=x.T @ x / t).factors(6)
    assert float(b.abs().max()) < 10 * float(b0.abs().max()) and float(a.abs().max()) < 10 * float(a0.abs().max())
    null = torch.eye(24, dtype=torch.float64) - basis @ basis.T
    assert float((b.double() @ null).norm()) < 1e-3 * float(b.norm())  # no weight outside the inputs' span
    got = float((xh @ (a.double() @ b.double()).T - x @ w.T).square().sum())
    assert got <= 1.05 * _rrr_optimum(x, xh, w, 6)


def test_groups_follow_the_forward_order():
    assert GROUPS == [("attn_in", ["attn_q", "attn_k", "attn_v"]), ("attn_out_in", ["attn_output"]),
                      ("mlp_in", ["ffn_gate", "ffn_up"]), ("down_in", ["ffn_down"])]


def test_refit_metric_per_method():
    assert refit_metric("hybrid", "attn_k") == "kfac" and refit_metric("hybrid", "ffn_up") == "whiten"
    assert refit_metric("kfac", "attn_q") == "kfac" and refit_metric("whiten", "attn_v") == "whiten"
    assert refit_metric("asvd", "attn_v") == "whiten" and refit_metric("svd", "ffn_down") == "whiten"


def _convert(model, out, calib, cache, **kw):
    from asvd2gguf.convert import ConvertConfig, convert

    return convert(ConvertConfig(model=str(model), out=out, calib=str(calib), calib_samples=4, calib_seqlen=64,
                                 cache_dir=cache, outtype="f32", device="cpu", **kw))


@pytest.mark.parametrize(("arch", "pair"), [("llama", False), ("qwen3", True)])
def test_refit_end_to_end(arch, pair, tiny_models, calib_text, cache_dir, tmp_path, monkeypatch):
    """The same plan with and without the refit: same ranks and tensor bytes, other factors (A only
    below refit.PAIR_TOKENS, A and B above), the refit's windows named in asvd.refit, dense tensors
    untouched, and a file that scores its calibration as the pipeline said."""
    from asvd2gguf import refit
    from asvd2gguf.gguf_keys import KEY_REFIT
    from asvd2gguf.gguf_read import describe_gguf, load_gguf_model
    from asvd2gguf.perplexity import mean_loss
    from asvd2gguf.text import calibration_windows

    if pair:
        monkeypatch.setattr(refit, "PAIR_TOKENS", 2048)
    plain, fitted = tmp_path / "plain.gguf", tmp_path / "refit.gguf"
    r0 = _convert(tiny_models[arch], plain, calib_text, cache_dir, ratio=0.6, kv=0.75, refit_tokens=0)
    r1 = _convert(tiny_models[arch], fitted, calib_text, cache_dir, ratio=0.6, kv=0.75, refit_tokens=2048)
    i0, i1 = describe_gguf(plain), describe_gguf(fitted)
    assert i0.ranks == i1.ranks
    assert i0.meta[KEY_REFIT] == ""
    assert i1.meta[KEY_REFIT] == "calib.txt, 32 x 64 tokens, seed 233"  # 2048 tokens in 64-token windows

    t0 = {t.name: t.data for t in gguf.GGUFReader(plain).tensors}
    t1 = {t.name: t.data for t in gguf.GGUFReader(fitted).tensors}
    outs, ins = [n for n in t0 if ".lr_out." in n], [n for n in t0 if ".lr_in." in n]
    assert outs and all(t0[n].shape == t1[n].shape and t0[n].nbytes == t1[n].nbytes for n in outs + ins)
    assert all(not np.array_equal(t0[n], t1[n]) for n in outs)  # every output factor refitted
    assert all(np.array_equal(t0[n], t1[n]) != pair for n in ins)  # input factors: only as pairs
    rest = [n for n in t0 if ".lr_" not in n]
    assert all(np.array_equal(t0[n], t1[n]) for n in rest)  # dense tensors untouched

    model, tok, _ = load_gguf_model(fitted, tokenizer_from=tiny_models[arch])
    windows = calibration_windows(tok, str(calib_text), 4, 64, 233)
    assert np.exp(mean_loss(model, windows)) == pytest.approx(r1.calib_ppl, rel=1e-3)
    assert r1.calib_ppl != pytest.approx(r0.calib_ppl, rel=1e-6)


def test_refit_tokens_must_not_be_negative(tiny_models, calib_text, cache_dir, tmp_path):
    from asvd2gguf.errors import UserError

    with pytest.raises(UserError, match="--refit-tokens"):
        _convert(tiny_models["llama"], tmp_path / "x.gguf", calib_text, cache_dir, ratio=0.6, refit_tokens=-1)
    assert not (tmp_path / "x.gguf").exists()


def test_refit_says_what_it_refitted(tiny_models, calib_text, cache_dir, tmp_path, capsys):
    """A request larger than the text: the stage line names the mode (output factors only below
    PAIR_TOKENS) and that the text ran out; the file records the windows read."""
    from clitools import run_cli

    from asvd2gguf.gguf_keys import KEY_REFIT
    from asvd2gguf.gguf_read import describe_gguf

    out = tmp_path / "r.gguf"
    code, stdout, err = run_cli(["convert", tiny_models["llama"], "--calib", calib_text, "--calib-samples", "4",
                                 "--calib-seqlen", "64", "--ratio", "0.6", "--out", out, "--cache-dir", cache_dir,
                                 "--device", "cpu", "--refit-tokens", "1000000"], capsys)
    assert code == 0, err
    text = " ".join((stdout + err).split())  # stage lines go to stderr; rich may wrap them
    assert "refitted the output factors of" in text and "the text holds" in text
    windows = int(describe_gguf(out).meta[KEY_REFIT].split(", ")[1].split(" x ")[0])
    assert 4 < windows * 64 < 16384  # all the synthetic text holds, far below the request
