"""`--imatrix-out`: the calibration's importance matrix, in the GGUF format llama-imatrix writes,
for every tensor the converted file multiplies with, so that users can re-quantize the F16 factor
file with `llama-quantize --imatrix` themselves.

Format (tools/imatrix/imatrix.cpp `save_imatrix` and common/imatrix-loader.cpp of the pinned tree):
per tensor `<name>.in_sum2` (F32, ne = (n_in, 1): the sum over tokens of x^2 per input column)
and `<name>.counts` (F32, ne = (1, 1): the number of tokens); keys `general.type` = "imatrix",
`imatrix.datasets` (string array), `imatrix.chunk_count`, `imatrix.chunk_size` (UINT32).
llama-quantize divides in_sum2 by counts, giving the per-column mean of x^2: diag(X^T X) / T.

What each tensor sees as input: a dense weight and the input factor B (`lr_in`) the block
input x, so diag(Gx); the output factor A (`lr_out`) the latent B x, so diag(B Gx B^T); the
output head (or a tied token_embd, whose matmul it is) the final normed hidden state.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from .arch import SPEC
from .atomic import write_atomic
from .errors import UserError

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"


def imatrix_entries(blocks: list, grams: list[dict[str, torch.Tensor]], head: np.ndarray | None = None,
                    head_name: str = "output.weight") -> dict[str, np.ndarray]:
    """Tensor name -> per-input-column mean of x^2 (float32, (n_in,)) for every block tensor written.

    blocks: per layer the float BlockTensors as written (gguf_write.BlockTensor; factor pairs
    a (m, r), b (r, n)); grams: per layer the input Gram X^T X / T per input group
    (calibrate.LayerStats.gram); head: the head's column statistic (d,), stored under `head_name`.
    """
    key_of = {SPEC[k].gguf: k for k in SPEC}
    out: dict[str, np.ndarray] = {}
    for i, row in enumerate(blocks):
        for bt in row:
            gx = grams[i][SPEC[key_of[bt.key]].group].double()
            base = f"blk.{i}.{bt.key}"
            diag = torch.diagonal(gx).float().numpy()
            if bt.weight is not None:
                out[f"{base}.weight"] = diag
            else:
                b = bt.b.double()
                out[f"{base}.lr_in.weight"] = diag
                out[f"{base}.lr_out.weight"] = ((b @ gx) * b).sum(1).float().numpy()
    if head is not None:
        out[head_name] = np.asarray(head, dtype=np.float32)
    return out


def write_imatrix(path: Path, entries: dict[str, np.ndarray], n_tokens: int, chunk_size: int, dataset: str,
                  force: bool = False) -> None:
    """Write `entries` (name -> mean x^2 per input column) as llama-imatrix's GGUF file at `path`:
    in_sum2 = mean x n_tokens, counts = n_tokens; chunk_count = n_tokens // chunk_size windows.
    Atomic (temp file + rename). Raises UserError when `path` exists without `force` or cannot
    be written."""
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite")
    if not path.parent.exists():
        raise UserError(f"output folder does not exist: {path.parent}")

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, arch="imatrix")
        w.add_type("imatrix")
        w.add_array(KEY_DATASETS, [dataset])
        w.add_uint32(KEY_CHUNK_COUNT, max(1, n_tokens // chunk_size))
        w.add_uint32(KEY_CHUNK_SIZE, chunk_size)
        for name in sorted(entries):
            mean = np.asarray(entries[name], dtype=np.float32)
            w.add_tensor(f"{name}.in_sum2", (mean.astype(np.float64) * n_tokens).astype(np.float32)[None, :])
            w.add_tensor(f"{name}.counts", np.full((1, 1), n_tokens, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    try:
        write_atomic(path, write)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
