"""The quantize stage: which ggml type each written tensor gets, and the quantized tensors
(the formats themselves, bit-exact with ggml, are ggml_quants.py).

Policy (`--quant MODE`, overridable per group):

| group | none | q8_0 | nf4 | iq4_nl |
|---|---|---|---|---|
| factors lr_in / lr_out | --outtype | Q8_0 | NF4 | IQ4_NL |
| dense block linears (`--quant-dense`) | --outtype | Q8_0 | NF4 | IQ4_NL |
| token_embd, output (`--quant-embd`) | --outtype | Q8_0 | Q8_0 | Q8_0 |
| norms, biases (1-D) | F32 | F32 | F32 | F32 |

Embeddings and the output head stay at 8 bits in the 4-bit modes, as llama.cpp's own 4-bit
presets keep them above the block linears: they are few parameters and the most sensitive.
A tensor whose row length is not a multiple of 32 cannot take a block type; it falls back to
--outtype and is reported.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .errors import Fallback, UserError
from .ggml_quants import QUANTIZERS, Quantized, dequantize_torch
from .pricing import SOURCE

FLOAT_TYPES = ("f32", "f16", "bf16")
QUANT_MODES = ("none", *QUANTIZERS)
SIGMA_SPLITS = ("uv", "u", "v")


@dataclass(frozen=True)
class QuantPlan:
    """The type per tensor group (see the table above): a float --outtype or a QUANTIZERS name."""

    factors: str
    dense: str
    embd: str
    outtype: str

    @property
    def active(self) -> bool:
        """Whether any group gets a block type."""
        return any(t in QUANTIZERS for t in (self.factors, self.dense, self.embd))


def plan(quant: str, outtype: str, dense: str | None = None, embd: str | None = None) -> QuantPlan:
    """The per-group types for a mode; raises UserError naming a bad choice."""
    if quant not in QUANT_MODES:
        raise UserError(f"unknown --quant '{quant}'; use one of {', '.join(QUANT_MODES)}")
    allowed = (*FLOAT_TYPES, *QUANTIZERS)
    for opt, val in (("--quant-dense", dense), ("--quant-embd", embd)):
        if val is not None and val not in allowed:
            raise UserError(f"unknown {opt} '{val}'; use one of {', '.join(allowed)}")
    base = outtype if quant == "none" else quant
    return QuantPlan(factors=base, dense=dense or base, embd=embd or ("q8_0" if quant != "none" else outtype),
                     outtype=outtype)


def encode(t: torch.Tensor, qtype: str, name: str, fallbacks: list[Fallback] | None = None,
           device: torch.device | None = None):
    """`t` in block type `qtype` (a Quantized on the CPU), or `t` itself for a float type."""
    if qtype not in QUANTIZERS or t.ndim != 2:
        return t
    if t.shape[1] % 32:
        if fallbacks is not None:
            fallbacks.append(Fallback(name, f"row length {t.shape[1]} is not a multiple of 32", "as float"))
        return t
    q = QUANTIZERS[qtype](t.to(device) if device is not None else t)
    return replace(q, data=q.data.cpu())


def decoded(t) -> torch.Tensor:
    """What the runtime computes with: the dequantized tensor, or the float one."""
    return dequantize_torch(t) if isinstance(t, Quantized) else t


def quantize_blocks(blocks: list, qplan: QuantPlan, device: torch.device | None = None, progress=None):
    """Quantize every block linear per the plan: (blocks for writing, blocks as decoded, fallbacks).

    The decoded copy lets the converter report the calibration perplexity of what is written.
    """
    fallbacks: list[Fallback] = []
    written, seen = [], []
    task = progress.add_task(f"quantizing ({qplan.factors})", total=len(blocks)) if progress else None
    for i, row in enumerate(blocks):
        wrow, drow = [], []
        for bt in row:
            base = f"blk.{i}.{bt.key}"
            if bt.weight is not None:
                w = encode(bt.weight, qplan.dense, f"{base}.weight", fallbacks, device)
                wrow.append(replace(bt, weight=w))
                drow.append(replace(bt, weight=decoded(w)))
            else:
                a = encode(bt.a, qplan.factors, f"{base}.lr_out.weight", fallbacks, device)
                b = encode(bt.b, qplan.factors, f"{base}.lr_in.weight", fallbacks, device)
                wrow.append(replace(bt, a=a, b=b))
                drow.append(replace(bt, a=decoded(a), b=decoded(b)))
        written.append(wrow)
        seen.append(drow)
        if progress:
            progress.advance(task)
    return written, seen, fallbacks


class NonBlockEncoder:
    """gguf_write's `nonblock_map` under a quantization plan: token_embd / output at the plan's
    embedding type, other non-block tensors as they are. The writer calls it while it streams
    the donor's tensors; the fallbacks it met (a row length not a multiple of 32) are its own
    record, read after writing."""

    EMBEDDINGS = ("token_embd.weight", "output.weight")

    def __init__(self, qplan: QuantPlan, device: torch.device | None = None):
        self.qplan = qplan
        self.device = device
        self.fallbacks: list[Fallback] = []

    def __call__(self, name: str, arr):
        if name in self.EMBEDDINGS and np.ndim(arr) == 2:
            return encode(torch.as_tensor(np.ascontiguousarray(arr)), self.qplan.embd, name, self.fallbacks,
                          self.device)
        return arr


# ---------------------------------------------------------------- size plans (--size / --bpw)
#
# Every tensor at the type its plan Option chose, quantized by llama.cpp's own code (ggml_lib) with
# the calibration's importance matrix, as pricing.py priced it: diag(Gx) for a dense weight and the
# input factor B, diag(B Gx B^T) for the output factor A (its input is B x).


class SourceBlocks:
    """The quantized 2-D tensors of a GGUF source, as the file stores them.

    A size plan may keep a tensor in its source's blocks (an Option of qtype SOURCE, priced by
    pricing.source_option): lossless against the dequantized model every price is measured on,
    where quantizing it again, even to the same type, is not (the importance matrix moves the
    scales: llama-quantize's Q4_K_M of a Q4_K_M Gemma 3 has KLD 0.005 against its source).
    Only types a plan could ask for (ggml_lib.TYPES) are offered, so the type keys stay short.
    `get` gives block linears in Hugging Face row order (the writer permutes q/k back for archs
    with permute_qk) and token_embd / output in GGUF order, as the writer takes each.
    """

    def __init__(self, path: Path | None, arch: str, n_head: int, n_head_kv: int):
        from . import ggml_lib as G
        from .gguf_fast import FastGGUFReader

        self.tensors = {}
        if path is not None:
            floats = {G.T.F32, G.T.F16, G.T.BF16}
            self.tensors = {t.name.removesuffix(".weight"): t for t in FastGGUFReader(path).tensors
                            if len(t.shape) == 2 and t.tensor_type not in floats and int(t.tensor_type) in G.NAMES}
        self.arch, self.n_head, self.n_head_kv = arch, n_head, n_head_kv

    def get(self, name: str, shape: tuple[int, int]) -> Quantized | None:
        """The source's blocks of tensor `name` ("blk.3.attn_q", "token_embd"), or None when the
        source has no quantized tensor of that name and `shape` (rows, row length)."""
        from .arch import arch_spec, permuted_heads, unpermute_rows_for_llama

        t = self.tensors.get(name)
        if t is None or tuple(int(d) for d in reversed(t.shape)) != tuple(shape):
            return None
        data = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(shape[0], -1))
        heads = permuted_heads(name.split(".")[-1], self.n_head, self.n_head_kv) if name.startswith("blk.") else None
        if heads is not None and arch_spec(self.arch).permute_qk:
            data = unpermute_rows_for_llama(data, heads).contiguous()
        return Quantized(t.tensor_type, data, tuple(shape))


def _ggml_quantized(t: torch.Tensor, qtype: str, imatrix, lib) -> tuple[Quantized, torch.Tensor]:
    """(t (rows, n) at written type `qtype` as raw blocks, its dequantized float32 copy)."""
    from . import ggml_lib as G

    x = t.detach().float().cpu().numpy()
    data = G.quantize(x, qtype, imatrix, lib)
    deq = torch.from_numpy(G.dequantize(data, qtype, x.shape[1], lib))
    return Quantized(G.type_of(qtype), torch.from_numpy(data), tuple(x.shape)), deq


def ggml_dequantized(q: Quantized, lib) -> torch.Tensor:
    """Float32 (rows, n) of blocks of any ggml type, by ggml's own to_float (ggml_lib.dequantize)."""
    from . import ggml_lib as G

    return torch.from_numpy(G.dequantize(q.data.numpy(), q.qtype, q.shape[1], lib))


def source_quantized(sources: SourceBlocks | None, name: str, shape: tuple[int, int],
                     lib) -> tuple[Quantized, torch.Tensor]:
    """(the source's blocks of `name`, dequantized float32 (rows, n)) for an Option of qtype SOURCE.
    Raises RuntimeError when the source has no such tensor (the plan offered what is not there)."""
    q = sources.get(name, shape) if sources is not None else None
    if q is None:
        raise RuntimeError(f"{name}: planned as kept from the source, which has no quantized tensor {shape}")
    return q, ggml_dequantized(q, lib)


def quantize_sized(blocks: list, plan, grams: list[dict[str, torch.Tensor]], lib=None, progress=None,
                   sources: SourceBlocks | None = None):
    """Quantize every block linear at its size-plan type: (blocks for writing, blocks as decoded).

    blocks: factor.final_blocks' float tensors; plan: a ranks.RankPlan with choices (the written
    types of each Option are used, so a fallback's new choice is honoured); grams: per layer the
    input Gram X^T X / T per input group (calibrate.LayerStats.gram), for the imatrix; sources:
    the source's blocks, for the linears planned as kept (qtype SOURCE).
    """
    from .arch import SPEC
    from .pricing import imatrix_dense, imatrix_factor_a

    key_of = {SPEC[k].gguf: k for k in SPEC}
    written, seen = [], []
    task = progress.add_task("quantizing (size plan)", total=len(blocks)) if progress else None
    for i, row in enumerate(blocks):
        wrow, drow = [], []
        for bt in row:
            key = key_of[bt.key]
            opt = plan.choices[(i, key)]
            gx = grams[i][SPEC[key].group].float()
            if bt.weight is not None:
                if opt.qtype == SOURCE:
                    w, dw = source_quantized(sources, f"blk.{i}.{bt.key}", tuple(bt.weight.shape), lib)
                else:
                    w, dw = _ggml_quantized(bt.weight, opt.types[0], imatrix_dense(gx), lib)
                wrow.append(replace(bt, weight=w))
                drow.append(replace(bt, weight=dw))
            else:
                b, db = _ggml_quantized(bt.b, opt.types[1], imatrix_dense(gx), lib)
                a, da = _ggml_quantized(bt.a, opt.types[0], imatrix_factor_a(bt.b.float(), gx), lib)
                wrow.append(replace(bt, a=a, b=b))
                drow.append(replace(bt, a=da, b=db))
        written.append(wrow)
        seen.append(drow)
        if progress:
            progress.advance(task)
    return written, seen


class SizedNonBlock:
    """gguf_write's `nonblock_map` for a size plan: token_embd / output at their planned types
    (llama.cpp's quantizers; imatrix: the head's input statistic diag(Gh) for a matrix used as the
    output head, none for an untied token_embd, as llama-quantize has none for it)."""

    def __init__(self, plan, head_imatrix, tied: bool, lib=None, sources: SourceBlocks | None = None):
        self.plan, self.head_imatrix, self.tied, self.lib, self.sources = plan, head_imatrix, tied, lib, sources

    def _quantized(self, base: str, t: torch.Tensor) -> tuple[Quantized, torch.Tensor]:
        if self.plan.choices[base].qtype == SOURCE:
            return source_quantized(self.sources, base, tuple(t.shape), self.lib)
        im = self.head_imatrix if (base == "output" or self.tied) else None
        return _ggml_quantized(t, self.plan.choices[base].types[0], im, self.lib)

    def __call__(self, name: str, arr):
        base = name.removesuffix(".weight")
        if base not in self.plan.choices or np.ndim(arr) != 2:
            return arr
        return self._quantized(base, torch.as_tensor(np.ascontiguousarray(arr)))[0]

    @contextmanager
    def seen(self, embedding: torch.nn.Parameter, head: torch.nn.Parameter):
        """The model computes with token_embd (and an untied output head) as written: their values
        are the dequantized planned types inside the block, the originals again after it (the
        calibration perplexity of a size plan then counts the embedding's rounding too)."""
        params = {"token_embd": embedding} if self.tied else {"token_embd": embedding, "output": head}
        saved = {k: p.data for k, p in params.items()}
        try:
            for k, p in params.items():
                if k in self.plan.choices:
                    p.data = self._quantized(k, p.data)[1].to(p.dtype).to(p.device)
            yield
        finally:
            for k, p in params.items():
                p.data = saved[k]
