"""`convert --quant`: quantized factors and dense tensors on tiny models, read back and scored."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from clitools import run_cli

from asvd2gguf import ggml_quants as Q
from asvd2gguf.analysis import AnalysisStore
from asvd2gguf.arch import LINEARS, permute_rows_for_llama
from asvd2gguf.convert import ConvertConfig, convert
from asvd2gguf.decompose import Factorization
from asvd2gguf.gguf_read import describe_gguf, load_gguf_model
from asvd2gguf.perplexity import mean_loss
from asvd2gguf.text import calibration_windows


def _cfg(model, out, calib, cache, **kw):
    base = dict(model=str(model), out=out, calib=str(calib), calib_samples=4, calib_seqlen=64, cache_dir=cache,
                outtype="f32", device="cpu")
    base.update(kw)
    return ConvertConfig(**base)


@pytest.mark.parametrize("quant", ["q8_0", "nf4", "iq4_nl"])
def test_quantized_factors_are_the_quantized_analysis(quant, tiny_models, calib_text, cache_dir, tmp_path):
    out = tmp_path / f"{quant}.gguf"
    # without the refit, so that the factors are the analysis' (test_refit covers the refitted ones)
    res = convert(_cfg(tiny_models["llama"], out, calib_text, cache_dir, ratio=0.7, kv=0.75, quant=quant,
                       refit_tokens=0))
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    qtype = Q.TYPE_OF[quant]
    store = AnalysisStore(res.store_root)
    info = describe_gguf(out)
    heads = {"attn_q": 4, "attn_k": 2}
    n_fact = 0
    for spec in LINEARS:
        for i, r in enumerate(info.ranks[spec.key]):
            if not r:
                assert tensors[f"blk.{i}.{spec.gguf}.weight"].tensor_type == qtype
                continue
            a, b = store.factorization(i, spec.key).factors(r)
            if spec.key in heads:
                a = permute_rows_for_llama(a, heads[spec.key])
            for suffix, t in (("lr_in", b), ("lr_out", a)):
                rt = tensors[f"blk.{i}.{spec.gguf}.{suffix}.weight"]
                assert rt.tensor_type == qtype
                np.testing.assert_array_equal(np.asarray(rt.data).reshape(t.shape[0], -1),
                                              Q.QUANTIZERS[quant](t).data.numpy())
            n_fact += 1
    assert n_fact > 0
    assert tensors["token_embd.weight"].tensor_type == Q.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert reader.fields["asvd.quant"].contents() == quant
    # the torch model read back (dequantized) scores what the converter reported
    model, tok, _ = load_gguf_model(out, tokenizer_from=tiny_models["llama"])
    windows = calibration_windows(tok, str(calib_text), 4, 64, 233)
    # the reported perplexity covers the quantized block linears, the file also has a Q8_0 embedding
    assert np.exp(mean_loss(model, windows)) == pytest.approx(res.calib_ppl, rel=2e-2)


def test_sigma_split_keeps_the_product():
    g = torch.Generator().manual_seed(0)
    f = Factorization(torch.linalg.qr(torch.randn(64, 16, generator=g))[0], torch.linspace(5, 1, 16),
                      torch.randn(16, 48, generator=g))
    ref = f.weight(8)
    for split in ("uv", "u", "v"):
        a, b = f.factors(8, split)
        torch.testing.assert_close(a @ b, ref)
    a_u, b_u = f.factors(8, "u")
    torch.testing.assert_close(b_u, f.Vt[:8])
    a_v, _ = f.factors(8, "v")
    torch.testing.assert_close(a_v, f.U[:, :8])


def test_rank_not_multiple_of_block_falls_back(tiny_models, calib_text, cache_dir, tmp_path, capsys):
    out = tmp_path / "a8.gguf"
    code, stdout, stderr = run_cli(["convert", str(tiny_models["llama"]), "--out", str(out), "--calib", str(calib_text),
                 "--calib-samples", "4", "--calib-seqlen", "64", "--cache-dir", str(cache_dir), "--ratio", "0.6",
                 "--rank-align", "8", "--quant", "q8_0", "--outtype", "f16", "--device", "cpu"], capsys)
    assert code == 0, stderr
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    odd = [n for n, t in types.items() if n.endswith("lr_out.weight") and t == gguf.GGMLQuantizationType.F16]
    info = describe_gguf(out)
    expect = sum(1 for s in LINEARS for rk in info.ranks[s.key] if rk and rk % 32)
    assert expect > 0 and len(odd) == expect
    assert "not a multiple of 32" in stdout + stderr


@pytest.mark.parametrize("args,msg", [(["--quant", "q5_k"], "unknown --quant 'q5_k'"),
                                      (["--quant", "nf4", "--quant-embd", "int3"], "unknown --quant-embd"),
                                      (["--sigma-split", "w"], "unknown --sigma-split")])
def test_bad_quant_options(args, msg, tiny_models, tmp_path, capsys):
    code, _, stderr = run_cli(["convert", str(tiny_models["llama"]), "--out", str(tmp_path / "x.gguf"), *args], capsys)
    assert code != 0 and msg in stderr and "Traceback" not in stderr
    assert not (tmp_path / "x.gguf").exists()
