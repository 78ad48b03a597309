"""Load a GGUF (factored or dense) back into a torch model, and describe what it holds.

This is the torch side of every round trip: `ppl` scores a converted file with the same code
that scores the original, so both columns of a table come from one implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from .arch import KV_KEYS, LINEARS, arch_spec, get_module, permuted_heads, set_module, unpermute_rows_for_llama
from .errors import UserError, require_file
from .ggml_quants import dequantize
from .gguf_fast import FastGGUFReader
from .gguf_keys import KEY_KV_LATENT, PREFIX
from .hparams import config_from_gguf
from .lowrank import LowRankLinear
from .ranks import params
from .rope import check_rope_freqs


def open_gguf(path: Path) -> FastGGUFReader:
    """A reader of `path`; UserError when it is missing or not a readable GGUF."""
    require_file(path, "GGUF file")
    try:
        return FastGGUFReader(path)
    except UserError:
        raise
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"not a readable GGUF file: {path} ({why})") from None


def field_value(reader: FastGGUFReader, key: str, default=None):
    """The value of metadata key `key`, or `default` when the file has none."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def tensor_array(t) -> np.ndarray:
    """A reader tensor as float32 in numpy (rows, cols) order."""
    arr = dequantize(t.data, t.tensor_type)
    return np.asarray(arr, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


@dataclass
class FactoredInfo:
    """A GGUF's block linears as its tensors say (describe_gguf), with its asvd.* keys."""

    arch: str
    n_layer: int
    ranks: dict[str, list[int]] = field(default_factory=dict)  # key -> rank per layer (0 dense)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (n_out, n_in) dense
    meta: dict = field(default_factory=dict)

    def ratio(self) -> float:
        """Kept block-linear parameters / dense count, from the tensor shapes (ranks.params)."""
        dense = kept = 0
        for k, rs in self.ranks.items():
            m, n = self.shapes[k]
            for r in rs:
                dense += params(m, n, 0)
                kept += params(m, n, r)
        return kept / dense if dense else 1.0

    def kv_ratio(self) -> float:
        """Latent cache width / full K+V width; 1 when the file does not ask for a latent cache."""
        if not self.meta.get(KEY_KV_LATENT, False):
            return 1.0
        full = sum(self.shapes[k][0] * self.n_layer for k in KV_KEYS)
        kept = sum((r or self.shapes[k][0]) for k in KV_KEYS for r in self.ranks[k])
        return kept / full if full else 1.0


def describe_gguf(path: Path) -> FactoredInfo:
    """Ranks as the tensors say (not as metadata claims), with the asvd.* keys beside them.

    Raises UserError for a GGUF that is not a model (no `<arch>.block_count`: an imatrix, a
    LoRA adapter, a vocabulary-only file) and for a block linear with neither a dense weight
    nor both factors."""
    reader = open_gguf(path)
    arch = field_value(reader, "general.architecture", "?")
    n_layer = int(field_value(reader, f"{arch}.block_count", 0))
    if n_layer < 1:
        kind = field_value(reader, "general.type", arch)
        raise UserError(f"{Path(path).name} is not a model ('{kind}' GGUF without {arch}.block_count)")
    tensors = {t.name: t for t in reader.tensors}
    info = FactoredInfo(arch, n_layer)
    for spec in LINEARS:
        rs = []
        for i in range(n_layer):
            base = f"blk.{i}.{spec.gguf}"
            if f"{base}.weight" in tensors:
                t = tensors[f"{base}.weight"]
                info.shapes.setdefault(spec.key, (int(t.shape[1]), int(t.shape[0])))
                rs.append(0)
            elif f"{base}.lr_in.weight" in tensors and f"{base}.lr_out.weight" in tensors:
                b, a = tensors[f"{base}.lr_in.weight"], tensors[f"{base}.lr_out.weight"]
                if int(b.shape[1]) != int(a.shape[0]):
                    raise UserError(f"{base}: rank of lr_in ({int(b.shape[1])}) and lr_out ({int(a.shape[0])}) differ")
                info.shapes.setdefault(spec.key, (int(a.shape[1]), int(b.shape[0])))
                rs.append(int(b.shape[1]))
            else:
                raise UserError(f"{base}: neither a dense weight nor both factors (lr_in, lr_out) in {path}")
        info.ranks[spec.key] = rs
    info.meta = {k: field_value(reader, k) for k in reader.fields if k.startswith(PREFIX)}
    return info


def load_gguf_model(path: Path, tokenizer_from: Path | None = None, with_tokenizer: bool = True):
    """(model, tokenizer, info) from a GGUF this project wrote, or any GGUF of a supported architecture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .source import _quiet_transformers

    _quiet_transformers()
    path = Path(path).resolve()
    reader = open_gguf(path)
    info = describe_gguf(path)
    spec = arch_spec(info.arch, path.name)
    config = config_from_gguf(path, reader)
    tensors = {t.name: t for t in reader.tensors}
    config.tie_word_embeddings = "output.weight" not in tensors
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    check_rope_freqs(model, reader)
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == info.arch)
    nmap = gguf.get_tensor_name_map(arch_enum, info.n_layer)
    norms = spec.norm_weight_names(info.n_layer)

    def load(name: str, key: str | None = None) -> torch.Tensor:
        arr = tensor_array(tensors[name])
        heads = permuted_heads(key, config.num_attention_heads, config.num_key_value_heads) if key else None
        if spec.permute_qk and heads is not None and not name.endswith(".lr_in.weight"):  # B's rows are the rank's
            arr = unpermute_rows_for_llama(arr, heads)
        return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))

    block_weight = {f"model.layers.{i}.{s.module}.weight": (i, s) for i in range(info.n_layer) for s in LINEARS}
    with torch.no_grad():
        for hf_name, prm in list(model.state_dict().items()):
            if hf_name in block_weight:
                i, s = block_weight[hf_name]
                base = f"blk.{i}.{s.gguf}"
                layer = model.model.layers[i]
                if info.ranks[s.key][i]:
                    old = get_module(layer, s.module)
                    bias = old.bias.detach().clone() if old.bias is not None else None
                    if bias is not None and f"{base}.bias" in tensors:
                        bias = load(f"{base}.bias", s.key)
                    lr = LowRankLinear(load(f"{base}.lr_out.weight", s.key), load(f"{base}.lr_in.weight"), bias)
                    set_module(layer, s.module, lr)
                else:
                    prm.copy_(load(f"{base}.weight", s.key))
                continue
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            g = nmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if g is None or g not in tensors:
                raise UserError(f"{path.name} has no tensor for {hf_name} (expected {g})")
            key = next((s.key for s in LINEARS if g.endswith(f".{s.gguf}.bias")), None)
            value = load(g, key).reshape(prm.shape)
            prm.copy_(value - spec.norm_shift if hf_name in norms else value)
    if config.tie_word_embeddings:
        model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(False)
    if not with_tokenizer:
        return model, None, info
    tok_path = Path(tokenizer_from) if tokenizer_from else path
    tokenizer = AutoTokenizer.from_pretrained(tok_path.parent, gguf_file=tok_path.name) if tok_path.suffix == ".gguf" \
        else AutoTokenizer.from_pretrained(tok_path)
    return model, tokenizer, info


@dataclass
class TensorRow:
    """One planned tensor as `inspect` shows it: its name, rank (0 dense), written GGUF type(s)
    (A's, B's for a pair), data bytes and predicted loss increase (nats; NaN when the file does not
    record it), and the type the plan asked for."""

    name: str
    rank: int
    types: tuple[str, ...]
    nbytes: int
    loss: float
    asked: str


def describe_plan(path: Path) -> list[TensorRow]:
    """Every block linear and token_embd / output of a GGUF as written: rank, types and bytes from
    the tensors themselves, the type asked and the predicted loss from the asvd.type.* / asvd.loss.*
    keys of a size plan (absent keys: the written type, NaN). Raises UserError as describe_gguf."""
    from .gguf_keys import loss_key, type_key

    reader = open_gguf(path)
    info = describe_gguf(path)
    tensors = {t.name: t for t in reader.tensors}

    def tname(t) -> str:
        return t.tensor_type.name.lower()

    rows = []
    for spec in LINEARS:
        asked = field_value(reader, type_key(spec.gguf))
        losses = field_value(reader, loss_key(spec.gguf))
        for i in range(info.n_layer):
            base = f"blk.{i}.{spec.gguf}"
            r = info.ranks[spec.key][i]
            names = (f"{base}.lr_out.weight", f"{base}.lr_in.weight") if r else (f"{base}.weight",)
            ts = [tensors[n] for n in names]
            rows.append(TensorRow(base, r, tuple(tname(t) for t in ts), sum(int(t.n_bytes) for t in ts),
                                  float(losses[i]) if losses is not None else float("nan"),
                                  str(asked[i]) if asked is not None else tname(ts[0])))
    for name in ("token_embd", "output"):
        t = tensors.get(f"{name}.weight")
        if t is not None:
            loss = field_value(reader, loss_key(name))
            rows.append(TensorRow(name, 0, (tname(t),), int(t.n_bytes),
                                  float(loss) if loss is not None else float("nan"),
                                  str(field_value(reader, type_key(name)) or tname(t))))
    return sorted(rows, key=lambda row: (row.name.split(".")[0] != "token_embd", _layer_of(row.name), row.name))


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" else 1 << 30
