"""Which model families we support, what differs between them, and how their block linears map to GGUF names.

One table per fact (issue 10): `ARCHS` holds, per llama.cpp architecture, the transformers
`model_type`s it comes from, whether llama.cpp's converter permutes q/k rows, which norms a
decoder layer has and how llama.cpp stores them, and whether the model interleaves
sliding-window and global layers. The loaders, the writer and the block runner read it here
instead of testing architecture names.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    """One family as llama.cpp's converter (conversion/*.py) and loader (src/models/*.cpp) see it.

    gguf: `general.architecture`. model_types: transformers `config.model_type` values that map
    to it. permute_qk: the converter reorders the rows of q_proj / k_proj (and their biases) from
    Hugging Face's half-split RoPE layout to the interleaved one (conversion/llama.py `permute`).
    norms: the per-layer RMSNorm modules (attribute paths inside a decoder layer), besides the
    final `model.norm`. norm_shift: what the converter adds to every norm weight (Gemma's RMSNorm
    scales by 1 + w, llama.cpp's by w: conversion/gemma.py `norm_shift`). sliding_window:
    interleaved local (sliding-window) and global attention layers with their own RoPE bases.
    """

    gguf: str
    model_types: tuple[str, ...]
    permute_qk: bool = False
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    norm_shift: float = 0.0
    sliding_window: bool = False

    def norm_weight_names(self, n_layer: int) -> frozenset[str]:
        """Hugging Face state-dict names of every RMSNorm weight (those `norm_shift` applies to)."""
        names = {f"model.layers.{i}.{n}.weight" for i in range(n_layer) for n in self.norms}
        return frozenset(names | {"model.norm.weight"})


_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")

ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", ("llama", "mistral"), permute_qk=True),
    "qwen2": ArchSpec("qwen2", ("qwen2",)),
    "qwen3": ArchSpec("qwen3", ("qwen3",), norms=ArchSpec.norms + _QK_NORMS),
    # Gemma 3 text (Gemma3ForCausalLM): embedding scaled by sqrt(hidden), (1 + w) RMSNorm, q/k norms,
    # norms after attention and around the MLP, GELU-tanh MLP, tied output, 5 local : 1 global layers
    "gemma3": ArchSpec("gemma3", ("gemma3_text",),
                       norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                              "post_feedforward_layernorm") + _QK_NORMS,
                       norm_shift=1.0, sliding_window=True),
}
# transformers model_type -> llama.cpp general.architecture (derived from ARCHS)
ARCHITECTURES: dict[str, str] = {t: s.gguf for s in ARCHS.values() for t in s.model_types}


def gguf_arch(model_type: str) -> str:
    """Map a transformers model_type to llama.cpp's architecture, or fail with the supported list."""
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UserError(f"unsupported architecture '{model_type}'; supported: {supported}")
    return ARCHITECTURES[model_type]


def arch_spec(gguf_name: str, where: str = "") -> ArchSpec:
    """The spec of a llama.cpp architecture name; UserError naming the supported ones otherwise."""
    if gguf_name not in ARCHS:
        supported = ", ".join(sorted(ARCHS))
        raise UserError(f"unsupported architecture '{gguf_name}'{f' in {where}' if where else ''}; "
                        f"supported: {supported}")
    return ARCHS[gguf_name]


@dataclass(frozen=True)
class LinearSpec:
    """One of the 7 block linears: its names in our metadata, in transformers and in llama.cpp."""

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


def get_module(layer, path: str):
    """The submodule at dotted `path` ("self_attn.q_proj") of a decoder layer."""
    mod = layer
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def set_module(layer, path: str, new) -> None:
    """Replace the submodule at dotted `path` of a decoder layer by `new`."""
    parent_path, _, name = path.rpartition(".")
    parent = get_module(layer, parent_path) if parent_path else layer
    setattr(parent, name, new)


def permuted_heads(key: str, n_head: int, n_head_kv: int) -> int | None:
    """For an arch with `permute_qk`: the head count whose rows llama.cpp's converter reorders in
    linear `key` (and its bias): n_head for attn_q, n_head_kv for attn_k; None for the others."""
    return {"attn_q": n_head, "attn_k": n_head_kv}.get(key)


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
