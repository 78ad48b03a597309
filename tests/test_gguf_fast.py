"""The fast GGUF reader returns what gguf-py's reader returns, field by field and tensor by tensor."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf_fixtures import finish_gguf

from asvd2gguf.errors import UserError
from asvd2gguf.gguf_fast import FastGGUFReader


def _write(path):
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("x.f", 0.25)
    w.add_bool("x.b", True)
    w.add_string("x.s", "héllo")
    w.add_int64("x.i64", -5)
    w.add_array("x.strs", ["a", "bb", "", "日本"])
    w.add_array("x.ints", [1, -2, 3])
    w.add_array("x.floats", [0.5, 1.5])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((2, 32)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("d.bias", rng.standard_normal(7).astype(np.float32))
    finish_gguf(w)


def test_same_as_gguf_py(tmp_path):
    p = tmp_path / "m.gguf"
    _write(p)
    f, g = FastGGUFReader(p), gguf.GGUFReader(p)
    keys = [k for k in g.fields if not k.startswith("GGUF.")]
    assert list(f.fields) == keys
    for k in keys:
        assert [int(t) for t in f.fields[k].types] == [int(t) for t in g.fields[k].types], k
        assert f.fields[k].contents() == g.fields[k].contents(), k
    assert [t.name for t in f.tensors] == [t.name for t in g.tensors]
    for a, b in zip(f.tensors, g.tensors):
        assert list(map(int, a.shape)) == list(map(int, b.shape)) and a.tensor_type == b.tensor_type
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        np.testing.assert_array_equal(a.data, b.data)
    assert FastGGUFReader(p, stop_after="llama.block_count").fields["llama.block_count"].contents() == 2


def test_rejects_bad_and_truncated_files(tmp_path):
    p = tmp_path / "m.gguf"
    _write(p)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + p.read_bytes()[4:])
    with pytest.raises(UserError, match="not a readable GGUF file: .*bad.gguf .*magic"):
        FastGGUFReader(bad)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(UserError, match="past the end"):
        FastGGUFReader(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(p.read_bytes()[:30])
    with pytest.raises(UserError, match="truncated or corrupt header"):
        FastGGUFReader(head)
