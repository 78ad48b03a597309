"""End to end on tiny random models of each architecture: convert, read back, score."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from clitools import run_cli

from asvd2gguf.arch import LINEARS, permute_rows_for_llama
from asvd2gguf.convert import ConvertConfig, convert
from asvd2gguf.gguf_read import describe_gguf, load_gguf_model, tensor_array
from asvd2gguf.perplexity import mean_loss
from asvd2gguf.text import calibration_windows

ARCHS = ["llama", "qwen2", "qwen3"]


def _cfg(model, out, calib, cache, **kw):
    base = dict(model=str(model), out=out, calib=str(calib), calib_samples=4, calib_seqlen=64, cache_dir=cache,
                outtype="f32", device="cpu")
    base.update(kw)
    return ConvertConfig(**base)


@pytest.mark.parametrize("arch", ARCHS)
def test_factored_file_round_trip(arch, tiny_models, calib_text, cache_dir, tmp_path):
    out = tmp_path / f"{arch}.gguf"
    res = convert(_cfg(tiny_models[arch], out, calib_text, cache_dir, ratio=0.7, kv=0.75, refit_tokens=0))
    assert out.is_file() and res.ratio <= 0.7
    info = describe_gguf(out)
    # rank accounting: tensors, metadata and the result agree
    assert info.ratio() == pytest.approx(res.ratio, abs=1e-9)
    assert info.meta["asvd.ratio.achieved"] == pytest.approx(res.ratio, abs=1e-6)
    assert info.kv_ratio() <= 0.75 + 1e-9 and info.meta["asvd.kv.latent"] is True
    for spec in LINEARS:
        assert info.meta[f"asvd.rank.{spec.gguf}"] == info.ranks[spec.key] == res.ranks[spec.key]
        assert all(r % 32 == 0 for r in info.ranks[spec.key] if r)
    assert all(r > 0 for k in ("attn_k", "attn_v") for r in info.ranks[k])  # latent: K/V always factored

    # the factors in the file are the analysis' factors (f32: bit for bit, llama rows permuted; no refit)
    from asvd2gguf.analysis import AnalysisStore

    store = AnalysisStore(res.store_root)
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    heads = {"attn_q": 4, "attn_k": 2}
    for spec in LINEARS:
        for i, r in enumerate(info.ranks[spec.key]):
            if not r:
                continue
            a, b = store.factorization(i, spec.key).factors(r)
            a = a.numpy()
            if arch == "llama" and spec.key in heads:
                a = permute_rows_for_llama(a, heads[spec.key])
            np.testing.assert_array_equal(tensor_array(tensors[f"blk.{i}.{spec.gguf}.lr_in.weight"]), b.numpy())
            np.testing.assert_array_equal(tensor_array(tensors[f"blk.{i}.{spec.gguf}.lr_out.weight"]), a)

    # torch model from the file scores the calibration windows exactly as the pipeline predicted
    model, tok, _ = load_gguf_model(out, tokenizer_from=tiny_models[arch])
    windows = calibration_windows(tok, str(calib_text), 4, 64, 233)
    loss = mean_loss(model, windows)
    assert np.exp(loss) == pytest.approx(res.calib_ppl, rel=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_output_equals_factored_product(arch, tiny_models, calib_text, cache_dir, tmp_path):
    fac = tmp_path / "f.gguf"
    den = tmp_path / "d.gguf"
    convert(_cfg(tiny_models[arch], fac, calib_text, cache_dir, ratio=0.8))
    convert(_cfg(tiny_models[arch], den, calib_text, cache_dir, ratio=0.8, dense=True))
    info = describe_gguf(den)
    assert all(r == 0 for rs in info.ranks.values() for r in rs)  # stock-llama.cpp loadable layout
    mf, _, _ = load_gguf_model(fac, tokenizer_from=tiny_models[arch])
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(den.parent, gguf_file=den.name)
    config.head_dim = 64  # transformers' GGUF mapping drops attention.key_length (qwen3 would default to 128)
    md = AutoModelForCausalLM.from_pretrained(den.parent, gguf_file=den.name, config=config, dtype=torch.float32)
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lf, ld = mf(input_ids=x).logits, md(input_ids=x).logits
    assert torch.allclose(lf, ld, atol=2e-3, rtol=1e-3)


def test_inspect_and_ppl_commands(tiny_models, calib_text, cache_dir, tmp_path, capsys):
    out = tmp_path / "q.gguf"
    code, so, se = run_cli(["convert", tiny_models["qwen2"], "--ratio", "0.75", "--calib", calib_text,
                            "--calib-samples", "4", "--calib-seqlen", "64", "--out", out, "--cache-dir", cache_dir,
                            "--device", "cpu"], capsys)
    assert code == 0, se
    assert f"wrote {out}" in so
    code, so, _ = run_cli(["inspect", out], capsys)
    assert code == 0 and "asvd.method = hybrid" in so and "block-linear ratio (from tensors) = 0.7" in so
    assert "asvd.ppl.target = none" in so  # stored as 0.0 when no --ppl-target was given
    code, so, _ = run_cli(["ppl", out, "--text", calib_text, "--ctx", "64", "--chunks", "3"], capsys)
    assert code == 0 and so.strip().splitlines()[-1].startswith("PPL = ")


def test_cli_defaults_are_convert_config_defaults(capsys):
    """One home per default (ConvertConfig): every convert option shows it; hybrid is the default
    method, the best measured (docs/results.md), and --help says why; asvd stays by name."""
    import dataclasses

    import typer

    from asvd2gguf.cli import app
    from asvd2gguf.config import DEFAULTS

    cmd = typer.main.get_command(app).commands["convert"]
    fields = {f.name for f in dataclasses.fields(ConvertConfig)}
    checked = 0
    for p in cmd.params:
        if p.name in fields and p.name != "model":
            assert p.default == getattr(DEFAULTS, p.name), p.name
            checked += 1
    assert checked == len(fields) - 1
    assert DEFAULTS.method == "hybrid" and ConvertConfig(model="x").method == "hybrid"
    code, so, _ = run_cli(["convert", "--help"], capsys)
    text = " ".join(so.replace("│", " ").split())
    assert code == 0 and "Default hybrid: the lowest perplexity measured" in text and "asvd (the paper's" in text


@pytest.mark.parametrize("method", ["svd", "whiten", "hybrid"])
def test_other_methods_and_ppl_target(method, tiny_models, calib_text, cache_dir, tmp_path):
    res = convert(_cfg(tiny_models["llama"], tmp_path / "m.gguf", calib_text, cache_dir, ratio=0.75, method=method))
    assert res.ratio <= 0.75
    base = res.base_calib_ppl
    res2 = convert(_cfg(tiny_models["llama"], tmp_path / "t.gguf", calib_text, cache_dir, ratio=None,
                        ppl_target=base * 1.05, method=method))
    assert res2.calib_ppl <= base * 1.05 and res2.ratio < 1.0


def test_gguf_source_round_trip_qwen3(tiny_models, calib_text, cache_dir, tmp_path):
    """A .gguf source (qwen3: transformers' GGUF loader needs head_dim from key_length)."""
    dense = tmp_path / "src.gguf"
    convert(_cfg(tiny_models["qwen3"], dense, calib_text, cache_dir, ratio=1.0, dense=True))
    res = convert(_cfg(dense, tmp_path / "out.gguf", calib_text, cache_dir, ratio=0.7, kv=0.75))
    info = describe_gguf(tmp_path / "out.gguf")
    assert info.arch == "qwen3" and info.ratio() <= 0.7 and info.ratio() == pytest.approx(res.ratio)
    assert np.isfinite(res.calib_ppl)
