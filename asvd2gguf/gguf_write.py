"""Write the factored GGUF (format in docs/gguf-format.md).

Metadata and non-block tensors come from a donor GGUF: the source file itself, or for a Hugging
Face folder a vocab-only GGUF made by the pinned llama.cpp tree's own `conversion` package, so
hyper-parameter and tokenizer keys are exactly what llama.cpp's converter writes. The block
linears come from the (compressed) torch model. Output goes to a temporary file in the same
folder and is renamed into place only when complete.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from .arch import LINEARS, arch_spec, permute_rows_for_llama, permuted_heads
from .atomic import write_atomic
from .errors import UserError
from .ggml_quants import Quantized, dequantize
from .gguf_fast import FastGGUFReader
from .gguf_keys import PREFIX

PARTIAL = "partial"  # the temporary name of an output being written: .<name>.partial-<pid>
OUTTYPES = {
    "f32": (np.float32, gguf.LlamaFileType.ALL_F32),
    "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (None, gguf.LlamaFileType.MOSTLY_BF16),
}
BLOCK_WEIGHT_SUFFIXES = tuple(f".{s.gguf}.weight" for s in LINEARS)
# general.file_type when the block linears are quantized (llama_ftype; NF4 is patch 0004's)
QUANT_FILE_TYPES = {"q8_0": 7, "iq4_nl": 25, "nf4": 64}  # llama_ftype (general.file_type); NF4: patches/0004


@dataclass
class BlockTensor:
    """One block linear as written: dense weight, or the factor pair."""

    key: str
    weight: torch.Tensor | Quantized | None = None  # (n_out, n_in)
    a: torch.Tensor | Quantized | None = None  # (n_out, r)
    b: torch.Tensor | Quantized | None = None  # (r, n_in)


def _np(t: torch.Tensor | np.ndarray | Quantized, outtype: str):
    """Float tensors at the chosen type; 1-D ones (norms, biases) stay F32 as llama.cpp expects.

    Quantized tensors are written as their raw blocks."""
    if isinstance(t, Quantized):
        return t.data.cpu().numpy(), t.qtype
    arr = t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float32)
    if arr.ndim == 1 or outtype == "f32":
        return arr.astype(np.float32), None
    if outtype == "f16":
        return arr.astype(np.float16), None
    return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def _copy_kv(writer: gguf.GGUFWriter, reader: FastGGUFReader, skip: set[str]) -> None:
    """The donor's keys, less `skip` and its own asvd.* keys (a source converted by us before:
    they describe that conversion, and this one writes its own)."""
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", PREFIX)) or key in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def donor_tensors(reader: FastGGUFReader) -> Iterable[tuple[str, np.ndarray]]:
    """Non-block tensors of the donor, dequantized to float32 in GGUF numpy layout."""
    for t in reader.tensors:
        if t.name.endswith(BLOCK_WEIGHT_SUFFIXES):
            continue
        arr = dequantize(t.data, t.tensor_type)
        yield t.name, np.asarray(arr, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def write_gguf(
    out: Path,
    donor: Path,
    arch: str,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    blocks: Callable[[int], list[BlockTensor]],
    extra_tensors: Iterable[tuple[str, np.ndarray]] | None,
    asvd_meta: dict,
    outtype: str = "f16",
    progress=None,
    nonblock_map: Callable[[str, np.ndarray], object] | None = None,
    file_type: int | None = None,
) -> None:
    """Write atomically; `extra_tensors` replaces the donor's non-block tensors when given.

    `nonblock_map` may turn a non-block tensor into another (e.g. a Quantized embedding);
    `file_type` overrides the general.file_type that `outtype` implies. `blocks(i)`: layer i's
    BlockTensors, weight (m, n) or factors A (m, r), B (r, n), in Hugging Face row order (q/k
    rows are permuted here for archs with permute_qk). Layout: docs/gguf-format.md.
    Raises UserError for a full disk or an unwritable output (nothing is left behind),
    ValueError for non-finite factors.
    """
    reader = FastGGUFReader(donor)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        name_field = reader.fields.get("general.name")
        base_name = name_field.contents() if name_field is not None else out.stem
        _copy_kv(writer, reader, {"general.architecture", "general.name", "general.file_type"})
        writer.add_name(base_name if base_name.endswith(" (ASVD)") else f"{base_name} (ASVD)")
        writer.add_file_type(int(OUTTYPES[outtype][1]) if file_type is None else file_type)
        for k, (v, vt) in asvd_meta.items():
            if vt == gguf.GGUFValueType.ARRAY:
                writer.add_array(k, v)
            else:
                writer.add_key_value(k, v, vt)

        for name, arr in extra_tensors if extra_tensors is not None else donor_tensors(reader):
            data, raw = _np(nonblock_map(name, arr) if nonblock_map else arr, outtype)
            writer.add_tensor(name, data, raw_dtype=raw)

        task = progress.add_task("writing", total=n_layer) if progress else None
        permute_qk = arch_spec(arch).permute_qk
        for i in range(n_layer):
            for bt in blocks(i):
                base = f"blk.{i}.{bt.key}"
                heads = permuted_heads(bt.key, n_head, n_head_kv)
                permute = permute_qk and heads is not None
                if bt.weight is not None:
                    w = _permuted(bt.weight, heads) if permute else bt.weight
                    data, raw = _np(w, outtype)
                    writer.add_tensor(f"{base}.weight", data, raw_dtype=raw)
                else:
                    a = _permuted(bt.a, heads) if permute else bt.a
                    for suffix, t in (("lr_in", bt.b), ("lr_out", a)):
                        if isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()):
                            raise ValueError(f"non-finite values in {base}.{suffix}")
                        data, raw = _np(t, outtype)
                        writer.add_tensor(f"{base}.{suffix}.weight", data, raw_dtype=raw)
            if progress:
                progress.advance(task)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    try:
        write_atomic(out, write, tag=PARTIAL)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing {out}; nothing was written") from None
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None


def _permuted(t, heads: int):
    """Row permutation of a float or quantized tensor (quantized blocks never span rows)."""
    if isinstance(t, Quantized):
        return Quantized(t.qtype, permute_rows_for_llama(t.data, heads), t.shape)
    return permute_rows_for_llama(t, heads)


def clean_stale_partials(out: Path) -> None:
    """Remove temp files a killed run left beside `out` (their writer process is gone)."""
    for p in out.parent.glob(f".{out.name}.{PARTIAL}-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            p.unlink(missing_ok=True)
        except PermissionError:
            pass
