"""Issue 16.1: RoPE scaling reaches both the written GGUF and the torch model (a kind, four members).

A Hugging Face folder converts to what llama.cpp's own converter writes (every key and tensor,
e.g. the Llama 3.x `rope_freqs.weight` it generates from `rope_scaling`), and a GGUF that
carries RoPE scaling loads into a torch model that rotates as llama.cpp does. Members: Llama 3
(`rope_freqs.weight`), linear and yarn scaling keys on llama, yarn on qwen2. Reference: the
pinned tree's convert_hf_to_gguf.py run as shipped (F32).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_fixtures import finish_gguf

from asvd2gguf import llamacpp
from asvd2gguf.convert import ConvertConfig, convert
from asvd2gguf.errors import UserError
from asvd2gguf.gguf_read import load_gguf_model, tensor_array
from asvd2gguf.hf_donor import check_tensor_names
from asvd2gguf.llamacpp_tree import source_tree
from asvd2gguf.rope import base_inv_freq, gguf_rope_parameters, llama3_from_factors
from asvd2gguf.source import load_source

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
# member -> (architecture, rope_scaling as real checkpoints write it, max_position_embeddings)
MEMBERS = {
    "llama3": ("llama", LLAMA3, 512),  # the input
    "linear": ("llama", {"rope_type": "linear", "factor": 4.0}, 1024),
    "yarn": ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, 512),
    "qwen2_yarn": ("qwen2", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, 512),
}
IGNORED_KEYS = {"general.name", "general.file_type"}  # ours: "(ASVD)" suffix; the factor/dense type


def llama3_reference(base: float, dim: int, p: dict) -> np.ndarray:
    """Per-frequency divisors of Meta's Llama 3.1 `apply_scaling`, as llama.cpp's converter
    computes them (conversion/llama.py), in float32 like the tensor it writes."""
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, low, high, factor = p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"], \
        p["factor"]
    out = []
    for fr in freqs:
        wl = 2 * math.pi / fr
        if wl < old / high:
            out.append(1.0)
        elif wl > old / low:
            out.append(factor)
        else:
            smooth = (old / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(np.array(out, dtype=np.float32), dtype=np.float64)


@pytest.mark.parametrize("base,dim,params", [
    (10000.0, 64, LLAMA3),  # 5 points in the smooth band
    (500000.0, 128, {**LLAMA3, "original_max_position_embeddings": 8192}),  # Llama 3.1 8B
    (500000.0, 128, {**LLAMA3, "factor": 32.0, "original_max_position_embeddings": 8192}),  # Llama 3.2 1B
    (10000.0, 16, {**LLAMA3, "high_freq_factor": 2.0}),  # one band point
    (10000.0, 16, {**LLAMA3, "high_freq_factor": 1.5, "original_max_position_embeddings": 100}),  # none
    (1e6, 128, {**LLAMA3, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 4096}),
])
def test_llama3_parameters_recovered_from_rope_freqs(base, dim, params):
    """The recovered parameters give transformers' llama3 frequencies equal to llama.cpp's
    base^(-2i/d) / rope_freqs, whatever the band looks like."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    f = llama3_reference(base, dim, params)
    p = llama3_from_factors(f, base, dim)
    assert p["factor"] == params["factor"]
    cfg = LlamaConfig(hidden_size=4 * dim, num_attention_heads=4, head_dim=dim, max_position_embeddings=1 << 20,
                      rope_parameters={**p, "rope_theta": base})
    inv, scale = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    np.testing.assert_allclose(inv.double().numpy(), base_inv_freq(base, dim) / f, rtol=1e-6)
    assert scale == 1.0


def test_non_llama3_rope_freqs_is_refused():
    f = np.ones(32)
    f[5], f[20] = 3.0, 1.5  # not monotone: no Llama 3 rule gives it
    with pytest.raises(UserError, match="Llama 3"):
        llama3_from_factors(np.where(np.arange(32) > 25, 8.0, f), 10000.0, 64)


def _gguf_with(tmp_path: Path, kv: dict, rope_freqs: np.ndarray | None = None):
    """A metadata-only llama GGUF (plus rope_freqs.weight when given), read back."""
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(2048)
    w.add_embedding_length(256)
    w.add_head_count(4)
    w.add_rope_dimension_count(64)
    w.add_rope_freq_base(10000.0)
    for k, v in kv.items():
        w.add_key_value(f"llama.{k}", v, gguf.GGUFValueType.STRING if isinstance(v, str) else gguf.GGUFValueType.FLOAT32
                        if isinstance(v, float) else gguf.GGUFValueType.UINT32)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    finish_gguf(w)
    return gguf.GGUFReader(path)


def test_gguf_rope_parameters_follow_llama_cpp(tmp_path):
    """What llama.cpp applies, as transformers parameters: its defaults (no key: linear with
    factor 0 = none), linear, yarn with its fixed betas and magnitude, and the refusals."""
    assert gguf_rope_parameters(_gguf_with(tmp_path, {})) is None
    assert gguf_rope_parameters(_gguf_with(tmp_path, {"rope.scaling.type": "none", "rope.scaling.factor": 4.0})) \
        is None
    assert gguf_rope_parameters(_gguf_with(tmp_path, {"rope.scaling.type": "linear", "rope.scaling.factor": 4.0})) \
        == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    y = gguf_rope_parameters(_gguf_with(tmp_path, {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}))
    assert y["original_max_position_embeddings"] == 2048 and (y["beta_fast"], y["beta_slow"]) == (32.0, 1.0)
    assert y["attention_factor"] == pytest.approx(0.1 * math.log(4.0) + 1)
    y = gguf_rope_parameters(_gguf_with(tmp_path, {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
                                                   "rope.scaling.original_context_length": 512,
                                                   "rope.scaling.attn_factor": 0.5}))
    assert y["original_max_position_embeddings"] == 512
    assert y["attention_factor"] == pytest.approx(0.5 * (0.1 * math.log(4.0) + 1))
    with pytest.raises(UserError, match="longrope"):
        gguf_rope_parameters(_gguf_with(tmp_path, {"rope.scaling.type": "longrope"}))
    freqs = llama3_reference(10000.0, 64, LLAMA3)
    p = gguf_rope_parameters(_gguf_with(tmp_path, {}, freqs))
    assert p["rope_type"] == "llama3" and p["original_max_position_embeddings"] == 64
    assert p["high_freq_factor"] == pytest.approx(4.0, rel=1e-6)
    with pytest.raises(UserError, match="together with rope scaling"):
        gguf_rope_parameters(_gguf_with(tmp_path, {"rope.scaling.type": "linear", "rope.scaling.factor": 2.0}, freqs))
    with pytest.raises(UserError, match="entries"):
        gguf_rope_parameters(_gguf_with(tmp_path, {}, freqs[:8]))


def test_tensor_name_check_names_the_difference():
    check_tensor_names(["a", "b"], ["b", "a"], "m")
    with pytest.raises(UserError, match="writes rope_freqs.weight for m, which asvd2gguf does not produce"):
        check_tensor_names(["a"], ["a", "rope_freqs.weight"], "m")
    with pytest.raises(UserError, match="would write x.weight"):
        check_tensor_names(["a", "x.weight"], ["a"], "m")


# ---------------------------------------------------------------- whole files, per member


def stock_convert(folder: Path, out: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py from the pinned tree, as shipped, to an F32 file."""
    res = subprocess.run([sys.executable, str(source_tree() / "convert_hf_to_gguf.py"), str(folder), "--outtype",
                          "f32", "--outfile", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def _member_folder(tiny_models, root: Path, member: str) -> Path:
    arch, scaling, n_ctx = MEMBERS[member]
    folder = root / member
    shutil.copytree(tiny_models[arch], folder)
    cfg = json.loads((folder / "config.json").read_text())
    theta = cfg.pop("rope_parameters", {}).get("rope_theta", 10000.0)
    cfg.update(rope_theta=theta, rope_scaling=scaling, max_position_embeddings=n_ctx)  # as on the hub
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def _ours(folder: Path, out: Path, outtype: str, calib_text: Path, cache_dir: Path) -> Path:
    convert(ConvertConfig(model=str(folder), out=out, ratio=1.0, calib=str(calib_text), calib_samples=1,
                          calib_seqlen=32, cache_dir=cache_dir, outtype=outtype, device="cpu"))
    return out


@pytest.fixture(scope="session")
def rope_files(tiny_models, calib_text, cache_dir, tmp_path_factory):
    """Per member: the HF folder, the stock converter's F32 file, ours at --ratio 1.0 F32."""
    root = tmp_path_factory.mktemp("rope")
    out = {}
    for member in MEMBERS:
        folder = _member_folder(tiny_models, root, member)
        out[member] = {"folder": folder, "stock": stock_convert(folder, root / f"{member}-stock.gguf"),
                       "f32": _ours(folder, root / f"{member}-f32.gguf", "f32", calib_text, cache_dir)}
    return out


@pytest.fixture(scope="session")
def rope_f16(rope_files, calib_text, cache_dir):
    """Ours at the default --outtype f16 (the llama.cpp checks; the analysis is cached by then)."""
    return {m: _ours(f["folder"], f["f32"].with_name(f"{m}-f16.gguf"), "f16", calib_text, cache_dir)
            for m, f in rope_files.items()}


def _fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith(("GGUF.", "asvd.")) and k not in
            IGNORED_KEYS}


@pytest.mark.parametrize("member", MEMBERS)
def test_hf_folder_converts_to_what_the_stock_converter_writes(member, rope_files):
    """Every key (rope scaling included) and every tensor of the stock file, with equal values
    at --ratio 1.0 F32 (block linears dense, so bit for bit)."""
    files = rope_files[member]
    assert _fields(files["f32"]) == _fields(files["stock"])
    ours = {t.name: t for t in gguf.GGUFReader(files["f32"]).tensors}
    stock = {t.name: t for t in gguf.GGUFReader(files["stock"]).tensors}
    assert sorted(ours) == sorted(stock)
    for name, t in stock.items():
        np.testing.assert_array_equal(tensor_array(ours[name]), tensor_array(t), err_msg=name)
    if member == "llama3":  # the generated tensor itself, against Meta's rule
        np.testing.assert_allclose(tensor_array(ours["rope_freqs.weight"]),
                                   llama3_reference(10000.0, 64, LLAMA3), rtol=1e-6)  # float32 ulps


@pytest.mark.parametrize("member", MEMBERS)
def test_gguf_loads_into_the_torch_model_of_the_folder(member, rope_files, cache_dir):
    """Both GGUF routes into torch (our reader for our files, transformers' GGUF loader plus our
    rope parameters for other files) give the HF folder's model: same logits past the original
    context, where every member's scaling matters."""
    files = rope_files[member]
    ref = load_source(str(files["folder"]), cache_dir).model
    ours, _, _ = load_gguf_model(files["f32"], with_tokenizer=False)
    stock = load_source(str(files["stock"]), cache_dir).model
    x = torch.randint(3, 512, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=x).logits
        for model in (ours, stock):
            torch.testing.assert_close(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq, rtol=1e-6,
                                       atol=0)
            torch.testing.assert_close(model(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- llama.cpp


def _llama_tokens(model: Path, text: Path, ctx: int, chunks: int, tmp_path: Path) -> torch.Tensor:
    """The token windows llama-perplexity scores (read from its --kl-divergence-base file, whose
    header holds them), each chunk's first token set to BOS as llama-perplexity does."""
    base = tmp_path / "base.kld"
    subprocess.run([str(llamacpp.binary("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(ctx),
                    "--chunks", str(chunks), "--kl-divergence-base", str(base)], check=True, capture_output=True,
                   timeout=300)
    raw = base.read_bytes()
    n_ctx, _, n_chunk = np.frombuffer(raw[8:20], dtype=np.int32)
    toks = np.frombuffer(raw[20:20 + 4 * int(n_chunk) * int(n_ctx)], dtype=np.int32).reshape(int(n_chunk), int(n_ctx))
    w = torch.from_numpy(toks.astype(np.int64))
    bos = gguf.GGUFReader(model).fields["tokenizer.ggml.bos_token_id"].contents()
    w[:, 0] = int(bos)
    return w


@pytest.mark.llama
@pytest.mark.parametrize("member", MEMBERS)
def test_output_kld_against_the_stock_file(member, rope_files, rope_f16, text_small):
    """The issue's check: at --ratio 1.0 our F16 file and the stock F32 file are one model in
    llama.cpp (KLD < 1e-5: F16 rounding); before the fix llama3 gave KLD 0.0159."""
    r = llamacpp.perplexity(rope_f16[member], text_small, ctx=128, chunks=3,
                            kl_base=rope_files[member]["stock"])
    assert r["kld"] < 1e-5 and r["same_top_p"] > 0.99


@pytest.mark.llama
@pytest.mark.parametrize("member", MEMBERS)
def test_torch_and_llama_cpp_agree_on_a_scaled_gguf(member, rope_files, text_small, cache_dir, tmp_path):
    """A .gguf source with RoPE scaling (the stock converter's file): the torch model that is
    calibrated and scored gives llama-perplexity's perplexity within 0.1% on llama-perplexity's
    own tokens (ctx 256 > every member's original context: the scaling matters)."""
    from asvd2gguf.perplexity import torch_perplexity

    stock = rope_files[member]["stock"]
    windows = _llama_tokens(stock, text_small, 256, 2, tmp_path)
    torch_ppl = torch_perplexity(load_source(str(stock), cache_dir).model, windows, first=128)
    llama_ppl = llamacpp.perplexity(stock, text_small, ctx=256, chunks=2)["ppl"]
    assert abs(torch_ppl / llama_ppl - 1) < 1e-3, (torch_ppl, llama_ppl)
