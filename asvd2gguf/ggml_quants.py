"""Block quantization formats written by the converter: Q8_0, IQ4_NL and NF4, in torch.

Each quantizer reproduces ggml's reference C code operation for operation in float32 (same
products, same left-to-right sums, same rounding), so the bytes equal what `ggml_quantize_chunk`
writes for the same input on x86-64 (where ggml-base is built without FMA contraction);
tests/test_quants.py checks that against the built library. Vectorised over blocks, so they run
on the GPU as well; loops remain only where C accumulates sequentially (32 steps per block).

NF4 is this project's ggml type (patch 0004): the QLoRA NormalFloat codebook scaled by 127 and
rounded to int8, so ggml's int8 dot-product kernels (the IQ4_NL ones) apply unchanged, block 32
with an fp16 absmax scale, nibbles packed as IQ4_NL packs them. Its id is registered into
gguf-py's enum here, so gguf's reader and writer accept files that hold it.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

QK = 32  # block size of all three types
Q8_0 = gguf.GGMLQuantizationType.Q8_0
IQ4_NL = gguf.GGMLQuantizationType.IQ4_NL
NF4_ID = 64  # GGML_TYPE_NF4 in patches/0004: clear of upstream's next ids (its tree ends at Q2_0 = 42)
NF4_LEGACY_ID = 43  # what files written before 2026-11 store for NF4 (docs/gguf-format.md)
NF4_BYTES = 2 + QK // 2

# QLoRA's NormalFloat-4 levels (Dettmers et al. 2023), and the int8 codebook ggml stores (x 127).
NF4_FLOAT = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0)
KVALUES_NF4 = tuple(int(round(127 * v)) for v in NF4_FLOAT)
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: below this a block is all zeros


def register_nf4() -> gguf.GGMLQuantizationType:
    """Add NF4 to gguf-py's type enum and size table (idempotent); returns the member.

    gguf-py's IntEnum cannot be subclassed, so the member is created the way Enum creates its
    own and entered into the lookup maps; `GGMLQuantizationType(NF4_ID)` then works in the reader.
    """
    T = gguf.GGMLQuantizationType
    member = T._value2member_map_.get(NF4_ID)
    if member is None:
        member = int.__new__(T, NF4_ID)
        member._name_, member._value_ = "NF4", NF4_ID
        member.__objclass__ = T
        T._value2member_map_[NF4_ID] = member
        T._member_map_["NF4"] = member
        T._member_names_.append("NF4")
    gguf.GGML_QUANT_SIZES.setdefault(member, (QK, NF4_BYTES))
    return member


NF4 = register_nf4()


def tensor_type(raw: int, asvd_file: bool, name: str) -> gguf.GGMLQuantizationType:
    """The ggml type of a tensor whose GGUF info says `raw`.

    NF4 moved from id 43 to 64 (patches/0004); in a file with asvd.* metadata, 43 still means NF4
    (with an AsvdWarning), as the patched llama.cpp reads it. Elsewhere 43 is whatever gguf-py says.
    Raises ValueError for an id gguf-py does not know.
    """
    if raw == NF4_LEGACY_ID and asvd_file and NF4_LEGACY_ID not in gguf.GGMLQuantizationType._value2member_map_:
        import warnings

        from .errors import AsvdWarning

        warnings.warn(f"tensor {name} has the old NF4 type id {NF4_LEGACY_ID}, read as NF4 ({NF4_ID}); "
                      "re-convert the file to store the new id", AsvdWarning, stacklevel=3)
        return NF4
    return gguf.GGMLQuantizationType(raw)


@dataclass
class Quantized:
    """A 2-D tensor in a ggml block type: `data` is uint8 (rows, bytes per row)."""

    qtype: gguf.GGMLQuantizationType
    data: torch.Tensor
    shape: tuple[int, int]  # (rows, row length) in elements


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 2 or x.shape[1] % QK:
        raise ValueError(f"row length {tuple(x.shape)} is not a multiple of {QK}")
    return x.detach().to(torch.float32).reshape(-1, QK)


def _round_away(v: torch.Tensor) -> torch.Tensor:
    """C roundf (halves away from zero); v - trunc(v) is exact, so no float surprises."""
    t = torch.trunc(v)
    f = v - t
    return t + (f >= 0.5).to(v.dtype) - (f <= -0.5).to(v.dtype)


def _half_bytes(d: torch.Tensor) -> torch.Tensor:
    return d.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    idx = idx.to(torch.uint8)
    return idx[:, :16] | (idx[:, 16:] << 4)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0xF, qs >> 4], dim=1).long()


def _finish(x: torch.Tensor, qtype, parts: list[torch.Tensor]) -> Quantized:
    rows, n = x.shape
    data = torch.cat(parts, dim=1).reshape(rows, -1)
    return Quantized(qtype, data, (rows, n))


def quantize_q8_0(x: torch.Tensor) -> Quantized:
    """quantize_row_q8_0_ref: absmax/127 scale, roundf."""
    xb = _blocks(x)
    d = xb.abs().amax(dim=1) / 127
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, 1.0), 0.0)
    q = _round_away(xb * inv[:, None]).to(torch.int8)
    return _finish(x, Q8_0, [_half_bytes(d), q.view(torch.uint8)])


def _best_index(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """best_index_int8: nearest codebook entry, ties to the upper one, clamped at the ends.

    The codebook holds integers, so "entries <= x" equals "entries <= floor(x)": one table
    lookup instead of a binary search (searchsorted was most of IQ4_NL's time).
    """
    lut = (torch.arange(-128, 128, device=x.device, dtype=values.dtype)[:, None] >= values).sum(1)
    mu = torch.take(lut, (torch.floor(x).clamp(-128, 127) + 128).long()).clamp(1, values.numel() - 1)
    lo, hi = torch.take(values, mu - 1), torch.take(values, mu)
    idx = torch.where(x - lo < hi - x, mu - 1, mu)
    idx = torch.where(x <= values[0], 0, idx)
    return torch.where(x >= values[-1], values.numel() - 1, idx)


def _weighted_sums(values, xb, w, inv):
    """sum_j w q x and sum_j w q q, accumulated left to right as the C loop does."""
    q = torch.take(values, _best_index(values, inv[:, None] * xb))
    wq = w * q
    px, pq = (wq * xb).T.contiguous(), (wq * q).T.contiguous()
    sx = torch.zeros(xb.shape[0], dtype=xb.dtype, device=xb.device)
    sq = torch.zeros_like(sx)
    for j in range(xb.shape[1]):
        sx += px[j]
        sq += pq[j]
    return sx, sq


def quantize_iq4_nl(x: torch.Tensor, ntry: int = 7) -> Quantized:
    """quantize_row_iq4_nl_impl with one 32-block per super-block and no importance matrix."""
    xb = _blocks(x)
    values = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=xb.device)
    w = xb * xb
    ax = xb.abs()
    amax, arg = ax.max(dim=1)  # first index of the maximum, as C's strict '>' keeps
    mx = xb.gather(1, arg[:, None]).squeeze(1)
    live = amax >= GROUP_MAX_EPS
    mx_safe = torch.where(live, mx, 1.0)
    d = -mx_safe / values[0]
    sx, sq = _weighted_sums(values, xb, w, 1 / d)
    d = torch.where(sq > 0, sx / torch.where(sq > 0, sq, 1.0), 0.0)
    best = d * sx
    for itry in range(-ntry, ntry + 1):
        inv = (itry + values[0]) / mx_safe
        sx, sq = _weighted_sums(values, xb, w, inv)
        better = (sq > 0) & (sx * sx > best * sq)
        nd = sx / torch.where(sq > 0, sq, 1.0)
        d = torch.where(better, nd, d)
        best = torch.where(better, nd * sx, best)
    d = torch.where(live, d, 0.0)
    inv = torch.where(d != 0, 1 / torch.where(d != 0, d, 1.0), 0.0)
    idx = _best_index(values, inv[:, None] * xb)
    return _finish(x, IQ4_NL, [_half_bytes(d), _pack_nibbles(idx)])


def _nf4_levels(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 scale per block, level index per value): the NF4 reference rule of patch 0004."""
    if x.ndim != 2 or x.shape[1] % block:
        raise ValueError(f"row length {tuple(x.shape)} is not a multiple of {block}")
    xb = x.detach().to(torch.float32).reshape(-1, block)
    values = torch.tensor(KVALUES_NF4, dtype=torch.float32, device=xb.device)
    mids = 0.5 * (values[:-1] + values[1:])
    dh = (xb.abs().amax(dim=1) / 127).to(torch.float16)
    df = dh.to(torch.float32)
    inv = torch.where(df != 0, 1.0 / torch.where(df != 0, df, 1.0), 0.0)
    return dh, torch.searchsorted(mids, (xb * inv[:, None]).contiguous(), right=False)


def quantize_nf4(x: torch.Tensor) -> Quantized:
    """NF4 reference (patch 0004): fp16 absmax/127 scale, nearest int8 NF4 level, ties down."""
    dh, idx = _nf4_levels(x, QK)
    return _finish(x, NF4, [_half_bytes(dh), _pack_nibbles(idx)])


def nf4_round_trip(x: torch.Tensor, block: int = QK) -> torch.Tensor:
    """x through NF4 at any block size, as floats: to measure the block-size choice (ggml's is 32)."""
    dh, idx = _nf4_levels(x, block)
    values = torch.tensor(KVALUES_NF4, dtype=torch.float32, device=idx.device)
    return (dh.float()[:, None] * values[idx]).reshape(x.shape)


QUANTIZERS = {"q8_0": quantize_q8_0, "iq4_nl": quantize_iq4_nl, "nf4": quantize_nf4}
TYPE_OF = {"q8_0": Q8_0, "iq4_nl": IQ4_NL, "nf4": NF4}


def dequantize_torch(q: Quantized) -> torch.Tensor:
    """Float32 (rows, n) of a Quantized tensor, as ggml's to_float computes it."""
    rows, n = q.shape
    b = q.data.reshape(-1, 2 + (QK if q.qtype == Q8_0 else QK // 2))
    d = b[:, :2].contiguous().view(torch.float16).float()
    if q.qtype == Q8_0:
        return (d * b[:, 2:].contiguous().view(torch.int8).float()).reshape(rows, n)
    table = KVALUES_NF4 if q.qtype == NF4 else KVALUES_IQ4NL
    values = torch.tensor(table, dtype=torch.float32, device=b.device)
    return (d * values[_unpack_nibbles(b[:, 2:])]).reshape(rows, n)


def dequantize(data: np.ndarray, qtype) -> np.ndarray:
    """gguf.quants.dequantize plus NF4 (raw GGUF bytes -> float32 in GGUF numpy layout)."""
    if int(qtype) != NF4_ID:
        return gguf.quants.dequantize(data, qtype)
    raw = np.ascontiguousarray(data).view(np.uint8)
    rows = raw.reshape(-1, raw.shape[-1])
    q = Quantized(NF4, torch.from_numpy(rows.copy()), (rows.shape[0], rows.shape[1] // NF4_BYTES * QK))
    out = dequantize_torch(q).numpy()
    return out.reshape(*raw.shape[:-1], raw.shape[-1] // NF4_BYTES * QK)
