"""Runtime tests: the patched llama.cpp on factored GGUF files (docs/runtime.md).

The binaries come from asvd2gguf.llamacpp.build() (cached; a cold CPU build takes about 8
minutes on 2 cores, then every call is instant). Fixtures are tiny random models of each
architecture plus one real SmolLM2 check, all made locally by tests/gguf_fixtures.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_fixtures as fx  # noqa: E402
from runtime_tools import complete as _complete  # noqa: E402
from runtime_tools import kld_base as _kld_base  # noqa: E402
from runtime_tools import ppl  # noqa: E402

from asvd2gguf import llamacpp  # noqa: E402
from asvd2gguf.errors import UserError  # noqa: E402

TEXT = fx.wikitext_path()
from conftest import ARCHS  # noqa: E402

needs_text = pytest.mark.skipif(not TEXT.is_file(), reason="wiki.test.raw not available")


# ---------------------------------------------------------------- no binaries needed


def test_apply_patches_names_the_failing_patch(tmp_path):
    src = tmp_path / "tree"
    src.mkdir()
    (src / "a.txt").write_text("one\ntwo\n")
    good = tmp_path / "0001-good.patch"
    good.write_text("header\n---\ndiff --git a/a.txt b/a.txt\n--- a/a.txt\n+++ b/a.txt\n"
                    "@@ -1,2 +1,2 @@\n one\n-two\n+three\n")
    bad = tmp_path / "0002-bad.patch"
    bad.write_text("diff --git a/a.txt b/a.txt\n--- a/a.txt\n+++ b/a.txt\n@@ -1,2 +1,2 @@\n one\n-four\n+five\n")
    llamacpp.apply_patches(src, [good])
    assert (src / "a.txt").read_text() == "one\nthree\n"
    with pytest.raises(UserError, match="0002-bad.patch"):
        llamacpp.apply_patches(src, [bad])


def test_series_lists_existing_patches():
    names = [p.name for p in llamacpp._series()]
    assert names and names == sorted(names)


def test_build_key_depends_on_options():
    assert llamacpp.build_key(False) != llamacpp.build_key(True)
    assert llamacpp.build_key(False) == llamacpp.build_key(False)


def test_build_targets_are_checked_before_building(tmp_path):
    """build(targets=...) builds a subset; unknown names fail at once (nothing prepared or run)."""
    with pytest.raises(UserError, match="unknown llama.cpp build target"):
        llamacpp.build(targets=["llama-serve"], prefix=tmp_path)
    with pytest.raises(UserError, match="unknown llama.cpp build target"):
        llamacpp.build(tests=True, targets=["llama-server"], prefix=tmp_path)  # the tests build has no server
    with pytest.raises(UserError, match="need tests=True"):
        llamacpp.build(targets=["test-backend-ops"], prefix=tmp_path)
    assert not any(tmp_path.iterdir())
    assert llamacpp.built(tests=True, targets=["test-backend-ops"], prefix=tmp_path) is None
    cfg, cmd = llamacpp.build_commands(cuda=True, jobs=16, prefix=tmp_path, tests=True,
                                       targets=["llama-perplexity", "test-backend-ops"])
    assert "-DGGML_CUDA=ON" in cfg and "-DLLAMA_BUILD_TESTS=ON" in cfg
    assert cmd[:2] == ["cmake", "--build"] and cmd[3:] == ["-j", "16", "--target", "llama-perplexity",
                                                            "test-backend-ops"]
    assert llamacpp.source_dir(True, True, tmp_path).parent == llamacpp.bin_dir(True, True, tmp_path).parents[1]


def test_parse_perplexity_outputs():
    out = ("llama_kv_cache: size =   45.00 MiB (  512 cells,  30 layers,  1/1 seqs)\n"
           "perplexity: calculating perplexity over 4 chunks, n_ctx=512\n"
           "Final estimate: PPL = 22.4154 +/- 2.22667\n")
    r = llamacpp.parse_perplexity(out)
    assert r == {"ppl": 22.4154, "ppl_err": 2.22667, "chunks": 4, "kv_mib": 45.0}
    kld = ("Mean PPL(Q)                   :  22.410788 ±   2.226280\n"
           "Mean PPL(base)                :  22.360000 ±   2.226280\n"
           "Mean    KLD:   0.000003 ±   0.000001\nMaximum KLD:   0.000056\nSame top p: 99.902 ± 0.050 %\n")
    r = llamacpp.parse_perplexity(kld)
    assert r["ppl"] == pytest.approx(22.410788) and r["kld"] == pytest.approx(3e-6)
    assert r["kld_max"] == pytest.approx(5.6e-5) and r["same_top_p"] == pytest.approx(0.99902)


# ---------------------------------------------------------------- fixtures


# ---------------------------------------------------------------- factored linears


def test_build_is_cached(bins):
    import time
    t = time.time()
    assert llamacpp.build() == bins
    assert time.time() - t < 5
    for tool in llamacpp.TARGETS:
        assert (bins / tool).is_file()


@pytest.mark.parametrize("arch", ARCHS)
def test_factored_equals_dense_twin(tiny, text_small, arch):
    """Test 1: a factored file and the --dense file of the same factors, same binary."""
    a = ppl(tiny[arch]["lr"], text_small)
    b = ppl(tiny[arch]["lr_dense"], text_small)
    c = ppl(tiny[arch]["dense"], text_small)
    assert abs(a["ppl"] / b["ppl"] - 1) < 1e-3
    assert abs(a["ppl"] / c["ppl"] - 1) < 1e-3  # full rank: same model as the original


def test_factored_kld_against_dense(tiny, text_small):
    r = ppl(tiny["llama"]["lr"], text_small, kl_base=tiny["llama"]["lr_dense"])
    assert r["kld"] < 1e-4


def _load_error(bins: Path, model: Path) -> str:
    res = subprocess.run([str(bins / "llama-perplexity"), "-m", str(model), "-f", str(TEXT), "-c", "128",
                          "--chunks", "1"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0, "the loader accepted a bad file"
    return res.stdout + res.stderr


@needs_text
@pytest.mark.parametrize("case, expect", [
    ("lone_factor", "factor 'blk.0.attn_q.lr_in.weight' has no partner 'blk.0.attn_q.lr_out.weight'"),
    ("rank_ab", "rank mismatch: 'blk.1.ffn_up.lr_in.weight'"),
    ("rank_meta", "asvd.rank.attn_v[0]"),
    ("both", "tensor 'blk.0.attn_output.weight' is stored both dense and factored"),
    ("latent_dense_k", "asvd.kv.latent is set but 'blk.0.attn_k' is not factored"),
])
def test_loader_refuses_bad_files(bins, tmp_path, case, expect):
    src = fx.write_tiny("llama", tmp_path / "base.gguf")
    kw: dict = {"outtype": "f32"}
    if case == "lone_factor":
        kw["drop"] = ["blk.0.attn_q.lr_out.weight"]
    elif case == "rank_ab":
        def tamper(t):
            t["blk.1.ffn_up.lr_out.weight"] = t["blk.1.ffn_up.lr_out.weight"][:, :-1].copy()
        kw["tamper"] = tamper
    elif case == "rank_meta":
        kw["extra_kv"] = {"asvd.rank.attn_v": [7, 64]}
    elif case == "both":
        def tamper(t):
            t["blk.0.attn_output.weight"] = np.zeros((128, 128), np.float32)
        kw["tamper"] = tamper
    elif case == "latent_dense_k":
        kw.update(linears=("attn_v",), kv_latent=True)
    bad = fx.write_factored(src, tmp_path / f"{case}.gguf", **kw)
    assert expect in _load_error(bins, bad)


def test_stock_gguf_unchanged(text_small):
    """The stock Q4_1 SmolLM2 runs through the patched binary (its numbers are in docs)."""
    r = ppl(fx.smollm2_path(), text_small, ctx=256, chunks=2)
    assert 5 < r["ppl"] < 100


def test_smollm2_partly_factored_equals_dense(tmp_path, text_small):
    """Test 5, the real model once: all seven linears of layer 0 factored at full rank."""
    src = fx.smollm2_path()
    rank = lambda b, il, s: min(s) if il < 1 else 0  # noqa: E731
    fact = fx.write_factored(src, tmp_path / "smol-lr.gguf", rank=rank)
    dense = fx.write_factored(src, tmp_path / "smol-dense.gguf", rank=rank, dense=True)
    a = ppl(fact, text_small, ctx=256, chunks=2)
    b = ppl(dense, text_small, ctx=256, chunks=2)
    assert abs(a["ppl"] / b["ppl"] - 1) < 1e-3


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_quantize_and_imatrix_factored(bins, tmp_path, text_small, qtype):
    src = fx.write_tiny("llama", tmp_path / "base.gguf")
    fact = fx.write_factored(src, tmp_path / "lr.gguf", rank=lambda b, il, s: 32, outtype="f16")
    out = tmp_path / f"lr-{qtype}.gguf"
    subprocess.run([str(bins / "llama-quantize"), str(fact), str(out), qtype, "2"], check=True,
                   capture_output=True, timeout=300)
    r = ppl(out, text_small)
    assert np.isfinite(r["ppl"])
    imat = tmp_path / "imatrix.gguf"
    subprocess.run([str(bins / "llama-imatrix"), "-m", str(fact), "-f", str(text_small), "-c", "128",
                    "--chunks", "2", "-o", str(imat)], check=True, capture_output=True, timeout=300)
    assert imat.is_file() and imat.stat().st_size > 0


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M", "IQ4_NL", "NF4"])
def test_quantize_with_imatrix_of_factored_file(bins, tmp_path, text_small, qtype):
    """Issue 4: llama-imatrix on a factored file feeds llama-quantize for every factor type."""
    import re

    src = fx.write_tiny("llama", tmp_path / "base.gguf")
    fact = fx.write_factored(src, tmp_path / "lr.gguf", rank=lambda b, il, s: 32, outtype="f16")
    imat = tmp_path / "imatrix.gguf"
    subprocess.run([str(bins / "llama-imatrix"), "-m", str(fact), "-f", str(text_small), "-c", "128",
                    "--chunks", "2", "-o", str(imat)], check=True, capture_output=True, timeout=300)
    out = tmp_path / f"lr-{qtype}.gguf"
    res = subprocess.run([str(bins / "llama-quantize"), "--imatrix", str(imat), str(fact), str(out), qtype, "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-500:]
    log = res.stdout + res.stderr
    n = re.search(r"loaded (\d+) importance matrix entries", log)
    assert n and int(n.group(1)) >= 2 * 7 * 2  # both factors of the 7 linears in each of 2 layers
    assert np.isfinite(ppl(out, text_small)["ppl"])


# ---------------------------------------------------------------- latent KV cache


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fa", ["on", "off"])
def test_latent_kv_matches_full_cache(tiny, text_small, arch, fa):
    """Test 3: latent cache on vs off (ASVD_LATENT_KV=0), mean KLD < 1e-4."""
    model = tiny[arch]["kv"]
    base = _kld_base(model, text_small, text_small.parent / f"{arch}-fa{fa}.kld", {"ASVD_LATENT_KV": "0"}, "-fa", fa)
    for b in ("512", "128"):
        r = ppl(model, text_small, kl_base=base, extra=["-fa", fa, "-b", b])
        assert r["kld"] < 1e-4, (arch, fa, b, r)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_latent_kv_shrinks_cache_and_takes_q8_0(tiny, text_small, arch):
    """gemma3: both halves of the iswa cache (the global layer's and the sliding-window layer's)."""
    model = tiny[arch]["kv"]
    on = ppl(model, text_small, extra=["-lv", "4"])
    off = ppl(model, text_small, extra=["-lv", "4"], env={"ASVD_LATENT_KV": "0"})
    assert on["kv_mib"] == pytest.approx(off["kv_mib"] / 2, rel=0.01)  # r = 32 of 64
    for fa in ("on", "off"):
        q = ppl(model, text_small, extra=["-fa", fa, "-ctk", "q8_0", "-ctv", "q8_0"])
        assert abs(q["ppl"] / on["ppl"] - 1) < 0.02


def _generate(model: Path, env: dict) -> str:
    res = _complete(model, "-p", "Once upon a time", "-n", "320", "-c", "256", "--context-shift", env=env)
    assert "context full, swapping" in res.stderr  # llama.cpp's n_ctx is at least 256: 320 tokens must shift
    return res.stdout


def test_latent_kv_context_shift_generation(tmp_path):
    """Test 4: 320 tokens in a 256-token context (context shift), the same text with the latent cache
    on (V folded or rebuilt) and off. On SmolLM2 with exact (full-rank) k/v latents: a random tiny
    model has so many near-ties in its logits that rounding alone changes its greedy text."""
    model = fx.write_factored(fx.smollm2_path(), tmp_path / "smol-kv.gguf", rank=lambda b, il, s: min(s),
                              linears=("attn_k", "attn_v"), kv_latent=True, outtype="f16")
    off = _generate(model, {"ASVD_LATENT_KV": "0"})
    assert len(off) > 1000
    assert _generate(model, {}) == off  # decoding folds V by default
    assert _generate(model, {"ASVD_LATENT_V": "rebuild"}) == off


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_latent_v_fold_matches_rebuild(tiny, text_small, arch):
    """Folding A_v into the attention output (qwen2: with V's bias; gemma3: in both halves of its
    iswa cache) equals rebuilding V per cell. Forced: on its own the runtime folds only small
    batches (decoding), and these are 512 tokens."""
    model = tiny[arch]["kv"]
    base = text_small.parent / f"{arch}-rebuild.kld"
    for fa in ("on", "off"):
        _kld_base(model, text_small, base, {"ASVD_LATENT_V": "rebuild"}, "-fa", fa)
        r = ppl(model, text_small, kl_base=base, extra=["-fa", fa], env={"ASVD_LATENT_V": "fold"})
        assert r["kld"] < 1e-4, (fa, r)


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_fused_attention_matches_unfused(tiny, text_small, arch):
    """The fused op (ggml_lowrank_attn: K rebuilt, RoPE'd and scored per cell, latent V summed)
    equals the unfused fold (ASVD_LATENT_FUSED=0). -b 8: the runtime's own choice for small
    batches (one stream); forced with -b 512 (ASVD_LATENT_V=fold, ASVD_LATENT_FUSED=1): four
    sequences in four streams, 128 query rows each (the runtime alone fuses at most 64). Also with q8_0
    latents (dequantized in the kernel). qwen3's and gemma3's k-norm (a per-head RMSNorm with its
    weight) runs inside the op; gemma3's sliding-window layers pass their own mask and RoPE base."""
    model = tiny[arch]["kv"]
    for fa in ("on", "off"):
        for b, env in (("8", {}), ("512", {"ASVD_LATENT_V": "fold", "ASVD_LATENT_FUSED": "1"})):
            for ct in ("f16", "q8_0"):
                cache = ["-ctk", ct, "-ctv", ct]
                base = _kld_base(model, text_small, text_small.parent / f"{arch}-unfused.kld",
                                 dict(env, ASVD_LATENT_FUSED="0"), "-fa", fa, "-b", b, *cache)
                r = ppl(model, text_small, kl_base=base, extra=["-fa", fa, "-b", b, *cache], env=env)
                assert r["kld"] < 1e-4, (arch, fa, b, ct, r)


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_decoding_takes_the_fused_op(tiny, arch):
    """Decoding a latent file runs GGML_OP_LOWRANK_ATTN in every architecture's graph, the k-norm
    ones (qwen3, gemma3) included, and ASVD_LATENT_FUSED=0 takes it out. The scheduler's debug
    listing (GGML_SCHED_DEBUG=2 with -v) names every node's op; the speed this buys is in
    docs/runtime.md and docs/results.md."""
    model = tiny[arch]["kv"]
    args = ("-p", "Once upon a time", "-n", "3", "-c", "64")
    fused = _complete(model, *args, env={"GGML_SCHED_DEBUG": "2"})
    assert "LOWRANK_AT" in fused.stderr, arch
    unfused = _complete(model, *args, env={"GGML_SCHED_DEBUG": "2", "ASVD_LATENT_FUSED": "0"})
    assert "LOWRANK_AT" not in unfused.stderr and "k_rebuilt" in unfused.stderr, arch
    assert fused.stdout == unfused.stdout  # greedy text: the same tokens either way


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_latent_kv_session_save_and_restore(tiny, tmp_path, arch):
    """Session state: a latent cache saved with --prompt-cache and restored by a second run gives
    the same continuation as the run that computed it (gemma3: both halves of the iswa cache)."""
    model = tiny[arch]["kv"]
    session = tmp_path / "latent.session"
    args = ("-p", "Once upon a time there was a", "-n", "24", "-c", "256", "--prompt-cache", str(session))
    first = _complete(model, *args)
    assert session.is_file() and session.stat().st_size > 0
    second = _complete(model, *args)
    assert "loaded a session" in second.stderr
    assert second.stdout == first.stdout
