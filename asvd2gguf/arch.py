"""Which model families we support and how their block linears map to GGUF names.

Kept in one table so the calibrator, the searcher and the writer agree on names and order.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

# transformers model_type -> llama.cpp general.architecture
ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}


@dataclass(frozen=True)
class LinearSpec:
    key: str  # short name used in metadata and caches
    module: str  # attribute path inside a decoder layer
    gguf: str  # llama.cpp base name without "blk.N."
    group: str  # linears that read the same input share activation statistics


LINEARS: tuple[LinearSpec, ...] = (
    LinearSpec("attn_q", "self_attn.q_proj", "attn_q", "attn_in"),
    LinearSpec("attn_k", "self_attn.k_proj", "attn_k", "attn_in"),
    LinearSpec("attn_v", "self_attn.v_proj", "attn_v", "attn_in"),
    LinearSpec("attn_output", "self_attn.o_proj", "attn_output", "attn_out_in"),
    LinearSpec("ffn_gate", "mlp.gate_proj", "ffn_gate", "mlp_in"),
    LinearSpec("ffn_up", "mlp.up_proj", "ffn_up", "mlp_in"),
    LinearSpec("ffn_down", "mlp.down_proj", "ffn_down", "down_in"),
)
LINEAR_KEYS = tuple(s.key for s in LINEARS)
KV_KEYS = ("attn_k", "attn_v")
SPEC = {s.key: s for s in LINEARS}


def gguf_arch(model_type: str) -> str:
    """Map a transformers model_type to llama.cpp's architecture, or fail with the supported list."""
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UserError(f"unsupported architecture '{model_type}'; supported: {supported}")
    return ARCHITECTURES[model_type]


def get_module(layer, path: str):
    mod = layer
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def set_module(layer, path: str, new) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(layer, parent_path) if parent_path else layer
    setattr(parent, name, new)


def permute_rows_for_llama(w, n_head: int):
    """The row order llama.cpp's converter gives q_proj/k_proj for arch llama (its RoPE layout).

    Applied to a dense weight or to the output factor A (rows only); works on numpy or torch.
    """
    rows = w.shape[0]
    rest = tuple(w.shape[1:])
    head_dim = rows // n_head
    x = w.reshape(n_head, 2, head_dim // 2, *rest)
    x = x.swapaxes(1, 2) if hasattr(x, "swapaxes") else x.transpose(1, 2)
    return x.reshape(rows, *rest)


def unpermute_rows_for_llama(w, n_head: int):
    """Inverse of permute_rows_for_llama: back to Hugging Face row order."""
    rows = w.shape[0]
    rest = tuple(w.shape[1:])
    head_dim = rows // n_head
    x = w.reshape(n_head, head_dim // 2, 2, *rest)
    x = x.swapaxes(1, 2) if hasattr(x, "swapaxes") else x.transpose(1, 2)
    return x.reshape(rows, *rest)
