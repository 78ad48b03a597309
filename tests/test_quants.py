"""The project's torch quantizers against ggml's C reference (bit for bit) and against themselves.

ggml's side is `ggml_quantize_chunk` and the type traits' `to_float` from the patched build's
libggml-base.so (asvd2gguf.llamacpp.build(), cached), through asvd2gguf.ggml_lib's ctypes bindings.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf_fixtures import finish_gguf

from asvd2gguf import ggml_lib as G
from asvd2gguf import ggml_quants as Q

TYPES = ("q8_0", "iq4_nl", "nf4")


@pytest.fixture(scope="module")
def ggml(bins):
    return G.load(bins)


def c_quantize(lib, qtype: int, x: np.ndarray) -> np.ndarray:
    out = G.quantize(x, qtype, None, lib)
    assert out.shape[1] == x.shape[1] // Q.QK * gguf.GGML_QUANT_SIZES[qtype][1]
    return out


def c_dequantize(lib, qtype: int, data: np.ndarray, n: int) -> np.ndarray:
    return G.dequantize(data, qtype, n, lib)


def awkward_matrix(seed: int = 0) -> torch.Tensor:
    """Gaussian rows at very different scales, heavy tails, exact zeros, a zero block, ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 256, generator=g) * torch.logspace(-6, 3, 48)[:, None]
    x[3] = torch.distributions.StudentT(2.0).sample((256,)) * 0.01
    x[5, :32] = 0.0  # an all-zero block
    x[6, 7::9] = 0.0
    x[7] = torch.randint(-4, 5, (256,), generator=g).float() * 0.25  # many exact ties and equal |max|
    x[8, :32] = torch.linspace(-1, 1, 32)
    x[9, :] = 1e-20  # below GROUP_MAX_EPS for IQ4_NL
    return x


@pytest.mark.parametrize("name", TYPES)
def test_bit_exact_with_ggml(ggml, name):
    x = awkward_matrix()
    ours = Q.QUANTIZERS[name](x)
    ref = c_quantize(ggml, Q.TYPE_OF[name], x.numpy())
    assert ours.data.shape == ref.shape
    mism = (ours.data.numpy() != ref).any(axis=1)
    assert not mism.any(), f"{name}: rows {np.flatnonzero(mism)[:10]} differ from ggml"


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_ggml(ggml, name):
    x = awkward_matrix(1)
    q = Q.QUANTIZERS[name](x)
    ours = Q.dequantize_torch(q).numpy()
    ref = c_dequantize(ggml, Q.TYPE_OF[name], q.data.numpy(), x.shape[1])
    np.testing.assert_array_equal(ours, ref)
    # and the numpy entry point used on GGUF bytes agrees (gguf-py for Q8_0/IQ4_NL, ours for NF4)
    np.testing.assert_array_equal(Q.dequantize(q.data.numpy(), q.qtype), ref)


def test_q8_0_matches_gguf_py():
    x = awkward_matrix(2).numpy()
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(Q.quantize_q8_0(torch.from_numpy(x)).data.numpy(), ref)


@pytest.mark.parametrize("name,tol", [("q8_0", 0.01), ("iq4_nl", 0.12), ("nf4", 0.13)])
def test_round_trip_error(name, tol):
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(3))
    err = (Q.dequantize_torch(Q.QUANTIZERS[name](x)) - x).norm() / x.norm()
    assert 0 < err < tol


def test_nf4_codebook_and_layout():
    assert Q.KVALUES_NF4 == (-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127)
    assert gguf.GGMLQuantizationType(Q.NF4_ID) is Q.NF4 and gguf.GGML_QUANT_SIZES[Q.NF4] == (32, 18)
    # every level quantizes to itself, and halfway points go to the lower level
    levels = torch.tensor(Q.KVALUES_NF4, dtype=torch.float32)
    x = torch.cat([levels, levels]).reshape(1, 32)
    q = Q.quantize_nf4(x)
    np.testing.assert_array_equal(Q.dequantize_torch(q)[0].numpy(), x[0].numpy())
    mid = torch.tensor([[127.0, 0.5 * (10 + 20)] + [0.0] * 30])
    back = Q.dequantize_torch(Q.quantize_nf4(mid))[0, 1]
    assert back == 10.0


def test_rejects_rows_not_multiple_of_block():
    with pytest.raises(ValueError, match="multiple of 32"):
        Q.quantize_q8_0(torch.zeros(2, 48))


def test_gguf_reader_round_trip_nf4(tmp_path):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    q = Q.quantize_nf4(x)
    w = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    w.add_tensor("t.weight", q.data.numpy(), raw_dtype=Q.NF4)
    finish_gguf(w)
    t = gguf.GGUFReader(tmp_path / "t.gguf").tensors[0]
    assert t.tensor_type == Q.NF4 and [int(d) for d in t.shape] == [64, 8]
    np.testing.assert_array_equal(Q.dequantize(t.data, t.tensor_type), Q.dequantize_torch(q).numpy())


def test_nf4_round_trip_is_the_ggml_type_at_block_32():
    x = awkward_matrix(5)
    assert torch.equal(Q.nf4_round_trip(x), Q.dequantize_torch(Q.quantize_nf4(x)))
    assert Q.nf4_round_trip(x[:, :128], 64).shape == (48, 128)
