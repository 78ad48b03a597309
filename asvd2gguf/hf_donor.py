"""Metadata and tokenizer for a Hugging Face folder, produced by llama.cpp's own converter.

We run the pinned tree's `conversion` package (the engine of convert_hf_to_gguf.py) in vocab-only
mode, as its convert_lora_to_gguf.py reuses it, so hyper-parameters and tokenizer keys match
what llama.cpp expects exactly. It runs in a subprocess: the tree brings its own module layout
and logging, which should not leak into ours.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from . import cache
from .arch import LINEARS, permute_rows_for_llama
from .errors import UserError
from .llama_source import source_tree
from .placement import cpu_state_items

_SCRIPT = r"""
import sys
from pathlib import Path
tree, model_dir, out = sys.argv[1:4]
sys.path.insert(0, tree)
sys.path.insert(0, str(Path(tree) / "gguf-py"))  # the tree's gguf-py: newer constants than PyPI's
import gguf
from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
hparams = ModelBase.load_hparams(Path(model_dir), False)
arch = get_model_architecture(hparams, ModelType.TEXT)
cls = get_model_class(arch)
m = cls(Path(model_dir), gguf.LlamaFileType.MOSTLY_F16, Path(out), hparams=hparams)
m.write_vocab()
"""


def vocab_gguf(hf_dir: Path, fingerprint: str, cache_dir: Path) -> Path:
    out = cache_dir / "donors" / f"{cache.key(fingerprint, 'vocab-v1')}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    res = subprocess.run([sys.executable, "-c", _SCRIPT, str(source_tree()), str(hf_dir), str(tmp)],
                         capture_output=True, text=True)
    if res.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        err = [ln for ln in (res.stderr or "").strip().splitlines() if ln.strip()]
        raise UserError(f"llama.cpp's converter failed on {hf_dir}: {err[-1] if err else 'no output'}")
    tmp.replace(out)
    return out


def hf_tensors(src) -> Iterator[tuple[str, np.ndarray]]:
    """Non-block tensors of the torch model under their GGUF names."""
    cfg = src.model.config
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == src.arch)
    nmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    block_modules = tuple(f".{s.module}.weight" for s in LINEARS)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for name, t in cpu_state_items(src.model):  # offloaded tensors read one module at a time
        if name.endswith(block_modules) or (tied and name == "lm_head.weight"):
            continue
        new = nmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"no GGUF name for tensor {name} of {src.arch}")
        arr = t.detach().float().numpy()
        if src.arch == "llama" and name.endswith(("q_proj.bias", "k_proj.bias")):
            heads = cfg.num_attention_heads if name.endswith("q_proj.bias") else cfg.num_key_value_heads
            arr = permute_rows_for_llama(arr, heads)
        yield new, arr


def hf_donor(src, cache_dir: Path):
    return vocab_gguf(src.hf_dir, src.fingerprint, cache_dir), list(hf_tensors(src))
