"""Metadata, tokenizer and generated tensors for a Hugging Face folder, from llama.cpp's own converter.

We run the pinned tree's `conversion` package (the engine of convert_hf_to_gguf.py) as its
convert_lora_to_gguf.py reuses it, so hyper-parameter and tokenizer keys match what llama.cpp
expects exactly. It runs in a subprocess: the tree brings its own module layout and logging,
which should not leak into ours.

The converter does more than copy checkpoint tensors and hyper-parameters: it *generates*
tensors from the configuration (Llama 3.x `rope_freqs.weight` from `rope_scaling`, and more in
other model classes) and some keys are only set while its tensors are prepared. So the
subprocess runs the converter's whole tensor pass lazily (no weight is read), writes the
metadata after it, and hands back the list of every tensor name the stock converter would write
plus the values of the tensors it generates. Block linears and checkpoint tensors still come
from the torch model (they are what we compress); the generated ones are taken from the
converter, and any name on one side only is an error instead of a silently different model.
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
from .arch import LINEARS, arch_spec, permute_rows_for_llama, permuted_heads
from .atomic import atomic_dir
from .errors import UserError
from .gguf_fast import FastGGUFReader
from .hparams import extra_kv
from .llamacpp_tree import source_tree
from .placement import cpu_state_items

_SCRIPT = r"""
import json, sys
from pathlib import Path
tree, model_dir, out, extra = sys.argv[1:5]
sys.path.insert(0, tree)
sys.path.insert(0, str(Path(tree) / "gguf-py"))  # the tree's gguf-py: newer constants than PyPI's
import numpy as np
import torch
import gguf
from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
hparams = ModelBase.load_hparams(Path(model_dir), False)
arch = get_model_architecture(hparams, ModelType.TEXT)
cls = get_model_class(arch)
out = Path(out)
m = cls(Path(model_dir), gguf.LlamaFileType.ALL_F32, out / "vocab.gguf", hparams=hparams)
# The stock tensor pass, lazily: names of everything convert_hf_to_gguf.py writes (and any key
# it sets on the way); no checkpoint tensor is read.
m.prepare_tensors()
names = [n for shard in m.gguf_writer.tensors for n in shard]
# The tensors it generates from the configuration, through the same per-tensor path.
generated = {}
for name, data in m.generate_extra_tensors():
    if data.dtype not in (torch.float16, torch.float32):
        data = data.to(torch.float32)
    for new_name, d in m.modify_tensors(data, name, None):
        generated[new_name] = np.asarray(gguf.LazyBase.to_eager(d.numpy()), dtype=np.float32)
# Metadata as write_vocab() writes it, after the tensor pass; the header then lists no tensors.
m.prepare_metadata(vocab_only=True)
m.gguf_writer.tensors = [{}]
for key, value in json.loads(extra).items():  # keys llama.cpp needs beyond what its converter writes
    m.gguf_writer.add_array(key, value)
m.gguf_writer.write_header_to_file(path=m.fname_out)
m.gguf_writer.write_kv_data_to_file()
m.gguf_writer.close()
np.savez(out / "generated.npz", **generated)
(out / "tensors.json").write_text(json.dumps({"names": names, "generated": list(generated)}))
"""

_VERSION = "donor-v2"  # bump when the script's outputs change


def converter_outputs(hf_dir: Path, fingerprint: str, cache_dir: Path, extra: dict | None = None) -> Path:
    """Folder with vocab.gguf (all keys, no tensors), tensors.json and generated.npz for `hf_dir`.

    `extra`: array keys llama.cpp needs beyond what its converter writes (hparams.extra_kv).
    Cached under <cache_dir>/donors by the folder's content; made once by llama.cpp's converter.
    Raises UserError (with the converter's last line) when the converter rejects the folder.
    """
    out = cache_dir / "donors" / cache.key(fingerprint, _VERSION, *((extra,) if extra else ()))
    if (out / "tensors.json").is_file():
        return out
    with atomic_dir(out) as tmp:  # another process may make the same entry first; its copy is as good
        res = subprocess.run([sys.executable, "-c", _SCRIPT, str(source_tree()), str(hf_dir), str(tmp),
                              json.dumps(extra or {})], capture_output=True, text=True)
        if res.returncode != 0 or not (tmp / "tensors.json").is_file():
            err = [ln for ln in (res.stderr or "").strip().splitlines() if ln.strip()]
            raise UserError(f"llama.cpp's converter failed on {hf_dir}: {err[-1] if err else 'no output'}")
    return out


def hf_tensors(src, n_vocab: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Non-block tensors of the torch model under their GGUF names, stored as llama.cpp's converter
    stores them (llama q/k biases permuted, Gemma norms + 1, embedding rows beyond the tokenizer's
    `n_vocab` tokens dropped as conversion/gemma.py does: llama.cpp wants one row per token)."""
    cfg = src.model.config
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == src.arch)
    nmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    block_modules = tuple(f".{s.module}.weight" for s in LINEARS)
    bias_key = {f".{s.module}.bias": s.key for s in LINEARS}  # biases stay with the non-block tensors
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
        key = next((k for suffix, k in bias_key.items() if name.endswith(suffix)), None)
        heads = permuted_heads(key, cfg.num_attention_heads, cfg.num_key_value_heads) if key else None
        if spec.permute_qk and heads is not None:
            arr = permute_rows_for_llama(arr, heads)
        if name in norms and spec.norm_shift:
            arr = arr + np.float32(spec.norm_shift)
        if n_vocab is not None and new in ("token_embd.weight", "output.weight") and arr.shape[0] > n_vocab:
            arr = arr[:n_vocab]
        yield new, arr


def check_tensor_names(ours: list[str], stock: list[str], folder: str) -> None:
    """Our file and the stock converter's must hold the same tensors; else name the first difference.

    Raises UserError: a tensor llama.cpp's converter writes that we would drop (a missing tensor
    changes the model llama.cpp runs without any error), or one it does not write.
    """
    missing, extra = sorted(set(stock) - set(ours)), sorted(set(ours) - set(stock))
    if missing:
        raise UserError(f"llama.cpp's converter writes {missing[0]} for {folder}"
                        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, "
                        "which asvd2gguf does not produce for this model")
    if extra:
        raise UserError(f"asvd2gguf would write {extra[0]} for {folder}, which llama.cpp's converter does not")


def hf_donor(src, cache_dir: Path) -> tuple[Path, list[tuple[str, np.ndarray]]]:
    """(vocab GGUF with every key, non-block tensors): checkpoint ones from the torch model, the
    generated ones (e.g. rope_freqs.weight) from llama.cpp's converter; names checked against it."""
    folder = converter_outputs(src.hf_dir, src.fingerprint, cache_dir, extra_kv(src.model.config, src.arch))
    listing = json.loads((folder / "tensors.json").read_text())
    with np.load(folder / "generated.npz") as z:
        generated = [(k, z[k]) for k in listing["generated"]]
    tokens = FastGGUFReader(folder / "vocab.gguf").fields.get("tokenizer.ggml.tokens")
    tensors = list(hf_tensors(src, len(tokens.contents()) if tokens is not None else None)) + generated
    blocks = [f"blk.{i}.{s.gguf}.weight" for i in range(src.n_layer) for s in LINEARS]
    check_tensor_names([n for n, _ in tensors] + blocks, listing["names"], src.hf_dir.name)
    return folder / "vocab.gguf", tensors


def donor_for(src, cache_dir: Path) -> tuple[Path, list[tuple[str, np.ndarray]] | None]:
    """(donor GGUF for metadata, non-block tensors or None to take the donor's own) for a source:
    a GGUF source is its own donor; a Hugging Face folder gets hf_donor's."""
    if src.gguf_path is not None:
        return src.gguf_path, None
    return hf_donor(src, cache_dir)
