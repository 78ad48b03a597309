"""Issue 16.2: rank-deficient weights (a kind): finite factors exact up to the rank, no NaN in the
allocator, every allocator loop ends.

Members: zero rows (a pruned slice, the issue's input), zero columns, duplicated rows, an
all-zero weight, a product of rank 8; for every --method, both allocations, latent K/V or not.
"""

from __future__ import annotations

import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import run_cli

from asvd2gguf.allocate import RankCandidates, allocate
from asvd2gguf.analysis import LinearInfo
from asvd2gguf.decompose import factorize
from asvd2gguf.errors import UserError
from asvd2gguf.gguf_read import describe_gguf, load_gguf_model
from asvd2gguf.ranks import candidates
from asvd2gguf.sensitivity import tail_curves

METHODS = ("svd", "asvd", "whiten", "kfac")  # hybrid = kfac for K/V + whiten for the rest


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: the issue's input looped forever in the allocator."""
    def expired(*_):
        raise TimeoutError(f"did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _deficient(kind: str, m: int, n: int, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    if kind == "zero_rows":
        w[: m // 4] = 0
    elif kind == "zero_cols":
        w[:, : n // 3] = 0
    elif kind == "dup_rows":
        w[m // 2:] = w[: m - m // 2]
    elif kind == "all_zero":
        w.zero_()
    elif kind == "rank8":
        w = w[:, :8] @ torch.randn(8, n, generator=g, dtype=torch.float64)
    return w


@pytest.mark.parametrize("shape", [(64, 96), (96, 64)])
@pytest.mark.parametrize("kind", ["zero_rows", "zero_cols", "dup_rows", "all_zero", "rank8"])
@pytest.mark.parametrize("method", METHODS)
def test_factors_of_a_rank_deficient_weight_are_finite_and_exact(method, kind, shape):
    m, n = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    go = torch.randn(400, m, generator=g, dtype=torch.float64)
    gx, gg = (x.T @ x / 400).float(), (go.T @ go / 400).float()
    w = _deficient(kind, m, n, g)
    rank = int(torch.linalg.matrix_rank(w))
    f = factorize(w.float(), method, abs_stat=x.abs().mean(0).float(), alpha=0.5, gram=gx, out_gram=gg)
    assert all(bool(torch.isfinite(t).all()) for t in (f.U, f.s, f.Vt))
    scale = max(float(w.norm()), 1.0)
    for r in {max(rank, 1), f.max_rank}:  # exact from the rank on (float32 factors)
        assert float((f.weight(r).double() - w).norm()) / scale < 1e-5, r
    for name, c in tail_curves(f, gx, gg).items():
        assert np.isfinite(c).all() and (np.diff(c) <= 1e-12 * max(c[0], 1)).all(), name
        assert c[-1] == 0 and (c[rank:] <= 1e-9 * max(c[0], 1e-30) + 1e-12).all(), name  # nothing past the rank


# ---------------------------------------------------------------- no NaN reaches the allocator


def _opts(name, cost):
    r = np.array([32, 64, 0])
    return RankCandidates(name, r, np.where(r == 0, 128 * 256, r * 384), np.zeros(3), np.asarray(cost, dtype=float))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_options_refuse_non_finite_costs(bad):
    with pytest.raises(UserError, match="blk.0.attn_v"):
        _opts("blk.0.attn_v", [1.0, bad, 0.0])


def test_non_finite_curve_falls_back_to_the_exact_choice():
    """A linear with NaN curves gets only its exact option (dense; the full-width latent for K/V
    under a latent cache), reported by name, and the allocation still meets the budgets."""
    p = 129
    bad = {k: np.full(p, np.nan) for k in ("fisher", "error", "weight")}
    good = {k: np.linspace(1, 0, p) for k in ("fisher", "error", "weight")}
    infos = [LinearInfo(0, "attn_v", 128, 256, bad), LinearInfo(0, "attn_q", 128, 256, bad),
             LinearInfo(0, "attn_k", 128, 256, good), LinearInfo(0, "ffn_up", 128, 256, good)]
    for latent in (False, True):
        opts, notes = candidates(infos, "fisher", 32, latent)
        assert [o.ranks.tolist() for o in opts[:2]] == [[128] if latent else [0], [0]]
        assert [(f.name, f.reason) for f in notes] == [("blk.0.attn_v", "non-finite fisher sensitivity curve"),
                                                        ("blk.0.attn_q", "non-finite fisher sensitivity curve")]
        assert notes[0].written == ("as the exact full-width latent" if latent else "dense")
        dense = sum(i.m * i.n for i in infos)
        a = allocate(opts, int(0.95 * dense), 192 if latent else 1 << 62)
        assert a.params <= 0.95 * dense


def test_allocator_ends_on_flat_and_tied_costs():
    """Every cost equal (all-zero weights) or ties everywhere: both allocations end and fit."""
    for costs in ([0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [2.0, 1.0, 0.0]):
        opts = [_opts(f"l{i}", costs) for i in range(6)]
        for method in ("lagrange", "strs"):
            with deadline(30):
                a = allocate(opts, 4 * 128 * 256, 1 << 62, method)
            assert a.params <= 4 * 128 * 256


# ---------------------------------------------------------------- the input, end to end


def _edit_weights(src: Path, dst: Path, edits) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    with torch.no_grad():
        edits(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def pruned_v(tiny_models, tmp_path_factory):
    """The issue's input: tiny llama whose layer-0 v_proj has 32 rows set to zero."""
    def edit(sd):
        sd["model.layers.0.self_attn.v_proj.weight"][:32] = 0

    return _edit_weights(tiny_models["llama"], tmp_path_factory.mktemp("pruned") / "llama", edit)


@pytest.fixture(scope="session")
def degenerate(tiny_models, tmp_path_factory):
    """The kind's other members in one model: zero input columns, duplicated rows, an all-zero
    weight, a rank-8 product (K/V among them, so the latent path meets them too)."""
    def edit(sd):
        p = "model.layers.{}.{}.weight"
        sd[p.format(0, "mlp.down_proj")][:, :256] = 0  # zero columns
        q = sd[p.format(0, "self_attn.q_proj")]
        q[128:] = q[:128].clone()  # duplicated rows
        sd[p.format(1, "self_attn.o_proj")].zero_()  # all zero
        k = sd[p.format(1, "self_attn.k_proj")]
        k.copy_(k[:, :8] @ torch.randn(8, k.shape[1], generator=torch.Generator().manual_seed(1)))  # rank 8
        sd[p.format(1, "self_attn.v_proj")].zero_()  # all-zero V under a latent cache

    return _edit_weights(tiny_models["qwen2"], tmp_path_factory.mktemp("degenerate") / "qwen2", edit)


def _convert(model, out, calib_text, cache_dir, capsys, *extra):
    with deadline(600):
        return run_cli(["convert", model, "--ratio", "0.9", "--kv", "0.5", "--calib", calib_text, "--calib-samples",
                        "4", "--calib-seqlen", "64", "--out", out, "--cache-dir", cache_dir, "--device", "cpu",
                        "--outtype", "f32", *extra], capsys)


def _check_file(out: Path, model_dir: Path):
    """Ratios met, every tensor finite, and the file loads and runs to finite logits."""
    info = describe_gguf(out)
    assert info.ratio() <= 0.9 + 1e-9 and info.kv_ratio() <= 0.5 + 1e-9
    model, _, _ = load_gguf_model(out, tokenizer_from=model_dir)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    with torch.no_grad():
        assert bool(torch.isfinite(model(input_ids=torch.arange(3, 67)[None]).logits).all())
    return info


@pytest.mark.parametrize("extra", [("--method", "kfac"), ("--method", "hybrid"), ("--allocation", "strs")],
                         ids=["kfac", "hybrid", "strs"])
def test_pruned_v_proj_converts(extra, pruned_v, calib_text, cache_dir, tmp_path, capsys):
    """The issue's input: kfac and hybrid hung, --allocation strs crashed with an IndexError."""
    out = tmp_path / "o.gguf"
    code, _, err = _convert(pruned_v, out, calib_text, cache_dir, capsys, *extra)
    assert code == 0, err
    assert "non-finite" not in err  # finite factors: no fallback needed
    info = _check_file(out, pruned_v)
    assert info.ranks["attn_v"][0] > 0  # latent: V factored, and the zero rows stay zero
    model, _, _ = load_gguf_model(out, tokenizer_from=pruned_v, with_tokenizer=False)
    v = model.model.layers[0].self_attn.v_proj
    assert float((v.lr_out.weight[:32] @ v.lr_in.weight).abs().max()) < 1e-6


@pytest.mark.parametrize("method", ["asvd", "svd", "whiten", "kfac", "hybrid"])
def test_degenerate_weights_convert_with_every_method(method, degenerate, calib_text, cache_dir, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    code, _, err = _convert(degenerate, out, calib_text, cache_dir, capsys, "--method", method)
    assert code == 0, err
    assert "non-finite" not in err
    _check_file(out, degenerate)


def test_nan_weight_is_a_one_line_error(tiny_models, calib_text, cache_dir, tmp_path, capsys):
    def edit(sd):
        sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")

    bad = _edit_weights(tiny_models["llama"], tmp_path / "nan", edit)
    code, _, err = _convert(bad, tmp_path / "o.gguf", calib_text, cache_dir, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error:") and "model.layers.1.mlp.up_proj.weight has NaN or inf" in last
    assert "Traceback" not in err
