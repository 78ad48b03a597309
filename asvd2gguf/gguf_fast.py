"""A small, fast GGUF reader with the slice of gguf.GGUFReader's interface this project uses.

gguf-py's reader builds a numpy view per array element, which for a 49k-token vocabulary
costs 8 s on an idle core (over 30 s on a shared one), and the converter read every source
twice. Here string arrays are decoded in one Python loop and numeric arrays with one
`frombuffer`; tensor data stays memory-mapped. Layout per the GGUF spec (version 2 and 3).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import UserError
from .ggml_quants import tensor_type
from .gguf_keys import KEY_FORMAT_VERSION

V = gguf.GGUFValueType
_SCALAR = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
_NP = {V.UINT8: np.uint8, V.INT8: np.int8, V.UINT16: np.uint16, V.INT16: np.int16, V.UINT32: np.uint32,
       V.INT32: np.int32, V.FLOAT32: np.float32, V.BOOL: np.bool_, V.UINT64: np.uint64, V.INT64: np.int64,
       V.FLOAT64: np.float64}
_TENSOR_NP = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
              gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
              gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
              gguf.GGMLQuantizationType.I64: np.int64}


@dataclass
class Field:
    name: str
    types: list
    value: object

    def contents(self):
        return self.value


@dataclass
class Tensor:
    name: str
    shape: np.ndarray  # ggml order (ne[0] first), as gguf-py gives it
    tensor_type: gguf.GGMLQuantizationType
    data: np.ndarray  # numpy order; quantized types as uint8 (..., bytes per row)
    n_bytes: int


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        s = bytes(self.buf[self.pos: self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: V):
        if vtype == V.STRING:
            return self.string()
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        raise ValueError(f"unknown GGUF value type {int(vtype)}")

    def array(self, sub: V, n: int):
        if sub in _NP:
            arr = np.frombuffer(self.buf, dtype=_NP[sub], count=n, offset=self.pos)
            self.pos += arr.nbytes
            return arr.tolist()
        if sub == V.STRING:
            return [self.string() for _ in range(n)]
        if sub == V.ARRAY:
            out = []
            for _ in range(n):
                s2, n2 = V(self.unpack("<I")), self.unpack("<Q")
                out.append(self.array(s2, n2))
            return out
        raise ValueError(f"unknown GGUF array type {int(sub)}")


class FastGGUFReader:
    """Fields and tensors of a GGUF file; `stop_after` ends the header parse at that key."""

    def __init__(self, path: str | Path, stop_after: str | None = None):
        """Raises UserError naming the file when it is not a GGUF or is cut short or corrupt
        anywhere in its header or data: one rule for every caller (convert, inspect, eval)."""
        self.path = Path(path)
        try:
            self._parse(stop_after)
        except (struct.error, ValueError, IndexError, KeyError, OverflowError, MemoryError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            if isinstance(e, struct.error | IndexError | OverflowError | MemoryError):
                why = f"truncated or corrupt header: {why}"
            raise UserError(f"not a readable GGUF file: {self.path} ({why})") from None

    def _parse(self, stop_after: str | None) -> None:
        self.data = np.memmap(self.path, mode="r")
        c = _Cursor(self.data)
        if bytes(self.data[:4]) != b"GGUF":
            raise ValueError("bad magic (not a GGUF file)")
        c.pos = 4
        version = c.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
        self.fields: dict[str, Field] = {}
        self.tensors: list[Tensor] = []
        for _ in range(n_kv):
            key = c.string()
            vtype = V(c.unpack("<I"))
            if vtype == V.ARRAY:
                sub = V(c.unpack("<I"))
                self.fields[key] = Field(key, [vtype, sub], c.array(sub, c.unpack("<Q")))
            else:
                self.fields[key] = Field(key, [vtype], c.value(vtype))
            if key == stop_after:
                return
        self.kv_end = c.pos  # bytes of the header and the key-value section
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.unpack("<Q") for _ in range(c.unpack("<I"))]
            infos.append((name, dims, c.unpack("<I"), c.unpack("<Q")))
        align = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else 32
        start = (c.pos + align - 1) // align * align
        asvd_file = KEY_FORMAT_VERSION in self.fields  # as gguf.cpp of patches/0004 decides
        for name, dims, t, off in infos:
            qtype = tensor_type(t, asvd_file, name)
            block, tsize = gguf.GGML_QUANT_SIZES[qtype]
            n_el = int(np.prod(dims)) if dims else 1
            n_bytes = n_el // block * tsize
            np_dims = tuple(reversed(dims))
            raw = self.data[start + off: start + off + n_bytes]
            if len(raw) != n_bytes:
                raise ValueError(f"tensor {name} runs past the end of the file")
            if qtype in _TENSOR_NP:
                arr = raw.view(_TENSOR_NP[qtype]).reshape(np_dims)
            else:
                arr = raw.reshape(*np_dims[:-1], np_dims[-1] // block * tsize)
            self.tensors.append(Tensor(name, np.array(dims, dtype=np.uint64), qtype, arr, n_bytes))

    def get_field(self, key: str):
        return self.fields.get(key)
