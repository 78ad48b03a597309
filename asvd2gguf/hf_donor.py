"""Metadata and tokenizer for a Hugging Face folder, produced by llama.cpp's own converter.

We run the pinned tree's `conversion` package (the engine of convert_hf_to_gguf.py) in vocab-only
mode, as its convert_lora_to_gguf.py reuses it, so hyper-parameters and tokenizer keys match
what llama.cpp expects exactly. It runs in a subprocess: the tree brings its own module layout
and logging, which should not leak into ours.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from . import cache
from .arch import LINEARS, arch_spec, permute_rows_for_llama
from .errors import UserError
from .gguf_fast import FastGGUFReader
from .hparams import extra_kv
from .llama_source import source_tree
from .placement import cpu_state_items

_SCRIPT = r"""
import json
import sys
from pathlib import Path
tree, model_dir, out, extra = sys.argv[1:5]
sys.path.insert(0, tree)
sys.path.insert(0, str(Path(tree) / "gguf-py"))  # the tree's gguf-py: newer constants than PyPI's
import gguf
from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
hparams = ModelBase.load_hparams(Path(model_dir), False)
arch = get_model_architecture(hparams, ModelType.TEXT)
cls = get_model_class(arch)
m = cls(Path(model_dir), gguf.LlamaFileType.MOSTLY_F16, Path(out), hparams=hparams)
for key, value in json.loads(extra).items():  # keys llama.cpp needs beyond what its converter writes
    m.gguf_writer.add_array(key, value)
m.write_vocab()
"""


def vocab_gguf(hf_dir: Path, fingerprint: str, cache_dir: Path, extra: dict | None = None) -> Path:
    """Metadata-only GGUF of a Hugging Face folder by llama.cpp's converter, plus `extra` array keys."""
    parts = (fingerprint, "vocab-v1") + ((extra,) if extra else ())
    out = cache_dir / "donors" / f"{cache.key(*parts)}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    res = subprocess.run([sys.executable, "-c", _SCRIPT, str(source_tree()), str(hf_dir), str(tmp),
                          json.dumps(extra or {})],
                         capture_output=True, text=True)
    if res.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        err = [ln for ln in (res.stderr or "").strip().splitlines() if ln.strip()]
        raise UserError(f"llama.cpp's converter failed on {hf_dir}: {err[-1] if err else 'no output'}")
    tmp.replace(out)
    return out


def hf_tensors(src, n_vocab: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Non-block tensors of the torch model under their GGUF names, stored as llama.cpp's converter
    stores them (llama q/k biases permuted, Gemma norms + 1, embedding rows beyond the tokenizer's
    `n_vocab` tokens dropped as conversion/gemma.py does: llama.cpp wants one row per token)."""
    cfg = src.model.config
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == src.arch)
    nmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    block_modules = tuple(f".{s.module}.weight" for s in LINEARS)
    tied = getattr(cfg, "tie_word_embeddings", False)
    spec = arch_spec(src.arch)
    norms = spec.norm_weight_names(cfg.num_hidden_layers)
    for name, t in cpu_state_items(src.model):  # offloaded tensors read one module at a time
        if name.endswith(block_modules) or (tied and name == "lm_head.weight"):
            continue
        new = nmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"no GGUF name for tensor {name} of {src.arch}")
        arr = t.detach().float().numpy()
        if spec.permute_qk and name.endswith(("q_proj.bias", "k_proj.bias")):
            heads = cfg.num_attention_heads if name.endswith("q_proj.bias") else cfg.num_key_value_heads
            arr = permute_rows_for_llama(arr, heads)
        if name in norms and spec.norm_shift:
            arr = arr + np.float32(spec.norm_shift)
        if n_vocab is not None and new in ("token_embd.weight", "output.weight") and arr.shape[0] > n_vocab:
            arr = arr[:n_vocab]
        yield new, arr


def hf_donor(src, cache_dir: Path):
    donor = vocab_gguf(src.hf_dir, src.fingerprint, cache_dir, extra_kv(src.model.config, src.arch))
    tokens = FastGGUFReader(donor).fields.get("tokenizer.ggml.tokens")
    return donor, list(hf_tensors(src, len(tokens.contents()) if tokens is not None else None))
