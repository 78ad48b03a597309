"""NF4 in the patched llama.cpp (patches/0004-ggml-nf4-type.patch, ggml_ops/ggml-nf4.*, docs/runtime.md "NF4").

What is checked here:
- the type numbers (GGML_TYPE_NF4 = 64, LLAMA_FTYPE_MOSTLY_NF4 = 64) and that the patch removes
  no line of stock code (the IQ4_NL codebook and kernels are byte-identical to the pristine tree);
- ggml_quantize_chunk(GGML_TYPE_NF4) and ggml_get_type_traits(GGML_TYPE_NF4)->to_float from the
  built libggml-base.so, bit for bit, against an independent numpy implementation of the spec, and
  the tree's own gguf-py NF4 class against the C code;
- the imatrix path (weighted scale search) never loses to the reference on its weighted error;
- ggml's own tests: test-quantize-fns (quantization error, reference vs CPU from_float, CPU dot
  product vs float) and test-backend-ops -b CPU for MUL_MAT / GET_ROWS / CPY / SET_ROWS with nf4;
- llama-quantize NF4 on an F16 factored tiny model (perplexity close to F16) and its fallback for
  rows not divisible by 32;
- stock IQ4_NL unchanged: llama-quantize IQ4_NL writes exactly the bytes of the pristine
  quantize_iq4_nl (compiled from the untouched tree), and, when a build without patch 0004 is
  still cached, the same file and the same perplexity as that build;
- the changed CUDA files compile with nvcc (scripts/check_cuda.sh).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_fixtures as fx  # noqa: E402

from asvd2gguf import llamacpp  # noqa: E402
from asvd2gguf.ggml_quants import NF4_ID  # noqa: E402
from asvd2gguf.llamacpp_tree import source_tree  # noqa: E402

pytestmark = pytest.mark.llama

REPO = Path(__file__).resolve().parents[1]
NF4, IQ4_NL = NF4_ID, 20
KVALUES_NF4 = np.array([-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127], dtype=np.float32)
MIDS = (np.float32(0.5) * (KVALUES_NF4[:-1] + KVALUES_NF4[1:])).astype(np.float32)


# ---------------------------------------------------------------- the spec, independently of the C code


def nf4_quantize_ref(x: np.ndarray) -> np.ndarray:
    """The reference rule of the spec, in float32: blocks of 32 -> 18 bytes each."""
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 32)
    amax = np.max(np.abs(blocks), axis=1)
    dh = (amax / np.float32(127.0)).astype(np.float16)
    df = dh.astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(df != 0, np.float32(1.0) / df, np.float32(0.0)).astype(np.float32)
    v = blocks * inv[:, None]
    L = np.zeros(blocks.shape, np.uint8)
    for m in MIDS:  # the number of midpoints strictly below v
        L += (m < v).astype(np.uint8)
    qs = L[:, :16] | (L[:, 16:] << 4)
    return np.concatenate([dh.view(np.uint8).reshape(-1, 2), qs], axis=1).reshape(-1)


def nf4_dequantize_ref(q: np.ndarray) -> np.ndarray:
    b = q.reshape(-1, 18)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    qs = b[:, 2:]
    L = np.concatenate([qs & 0xF, qs >> 4], axis=1)
    return (d * KVALUES_NF4[L]).reshape(-1).astype(np.float32)


def test_spec_codebook_is_qlora_nf4_times_127():
    qlora = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
    assert [int(round(v * 127)) for v in qlora] == KVALUES_NF4.astype(int).tolist()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def bins() -> Path:
    return llamacpp.build()


@pytest.fixture(scope="session")
def test_bins() -> Path:
    return llamacpp.build(tests=True)


@pytest.fixture(scope="session")
def src() -> Path:
    return llamacpp.patched_source()


class GgmlBase:
    """ctypes view of the patched libggml-base.so."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        lib = self.lib
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = (ctypes.c_int,)
        lib.ggml_type_name.restype = ctypes.c_char_p
        lib.ggml_type_name.argtypes = (ctypes.c_int,)
        lib.ggml_blck_size.restype = ctypes.c_int64
        lib.ggml_blck_size.argtypes = (ctypes.c_int,)
        lib.ggml_type_size.restype = ctypes.c_size_t
        lib.ggml_type_size.argtypes = (ctypes.c_int,)
        lib.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
        lib.ggml_get_type_traits.argtypes = (ctypes.c_int,)

    def quantize(self, x: np.ndarray, qtype: int, imatrix: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        nrows, n = x.shape
        out = np.zeros(nrows * n // 32 * (34 if qtype == 8 else 18), np.uint8)
        qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        size = self.lib.ggml_quantize_chunk(qtype, x.ctypes.data, out.ctypes.data, 0, nrows, n,
                                            None if qw is None else qw.ctypes.data)
        assert size == out.size
        return out

    def to_float(self, q: np.ndarray, qtype: int) -> np.ndarray:
        tr = self.lib.ggml_get_type_traits(qtype).contents
        n = q.size // tr.type_size * tr.blck_size
        out = np.zeros(n, np.float32)
        fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(tr.to_float)
        fn(np.ascontiguousarray(q).ctypes.data, out.ctypes.data, n)
        return out


class TypeTraits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


@pytest.fixture(scope="session")
def ggml(bins) -> GgmlBase:
    return GgmlBase(bins / "libggml-base.so")


@pytest.fixture(scope="session")
def tiny_f16(tmp_path_factory) -> dict:
    """A tiny llama (dense F32), its F16 factored file with ranks 32 (every linear), and one with
    rank 48 (the A factors' rows are 48 wide: not a multiple of 32)."""
    root = tmp_path_factory.mktemp("nf4")
    dense = fx.write_tiny("llama", root / "tiny.gguf")
    lr32 = fx.write_factored(dense, root / "lr32-f16.gguf", rank=lambda b, il, s: 32, outtype="f16")
    lr48 = fx.write_factored(dense, root / "lr48-f16.gguf", rank=lambda b, il, s: 48, outtype="f16")
    return {"dense": dense, "lr32": lr32, "lr48": lr48, "root": root}



def quantize_file(bins: Path, src: Path, dst: Path, qtype: str, *extra: str) -> str:
    res = subprocess.run([str(bins / "llama-quantize"), *extra, str(src), str(dst), qtype, "2"],
                         capture_output=True, text=True, errors="replace", timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    return out


def run_ppl(bin_dir: Path, model: Path, text: Path, *extra: str) -> tuple[float, str, dict]:
    """llama-perplexity of bin_dir on model (ctx 128, 3 chunks): (perplexity, output, parsed numbers)."""
    res = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "128",
                          "--chunks", "3", "-t", "2", *extra], capture_output=True, text=True, errors="replace",
                         timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    nums = llamacpp.parse_perplexity(out)
    return nums.get("ppl", float("nan")), out, nums


# ---------------------------------------------------------------- type numbers and stock code untouched


def test_type_numbers(src, ggml):
    ggml_h = (src / "ggml/include/ggml.h").read_text()
    assert NF4 == 64
    assert re.search(r"GGML_TYPE_NF4\s*=\s*64,", ggml_h) and re.search(r"GGML_TYPE_COUNT\s*=\s*65,", ggml_h)
    assert re.search(r"LLAMA_FTYPE_MOSTLY_NF4\s*=\s*64,", (src / "include/llama.h").read_text())
    assert ggml.lib.ggml_type_name(NF4) == b"nf4"
    assert ggml.lib.ggml_blck_size(NF4) == 32 and ggml.lib.ggml_type_size(NF4) == 18
    assert not ggml.lib.ggml_quantize_requires_imatrix(NF4)
    assert ggml.lib.ggml_get_type_traits(NF4).contents.is_quantized


def test_patch_removes_no_stock_code():
    """0004 only adds lines, except the type count and two tolerance conditions of test-backend-ops
    that now name NF4 too: no line of ggml's IQ4_NL (or any other) code is changed."""
    patch = (REPO / "patches" / "0004-ggml-nf4-type.patch").read_text()
    diff = patch[patch.index("\ndiff --git "):]
    removed = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    assert removed == [
        "GGML_TYPE_COUNT   = 43,",
        "type_dst == GGML_TYPE_IQ4_NL ||",
        "if (type_dst == GGML_TYPE_IQ4_NL) {",
        "// iq4_nl values are a bit more spread out",
    ], removed


def test_iq4nl_codebook_identical_to_pristine(src):
    pat = re.compile(r"GGML_TABLE_BEGIN\(int8_t, kvalues_iq4nl, 16\).*?GGML_TABLE_END\(\)", re.S)
    ours = pat.search((src / "ggml/src/ggml-common.h").read_text()).group(0)
    stock = pat.search((source_tree() / "ggml/src/ggml-common.h").read_text()).group(0)
    assert ours == stock
    for rel in ("ggml/src/ggml-quants.c",):
        a = (src / rel).read_text()
        b = (source_tree() / rel).read_text()
        for fn in ("quantize_row_iq4_nl_impl", "dequantize_row_iq4_nl", "quantize_iq4_nl"):
            assert _c_function(a, fn) == _c_function(b, fn)


def _c_function(text: str, name: str) -> str:
    i = text.index(name + "(")
    start = text.rfind("\n", 0, i)
    depth, j = 0, text.index("{", i)
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[start:k + 1]
    raise AssertionError(name)


# ---------------------------------------------------------------- the C reference against the spec


def _spec_data(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((64, 512)).astype(np.float32)
    x[0, :32] = 0                                      # zero block
    x[1, :32] *= np.float32(1e-6)                      # subnormal fp16 scales
    x[2, :32] *= np.float32(3e5)                       # large values
    # midpoint ties: amax 127 -> d = 1 exactly, so x/d hits each midpoint (lower index wins)
    x[3, :32] = np.concatenate([[127.0], MIDS, MIDS[::-1], [0.0]]).astype(np.float32)
    x[4, :32] = KVALUES_NF4[rng.integers(0, 16, 32)] * np.float32(0.37)   # exact codebook multiples
    x[5, :32] = np.float32(-2.5)                       # constant block
    return x


def test_nf4_quantize_chunk_bit_exact_with_spec(ggml):
    x = _spec_data(np.random.default_rng(7))
    c = ggml.quantize(x, NF4)
    ref = nf4_quantize_ref(x)
    assert np.array_equal(c, ref), f"{np.count_nonzero(c.reshape(-1, 18) != ref.reshape(-1, 18))} bytes differ"
    # the tie block (row 3, block 0): every midpoint maps to the lower of its two codes
    blk = c.reshape(-1, 18)[3 * 16]
    L = np.concatenate([blk[2:] & 0xF, blk[2:] >> 4]).tolist()
    assert blk[:2].view(np.float16)[0] == 1.0
    assert L == [15] + list(range(15)) + list(range(14, -1, -1)) + [7]


def test_nf4_to_float_matches_spec(ggml):
    rng = np.random.default_rng(8)
    q = ggml.quantize(_spec_data(rng), NF4)
    assert np.array_equal(ggml.to_float(q, NF4), nf4_dequantize_ref(q))
    # any bytes (random scales and codes), not only quantizer output
    rnd = rng.integers(0, 256, size=18 * 4096, dtype=np.uint8).reshape(-1, 18)
    rnd[:, :2] = rng.standard_normal((4096, 1)).astype(np.float16).view(np.uint8)
    rnd = rnd.reshape(-1)
    assert np.array_equal(ggml.to_float(rnd, NF4), nf4_dequantize_ref(rnd))
    # the relative RMSE on Gaussian data is the design note's (block 32: about 8.7%)
    g = rng.standard_normal((256, 4096)).astype(np.float32)
    y = ggml.to_float(ggml.quantize(g, NF4), NF4).reshape(g.shape)
    rel = np.sqrt(np.mean((y - g) ** 2) / np.mean(g ** 2))
    assert 0.08 < rel < 0.095, rel


def test_tree_gguf_py_nf4_matches_c(src, ggml, tmp_path):
    """The patched tree's gguf-py (GGMLQuantizationType.NF4, quants.NF4) against the C code."""
    x = _spec_data(np.random.default_rng(9))
    np.save(tmp_path / "x.npy", x)
    code = ("import numpy as np, gguf, sys; x = np.load(sys.argv[1]);"
            "q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.NF4);"
            "np.save(sys.argv[2], q); np.save(sys.argv[3], gguf.quants.dequantize(q, gguf.GGMLQuantizationType.NF4));"
            "assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.NF4] == (32, 18);"
            "assert gguf.LlamaFileType.MOSTLY_NF4 == 64 and gguf.GGMLQuantizationType.NF4 == 64")
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    files = [str(tmp_path / f"{n}.npy") for n in ("x", "q", "y")]
    subprocess.run([sys.executable, "-c", code, *files], check=True, env=env, timeout=120)
    q = np.load(tmp_path / "q.npy").reshape(-1)
    assert np.array_equal(q, ggml.quantize(x, NF4))
    assert np.array_equal(np.load(tmp_path / "y.npy").reshape(-1), ggml.to_float(q, NF4))


def test_nf4_imatrix_search_not_worse(ggml):
    """With quant_weights the scale search may differ from the reference but must not be worse in
    the weighted error it minimises; without them it is exactly the reference."""
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((64, 1024)) * rng.uniform(0.5, 2, (1, 1024))).astype(np.float32)
    imat = rng.uniform(0.1, 10, 1024).astype(np.float32)
    q_ref = ggml.quantize(x, NF4)
    q_w = ggml.quantize(x, NF4, imat)
    assert not np.array_equal(q_ref, q_w)
    sigma2 = 2 * np.mean(x.reshape(64, -1, 32) ** 2, axis=2, keepdims=True)
    w = imat.reshape(1, -1, 32) * np.sqrt(sigma2 + x.reshape(64, -1, 32) ** 2)
    err = {}
    for name, q in (("ref", q_ref), ("imatrix", q_w)):
        y = ggml.to_float(q, NF4).reshape(64, -1, 32)
        err[name] = float(np.sum(w * (y - x.reshape(64, -1, 32)) ** 2))
    assert err["imatrix"] < err["ref"] * 0.97, err


class CpuTypeTraits(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


def test_cpu_vec_dot_matches_dequantized(bins, ggml):
    """The CPU backend's NF4 dot product (AVX2 / NEON / scalar, whichever this machine built)
    equals the float64 dot product of the dequantized operands (NF4 x Q8_0) up to float rounding,
    for block counts with and without the odd tail block; from_float equals the reference."""
    cpu = ctypes.CDLL(str(bins / "libggml-cpu.so"))
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(CpuTypeTraits)
    cpu.ggml_get_type_traits_cpu.argtypes = (ctypes.c_int,)
    cpu.ggml_cpu_init()
    tr = cpu.ggml_get_type_traits_cpu(NF4).contents
    assert tr.vec_dot_type == 8 and tr.nrows == 1  # Q8_0
    vec_dot = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t, ctypes.c_void_p,
                               ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)(tr.vec_dot)
    from_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(tr.from_float)
    rng = np.random.default_rng(12)
    for n in (32, 64, 96, 4096, 4128):
        x = rng.standard_normal((1, n)).astype(np.float32)
        y = rng.standard_normal((1, n)).astype(np.float32)
        qx, qy = ggml.quantize(x, NF4), ggml.quantize(y, 8)
        qx_cpu = np.zeros_like(qx)
        from_float(x.ctypes.data, qx_cpu.ctypes.data, n)
        assert np.array_equal(qx_cpu, qx)
        s = ctypes.c_float()
        vec_dot(n, ctypes.byref(s), 0, qx.ctypes.data, 0, qy.ctypes.data, 0, 1)
        ref = np.dot(ggml.to_float(qx, NF4).astype(np.float64), ggml.to_float(qy, 8).astype(np.float64))
        assert abs(s.value - ref) <= 1e-5 * max(1.0, np.sum(np.abs(x)) * np.max(np.abs(y))), (n, s.value, ref)


# ---------------------------------------------------------------- ggml's own tests


def test_quantize_fns_nf4(test_bins):
    """test-quantize-fns validates, for every type, the CPU from_float against the reference, the
    quantize/dequantize error against a bound and the CPU dot product against the float one."""
    res = subprocess.run([str(test_bins / "test-quantize-fns"), "-v"], capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    lines = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("nf4 ")]
    print("\n".join(lines))
    assert res.returncode == 0, out[-3000:]
    assert "Testing nf4" in out and len(lines) == 3 and all(" ok " in ln for ln in lines), lines


@pytest.mark.parametrize("op, params", [
    ("MUL_MAT", "type_a=nf4"),
    ("MUL_MAT_ID", "type_a=nf4"),
    ("GET_ROWS", "type=nf4"),
    ("CPY", "nf4"),
    ("SET_ROWS", "type_dst=nf4"),
])
def test_backend_ops_nf4_cpu(test_bins, op, params):
    """test-backend-ops in test mode with -b CPU: the CPU backend against the CPU backend in its
    reference mode. It proves the op is supported for nf4 and runs (no abort, finite, same result)."""
    res = subprocess.run([str(test_bins / "test-backend-ops"), "test", "-b", "CPU", "-o", op, "-p", params],
                         capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    m = re.search(r"(\d+)/(\d+) tests passed", out)
    print(op, params, m.group(0) if m else out[-500:])
    assert res.returncode == 0, out[-3000:]
    assert m and int(m.group(1)) == int(m.group(2)) > 0, out[-2000:]
    assert "not supported" not in out


# ---------------------------------------------------------------- llama-quantize NF4


@pytest.fixture(scope="session")
def nf4_files(bins, tiny_f16):
    root = tiny_f16["root"]
    out = {}
    out["log32"] = quantize_file(bins, tiny_f16["lr32"], root / "lr32-nf4.gguf", "NF4")
    out["lr32"] = root / "lr32-nf4.gguf"
    out["log48"] = quantize_file(bins, tiny_f16["lr48"], root / "lr48-nf4.gguf", "NF4")
    out["lr48"] = root / "lr48-nf4.gguf"
    return out


def test_llama_quantize_nf4_factored(bins, tiny_f16, nf4_files, text_small):
    """NF4 of an F16 factored file: loads as NF4, perplexity finite and close to the F16 file's,
    KL divergence from it of the order of IQ4_NL's (the same 4.5 bpw budget)."""
    log = nf4_files["log32"]
    n_nf4 = len(re.findall(r"converting to nf4", log))
    assert n_nf4 >= 2 * 7 * 2, log[-2000:]  # both factors of the 7 linears of both layers
    root = tiny_f16["root"]
    base = root / "lr32-f16.kld"
    f16, _, _ = run_ppl(bins, tiny_f16["lr32"], text_small, "--kl-divergence-base", str(base))
    iq4 = root / "lr32-iq4nl-mix.gguf"
    quantize_file(bins, tiny_f16["lr32"], iq4, "IQ4_NL")
    nf4, out, r_nf4 = run_ppl(bins, nf4_files["lr32"], text_small, "-lv", "4", "--kl-divergence-base", str(base),
                              "--kl-divergence")
    _, _, r_iq4 = run_ppl(bins, iq4, text_small, "--kl-divergence-base", str(base), "--kl-divergence")
    assert "file type   = NF4 - 4.5 bpw" in out
    assert re.search(r"type +nf4: +\d+ tensors", out), out[-3000:]
    print(f"tiny llama rank-32 factored: F16 ppl {f16:.1f}; NF4 ppl {nf4:.1f}, KLD {r_nf4['kld']:.4f}; "
          f"IQ4_NL ppl {r_iq4['ppl']:.1f}, KLD {r_iq4['kld']:.4f}")
    assert np.isfinite(nf4) and abs(nf4 / f16 - 1) < 0.1
    assert r_nf4["kld"] < 1.3 * r_iq4["kld"]


def test_nf4_batched_matmul_matches_single_token(bins, nf4_files, text_small, tmp_path):
    """Prompt batches go through llamafile's tinyBLAS NF4 path, single tokens (-ub 1) through
    ggml_vec_dot_nf4_q8_0 (checked above against numpy): the two must agree to rounding."""
    base = tmp_path / "nf4-ub1.kld"
    run_ppl(bins, nf4_files["lr32"], text_small, "-b", "1", "-ub", "1", "--kl-divergence-base", str(base))
    _, _, r = run_ppl(bins, nf4_files["lr32"], text_small, "--kl-divergence-base", str(base), "--kl-divergence")
    print(f"NF4 batched vs single-token: mean KLD {r['kld']:.2e}, max {r['kld_max']:.2e}")
    assert r["kld"] < 1e-3 and r["kld_max"] < 1e-2, r


def test_llama_quantize_nf4_fallback(bins, tiny_f16, nf4_files, text_small):
    log = nf4_files["log48"]
    fallbacks = re.findall(r"(blk\.\d+\.\w+\.lr_out\.weight) +- ncols +48 not divisible by +32 "
                           r"\(required for type +nf4\).*?-> falling back to +f16", log)
    print(f"{len(fallbacks)} fallbacks, e.g. {fallbacks[:2]}")
    assert len(fallbacks) == 2 * 7, log[-3000:]
    assert np.isfinite(run_ppl(bins, nf4_files["lr48"], text_small)[0])


# ---------------------------------------------------------------- IQ4_NL unchanged


PRISTINE_STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "%s:%d %s\n", file, line, fmt);
    abort();
}
size_t ggml_row_size(int type, int64_t ne) { (void) type; (void) ne; abort(); }
size_t ggml_type_size(int type) { (void) type; abort(); }
const char * ggml_type_name(int type) { (void) type; return "?"; }
"""


@pytest.fixture(scope="session")
def pristine_quants(tmp_path_factory) -> ctypes.CDLL:
    """quantize_iq4_nl of the untouched tree: its ggml-quants.c compiled alone into a small .so
    with the flags ggml-base uses (-O3 -std=gnu11, no -march), symbols bound locally."""
    cc = os.environ.get("CC", "cc")
    tree = source_tree()
    d = tmp_path_factory.mktemp("pristine")
    (d / "stubs.c").write_text(PRISTINE_STUBS)
    so = d / "libpristine_quants.so"
    subprocess.run([cc, "-O3", "-std=gnu11", "-fPIC", "-shared", "-DNDEBUG", "-D_GNU_SOURCE", "-D_XOPEN_SOURCE=600",
                    "-DGGML_SCHED_MAX_COPIES=4", "-Wl,-Bsymbolic", "-I", str(tree / "ggml/src"),
                    "-I", str(tree / "ggml/include"), str(tree / "ggml/src/ggml-quants.c"), str(d / "stubs.c"),
                    "-o", str(so), "-lm"], check=True, capture_output=True, timeout=300)
    lib = ctypes.CDLL(str(so))
    lib.quantize_iq4_nl.restype = ctypes.c_size_t
    lib.quantize_iq4_nl.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
    return lib


def test_iq4nl_chunk_matches_pristine(ggml, pristine_quants):
    x = _spec_data(np.random.default_rng(11))
    ours = ggml.quantize(x, IQ4_NL)
    stock = np.zeros_like(ours)
    pristine_quants.quantize_iq4_nl(x.ctypes.data, stock.ctypes.data, x.shape[0], x.shape[1], None)
    assert np.array_equal(ours, stock)


def test_llama_quantize_iq4nl_bytes_match_pristine(bins, tiny_f16, pristine_quants, text_small):
    import gguf

    root = tiny_f16["root"]
    out = root / "lr32-iq4nl.gguf"
    quantize_file(bins, tiny_f16["lr32"], out, "IQ4_NL", "--pure")
    srcr = gguf.GGUFReader(str(tiny_f16["lr32"]))
    src_t = {t.name: np.asarray(t.data) for t in srcr.tensors}
    n = 0
    for t in gguf.GGUFReader(str(out)).tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.IQ4_NL:
            continue
        x = np.ascontiguousarray(src_t[t.name], dtype=np.float32)  # F16 -> F32 is exact, as in llama-quantize
        x = x.reshape(-1, x.shape[-1])
        stock = np.zeros(x.shape[0] * x.shape[1] // 32 * 18, np.uint8)
        pristine_quants.quantize_iq4_nl(x.ctypes.data, stock.ctypes.data, x.shape[0], x.shape[1], None)
        assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), stock), t.name
        n += 1
    assert n >= 2 * 7 * 2
    assert np.isfinite(run_ppl(bins, out, text_small)[0])


def _build_without_0004() -> Path | None:
    """A cached CPU build of this tree whose patch list has no 0004 (e.g. the build before NF4)."""
    base = llamacpp.cache_root() / "llama.cpp"
    for stamp in sorted(base.glob("*-cpu-*/src/.asvd2gguf-patched")):
        try:
            names = json.loads(stamp.read_text())
        except ValueError:
            continue
        bin_dir = stamp.parent.parent / "build" / "bin"
        if names and not any(n.startswith("0004") for n in names) and (bin_dir / "llama-quantize").is_file() \
                and (bin_dir / "llama-perplexity").is_file():
            return bin_dir
    return None


def test_iq4nl_same_as_build_without_nf4(bins, tiny_f16, text_small):
    old = _build_without_0004()
    if old is None:
        pytest.skip("no cached build without patch 0004 (the pristine-quantizer test above covers IQ4_NL bytes)")
    root = tiny_f16["root"]
    a, b = root / "iq4nl-new.gguf", root / "iq4nl-old.gguf"
    quantize_file(bins, tiny_f16["lr32"], a, "IQ4_NL")
    quantize_file(old, tiny_f16["lr32"], b, "IQ4_NL")
    assert a.read_bytes() == b.read_bytes()
    outs = [run_ppl(bin_dir, a, text_small)[0] for bin_dir in (bins, old)]
    print(f"IQ4_NL tiny model perplexity: patched {outs[0]}, without 0004 {outs[1]} ({old})")
    assert outs[0] == outs[1]


# ---------------------------------------------------------------- CUDA: compile check


def test_cuda_sources_compile(src):
    res = subprocess.run(["bash", str(REPO / "scripts" / "check_cuda.sh"), str(src)], capture_output=True, text=True,
                         timeout=3000)
    out = res.stdout + res.stderr
    print(out)
    if res.returncode == 0 and "SKIP:" in out:
        pytest.skip(out.strip().splitlines()[-1])
    assert res.returncode == 0 and "CUDA check OK" in out, out[-3000:]
