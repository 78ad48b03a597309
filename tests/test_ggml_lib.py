"""llama.cpp's quantizers through ctypes (asvd2gguf.ggml_lib) against gguf-py and our own Q8_0.

The library is the patched build's libggml-base.so (the `bins` fixture: llamacpp.build(), cached).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from asvd2gguf import ggml_lib as G
from asvd2gguf import ggml_quants as Q
from asvd2gguf.errors import UserError

pytestmark = pytest.mark.llama

T = gguf.GGMLQuantizationType
PLAN_TYPES = ("f16", "q8_0", "q6_k", "q5_k", "q4_k", "iq4_xs", "q3_k", "q2_k", "q5_0", "q5_1", "q4_1", "iq4_nl",
              "q4_0")


@pytest.fixture(scope="module")
def lib(bins):
    return G.load(bins)


def _matrix(rows: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, n)) * np.logspace(-2, 1, rows)[:, None]).astype(np.float32)
    x[1, :40] = 0.0  # an all-zero block
    imatrix = (rng.random(n) ** 3 + 1e-3).astype(np.float32)  # very unequal column importances
    return x, imatrix


@pytest.mark.parametrize("name", PLAN_TYPES)
@pytest.mark.parametrize("n", [256, 512, 96])
def test_round_trip_matches_gguf_py(lib, name, n):
    x, im = _matrix(6, n)
    data, y, tt = G.round_trip(x, name, im, lib)
    assert tt == G.fallback(name, n)
    # bytes per row: what gguf-py's table says for the written type
    blk, nbytes = gguf.GGML_QUANT_SIZES[tt]
    assert data.shape == (6, n // blk * nbytes)
    assert G.row_size(tt, n, lib) == G.row_size(tt, n) == n // blk * nbytes
    # values: gguf-py's numpy dequantizer reads the same bytes to the same floats
    ref = gguf.quants.dequantize(data, tt).reshape(6, n)
    np.testing.assert_array_equal(y, ref)
    # and they approximate the input: relative error shrinks with the bits
    rel = float(((y - x) ** 2).sum() / (x ** 2).sum())
    assert rel < {"f16": 1e-6, "q8_0": 1e-4}.get(G.name_of(tt), 0.2)


def test_fallback_table_is_llama_quantize_s():
    # src/llama-quant.cpp tensor_type_fallback: 576 = 2.25 x 256 (SmolLM2's width) is a multiple of 32 only
    assert {k: G.name_of(G.fallback(k, 576)) for k in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs")} == {
        "q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl"}
    assert all(G.fallback(k, 512) == G.type_of(k) for k in PLAN_TYPES)
    assert G.fallback("q4_k", 48) == T.F16 and G.fallback("q8_0", 48) == T.F16  # not even a 32-block fits
    assert G.fallback("f16", 7) == T.F16


def test_q8_0_bytes_equal_ours_and_gguf_py(lib):
    x, _ = _matrix(8, 256, seed=3)
    ours = Q.quantize_q8_0(torch.from_numpy(x)).data.numpy()
    np.testing.assert_array_equal(G.quantize(x, "q8_0", None, lib), ours)
    np.testing.assert_array_equal(G.quantize(x, "q8_0", None, lib), gguf.quants.quantize(x, T.Q8_0))


def test_imatrix_changes_the_choice_and_lowers_the_weighted_error(lib):
    x, im = _matrix(32, 256, seed=5)
    plain = G.dequantize(G.quantize(x, "q4_k", None, lib), "q4_k", 256, lib)
    weighted = G.dequantize(G.quantize(x, "q4_k", im, lib), "q4_k", 256, lib)
    assert not np.array_equal(plain, weighted)
    assert ((weighted - x) ** 2 * im).sum() < ((plain - x) ** 2 * im).sum()


def test_threads_do_not_change_the_bytes(lib):
    x, im = _matrix(64, 256, seed=7)
    np.testing.assert_array_equal(G.quantize(x, "q3_k", im, lib, threads=1), G.quantize(x, "q3_k", im, lib, threads=3))


def test_errors(lib):
    x, im = _matrix(4, 96)
    with pytest.raises(ValueError, match="multiple of"):
        G.quantize(x, "q4_k", None, lib)
    with pytest.raises(ValueError, match="imatrix has shape"):
        G.quantize(x, "q8_0", im[:10], lib)
    with pytest.raises(UserError, match="unknown ggml type"):
        G.type_of("q9_k")
    with pytest.raises(ValueError, match="whole rows"):
        G.dequantize(np.zeros(33, np.uint8), "q8_0", 32, lib)
    assert not G.requires_imatrix("q2_k", lib)


def test_vec_dot_types_are_the_cpu_backend_s(bins):
    """What the CPU backend converts a matmul's input to, by weight type (ggml-cpu.c's traits)."""
    cpu = G.load_cpu(bins)
    want = {"f16": T.F16, "q8_0": T.Q8_0, "q5_0": T.Q8_0, "q4_0": T.Q8_0, "iq4_nl": T.Q8_0, "q4_1": T.Q8_1,
            "q5_1": T.Q8_1, "q6_k": T.Q8_K, "q5_k": T.Q8_K, "q4_k": T.Q8_K, "q3_k": T.Q8_K, "q2_k": T.Q8_K,
            "iq4_xs": T.Q8_K}
    assert {t: G.vec_dot_type(t, cpu) for t in want} == want


def test_cuda_rounds_every_quantized_input_per_32_values(bins):
    """input_type: cuda reads every quantized weight's input as 8 bits per 32 values (MMQ/MMVQ,
    Q8_0's rounding), a float weight's at its own type; cpu is vec_dot_type; others are refused."""
    cpu = G.load_cpu(bins)
    for t in ("q8_0", "q4_1", "q5_k", "q2_k", "iq4_xs", "iq4_nl", "f16"):
        assert G.input_type(t, "cpu", cpu) == G.vec_dot_type(t, cpu)
        assert G.input_type(t, "cuda", cpu) == (T.F16 if t == "f16" else T.Q8_0)
    with pytest.raises(ValueError, match="unknown runtime 'metal'"):
        G.input_type("q4_0", "metal", cpu)


@pytest.mark.parametrize("vt,blk", [(T.Q8_0, 32), (T.Q8_1, 32), (T.Q8_K, 256)])
def test_activation_rounding_is_8_bit_per_block(bins, vt, blk):
    """as_vec_dot: every value within half a step of its block's scale (amax / 127), the scale of
    one block set by its own largest value only (an outlier spoils its block, not the others)."""
    cpu = G.load_cpu(bins)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    x[1, 7] = 50.0  # an outlier in the first block of row 1
    y = G.as_vec_dot(x, vt, cpu)
    blocks_x, blocks_y = x.reshape(-1, blk), y.reshape(-1, blk)
    step = np.abs(blocks_x).max(1, keepdims=True) / 127
    # half a step; Q8_0/Q8_1 dequantize with the fp16 rounding of the scale: up to 127 * 2^-11 steps more
    assert np.all(np.abs(blocks_y - blocks_x) <= step * (0.5 if vt == T.Q8_K else 0.57) + 1e-7)
    err = ((blocks_y - blocks_x) ** 2).mean(1)
    spoiled = 512 // blk  # the block index of x[1, 7]
    assert err[spoiled] > 20 * np.median(err)
    assert np.allclose(err[:spoiled], err[:spoiled].mean(), rtol=2) and err[spoiled + 1:].max() < 10 * np.median(err)
    assert np.array_equal(G.as_vec_dot(x, T.F16, cpu), x.astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="not a multiple"):
        G.as_vec_dot(x[:, :100], vt, cpu)
