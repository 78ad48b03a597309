"""llama.cpp's own quantizers, called from Python: ctypes bindings to the patched build's libggml-base.

The `--size` / `--bpw` plans quantize with exactly the code llama-quantize runs
(`ggml_quantize_chunk`, with an importance matrix), so a dense option here is bit for bit what
`llama-quantize --imatrix` writes for the same weights and statistics, and dequantize through the
type traits' `to_float` (what the CPU backend computes with). Row-size fallbacks follow
llama-quantize's `tensor_type_fallback` (src/llama-quant.cpp of the pinned tree): a type whose block
does not divide the row length is replaced by a 32-block type of similar size, or F16.

    load()                  the library (building or finding the cached patched llama.cpp)
    TYPES                   the type names the plans use -> gguf.GGMLQuantizationType
    fallback(t, n)          the type llama-quantize writes for type t at row length n
    row_size(t, n)          bytes of one row of n values (ggml_row_size)
    quantize(x, t, imatrix) raw blocks (rows, row_size) uint8, multithreaded over rows
    dequantize(data, t, n)  float32 (rows, n)
    vec_dot_type(t)         the type the CPU backend converts a matmul's input to for weight type t
    input_type(t, runtime)  the same for the CPU or the CUDA backend
    as_vec_dot(x, t)        activations x as that conversion leaves them (its rounding error)

Shapes are ggml's row view: a weight (n_out, n_in) has n_out rows of n_in values (ne0 = n_in).
"""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np

from .errors import UserError

T = gguf.GGMLQuantizationType
# Names as llama-quantize spells them (lower case), for the types the size plans choose among.
TYPES: dict[str, T] = {
    "f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q6_k": T.Q6_K, "q5_k": T.Q5_K, "q5_1": T.Q5_1,
    "q5_0": T.Q5_0, "q4_k": T.Q4_K, "q4_1": T.Q4_1, "iq4_xs": T.IQ4_XS, "iq4_nl": T.IQ4_NL, "q4_0": T.Q4_0,
    "q3_k": T.Q3_K,
    "q2_k": T.Q2_K,
}
NAMES: dict[int, str] = {int(v): k for k, v in TYPES.items()}

# src/llama-quant.cpp, tensor_type_fallback (pinned tree): the 32-block type llama-quantize uses when
# a row length is not a multiple of the type's block (256 for the K- and IQ-quants); if that does not
# divide the row either, F16.
FALLBACK: dict[T, T] = {
    T.IQ4_XS: T.IQ4_NL, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}


class _Traits(ctypes.Structure):
    """struct ggml_type_traits (ggml/include/ggml.h of the pinned tree)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_FROM_FLOAT = _TO_FLOAT  # ggml_from_float_t: (const float * x, void * y, int64_t k), the same C signature


class _CpuTraits(ctypes.Structure):
    """struct ggml_type_traits_cpu (ggml/include/ggml-cpu.h of the pinned tree)."""

    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


def type_of(name: str | int | T) -> T:
    """A type name of TYPES (case-insensitive), a ggml type id, or a member -> the member.
    Raises UserError for an unknown name."""
    if isinstance(name, str):
        t = TYPES.get(name.lower())
        if t is None:
            raise UserError(f"unknown ggml type '{name}'; use one of {', '.join(TYPES)}")
        return t
    return T(int(name))


def name_of(t: T | int) -> str:
    """The lower-case name of a type (llama-quantize's spelling), e.g. 'q4_k'."""
    return NAMES.get(int(t), T(int(t)).name.lower())


def block_size(t: T | int) -> int:
    """Values per block (gguf-py's GGML_QUANT_SIZES, the same numbers as ggml's type traits)."""
    return gguf.GGML_QUANT_SIZES[T(int(t))][0]


def fallback(t: T | int | str, n_per_row: int) -> T:
    """The type llama-quantize writes when asked for `t` on rows of `n_per_row` values.

    Rule: src/llama-quant.cpp `tensor_type_fallback` of the pinned llama.cpp: if the block size of
    `t` divides the row, `t`; else the 32-block type of FALLBACK (a 32-block type stays itself);
    if that still does not divide the row, F16. Raises UserError for a 256-block type without a
    fallback (as llama-quantize throws).
    """
    t = type_of(t)
    if n_per_row % block_size(t) == 0:
        return t
    if block_size(t) <= 32:
        out = t
    elif t in FALLBACK:
        out = FALLBACK[t]
    else:
        raise UserError(f"no tensor type fallback is defined for type {name_of(t)}")
    return out if n_per_row % block_size(out) == 0 else T.F16


@functools.cache
def _lib_at(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


@functools.cache
def _cpu_at(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_CpuTraits)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    lib.ggml_cpu_init()  # the fp16 tables its conversions read
    return lib


def _built(name: str, bin_dir: Path | None) -> str:
    """Path of library `name` in `bin_dir` (default: llamacpp.build(), which finds the cached build
    or builds it). Raises UserError when it is missing there."""
    if bin_dir is None:
        from . import llamacpp

        bin_dir = llamacpp.build()
    path = Path(bin_dir) / name
    if not path.is_file():
        raise UserError(f"{path} not found: build llama.cpp first (asvd2gguf build-llama)")
    return str(path)


def load_cpu(bin_dir: Path | None = None) -> ctypes.CDLL:
    """libggml-cpu of the patched llama.cpp in `bin_dir` (default: the current build): the CPU
    backend's own type traits. Raises UserError when the library is missing there."""
    return _cpu_at(_built("libggml-cpu.so", bin_dir))


def load(bin_dir: Path | None = None) -> ctypes.CDLL:
    """libggml-base of the patched llama.cpp in `bin_dir` (default: the current build). Raises
    UserError when the library is missing there."""
    return _lib_at(_built("libggml-base.so", bin_dir))


def row_size(t: T | int | str, n_per_row: int, lib: ctypes.CDLL | None = None) -> int:
    """Bytes of one row of `n_per_row` values in type `t` (ggml_row_size; with no library, from
    gguf-py's GGML_QUANT_SIZES, the same numbers). Raises ValueError when the block does not
    divide the row."""
    t = type_of(t)
    blk, nbytes = gguf.GGML_QUANT_SIZES[t]
    if n_per_row % blk:
        raise ValueError(f"row length {n_per_row} is not a multiple of {name_of(t)}'s block {blk}")
    return int(lib.ggml_row_size(int(t), n_per_row)) if lib is not None else n_per_row // blk * nbytes


def dense_bytes(m: int, n: int, qtype: str) -> tuple[int, str]:
    """(bytes, type written) of an m x n weight (m rows of n values) asked at `qtype`: llama-quantize's
    row-size fallback applied."""
    tt = fallback(qtype, n)
    return m * row_size(tt, n), name_of(tt)


def pair_bytes(m: int, n: int, r: int, qtype: str) -> tuple[int, tuple[str, str]]:
    """(bytes, (A's type, B's type)) of the factor pair A (m, r), B (r, n) asked at `qtype` (each
    factor with its own row-size fallback: A's rows hold r values, B's n)."""
    ta, tb = fallback(qtype, r), fallback(qtype, n)
    return m * row_size(ta, r) + r * row_size(tb, n), (name_of(ta), name_of(tb))


def requires_imatrix(t: T | int | str, lib: ctypes.CDLL) -> bool:
    """ggml_quantize_requires_imatrix: whether `t` cannot be quantized without an importance matrix."""
    return bool(lib.ggml_quantize_requires_imatrix(int(type_of(t))))


def _threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def quantize(x: np.ndarray, t: T | int | str, imatrix: np.ndarray | None = None, lib: ctypes.CDLL | None = None,
             threads: int | None = None) -> np.ndarray:
    """`x` (rows, n) float in type `t`: the raw blocks, uint8 (rows, row_size(t, n)).

    ggml_quantize_chunk over row chunks (one per thread: ctypes releases the GIL), the call
    llama-quantize makes (llama_tensor_quantize_impl). `imatrix` (n,) float32: the per-input-column
    importance (llama.cpp's imatrix: the mean of x^2 per column); None quantizes without one. The
    type must fit the row (apply `fallback` first). Raises ValueError for a row length the type does
    not divide, a wrong imatrix length, or a type that needs an imatrix and got none.
    """
    lib = lib or load()
    t = type_of(t)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize takes a 2-D array, got shape {x.shape}")
    rows, n = x.shape
    rs = row_size(t, n, lib)
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n,):
            raise ValueError(f"imatrix has shape {imatrix.shape}, expected ({n},)")
    elif requires_imatrix(t, lib):
        raise ValueError(f"type {name_of(t)} needs an imatrix")
    out = np.empty((rows, rs), dtype=np.uint8)
    im_ptr = imatrix.ctypes.data if imatrix is not None else None
    nthr = min(threads or _threads(), max(1, rows // 16))
    bounds = np.linspace(0, rows, nthr + 1).astype(int)

    def part(k: int) -> int:
        r0, r1 = int(bounds[k]), int(bounds[k + 1])
        if r1 == r0:
            return 0
        return lib.ggml_quantize_chunk(int(t), x.ctypes.data + r0 * n * 4, out.ctypes.data + r0 * rs, 0, r1 - r0, n,
                                       im_ptr)

    if nthr == 1:
        got = part(0)
    else:
        with ThreadPoolExecutor(nthr) as pool:
            got = sum(pool.map(part, range(nthr)))
    if got != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {got} bytes, expected {out.nbytes}")
    return out


def dequantize(data: np.ndarray, t: T | int | str, n_per_row: int, lib: ctypes.CDLL | None = None) -> np.ndarray:
    """Raw blocks `data` (rows, row_size) of type `t` -> float32 (rows, n_per_row), through the type
    traits' to_float (what ggml's CPU backend dequantizes with). Raises ValueError when the byte
    count does not match."""
    lib = lib or load()
    t = type_of(t)
    data = np.ascontiguousarray(data).view(np.uint8)
    rs = row_size(t, n_per_row, lib)
    if data.size % rs:
        raise ValueError(f"{data.size} bytes are not whole rows of {rs} bytes")
    rows = data.size // rs
    out = np.empty((rows, n_per_row), dtype=np.float32)
    if t == T.F32:
        out[:] = data.view(np.float32).reshape(rows, n_per_row)
        return out
    fn = _TO_FLOAT(lib.ggml_get_type_traits(int(t)).contents.to_float)
    fn(data.ctypes.data, out.ctypes.data, out.size)
    return out


def vec_dot_type(t: T | int | str, cpu: ctypes.CDLL | None = None) -> T:
    """The type the CPU backend converts a matmul's activations to before the dot products with a
    weight of type `t` (its type traits' vec_dot_type: Q8_0 for Q4_0/Q5_0/Q8_0/IQ4_NL, Q8_1 for
    Q4_1/Q5_1, Q8_K for the K-quants and IQ4_XS, F16 for F16). ggml-cpu.c of the pinned tree."""
    cpu = cpu or load_cpu()
    return T(cpu.ggml_get_type_traits_cpu(int(type_of(t))).contents.vec_dot_type)


# backends a size plan can price the input rounding of (input_type)
RUNTIMES = ("cpu", "cuda")


def input_type(t: T | int | str, runtime: str = "cpu", cpu: ctypes.CDLL | None = None) -> T:
    """The type `runtime`'s matmul rounds its input to for a weight of type `t` (as_vec_dot gives
    that rounding). cpu: the type traits' vec_dot_type (vec_dot_type). cuda: the pinned tree's
    MMQ and MMVQ kernels (ggml-cuda/mmq.cu, quantize.cu) read the input of every quantized type
    as int8 with one scale per 32 values, amax / 127 and round-to-nearest: Q8_0's values (Q2_K's
    MMQ layout shares a scale over 64, which Q8_0 underestimates slightly); a float weight keeps
    its own type (cuBLAS in F16). ValueError for another runtime."""
    if runtime == "cpu":
        return vec_dot_type(t, cpu)
    if runtime != "cuda":
        raise ValueError(f"unknown runtime '{runtime}'; known: {', '.join(RUNTIMES)}")
    tt = type_of(t)
    return vec_dot_type(tt, cpu) if tt in (T.F32, T.F16, T.BF16) else T.Q8_0


# the 8-bit activation types' blocks (ggml-common.h): (values per block, scale dtype, bytes before the quants)
_ACT_BLOCKS = {T.Q8_0: (32, np.float16, 2), T.Q8_1: (32, np.float16, 4), T.Q8_K: (256, np.float32, 4)}


def as_vec_dot(x: np.ndarray, vt: T | int | str, cpu: ctypes.CDLL | None = None) -> np.ndarray:
    """Activations `x` (rows, n) float32 after the CPU backend's conversion to the vec-dot type `vt`
    (its from_float, the code the matmul runs) and back: float32 (rows, n). For an 8-bit type
    (Q8_0, Q8_1, Q8_K) the values are d * q per block; a float type returns `x` at that type.
    Raises ValueError when the block does not divide n or `vt` is none of these."""
    cpu = cpu or load_cpu()
    vt = T(int(vt)) if not isinstance(vt, str) else type_of(vt)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if vt in (T.F32, T.F16, T.BF16):
        if vt == T.F16:
            return x.astype(np.float16).astype(np.float32)
        return x if vt == T.F32 else dequantize(gguf.quants.quantize(x, T.BF16), T.BF16, x.shape[1])
    if vt not in _ACT_BLOCKS:
        raise ValueError(f"no activation round trip for {vt.name}")
    blk, scale_t, head = _ACT_BLOCKS[vt]
    rows, n = x.shape
    if n % blk:
        raise ValueError(f"row length {n} is not a multiple of {vt.name}'s block {blk}")
    size = int(load().ggml_row_size(int(vt), blk))  # the tree's block bytes (gguf-py's Q8_1 entry is an older layout)
    raw = np.empty((rows * n // blk, size), dtype=np.uint8)
    fn = _FROM_FLOAT(cpu.ggml_get_type_traits_cpu(int(vt)).contents.from_float)
    fn(x.ctypes.data, raw.ctypes.data, x.size)
    d = raw[:, :np.dtype(scale_t).itemsize].copy().view(scale_t).astype(np.float32)
    q = raw[:, head:head + blk].view(np.int8).astype(np.float32)
    return (d * q).reshape(rows, n)


def round_trip(x: np.ndarray, t: T | int | str, imatrix: np.ndarray | None = None,
               lib: ctypes.CDLL | None = None) -> tuple[np.ndarray, np.ndarray, T]:
    """`x` (rows, n) at llama-quantize's type for `t` (after `fallback`): (raw blocks, the values the
    runtime computes with (rows, n) float32, the type written)."""
    lib = lib or load()
    tt = fallback(t, x.shape[1])
    data = quantize(x, tt, imatrix, lib)
    return data, dequantize(data, tt, x.shape[1], lib), tt
