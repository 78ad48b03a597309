"""The `asvd.*` GGUF keys: their names (the one table; docs/gguf-format.md lists their meaning)
and the metadata `convert` writes.

The writer (here), the reader (gguf_read, gguf_fast), `inspect` and `ppl` (cli) and the chat
evaluation (chateval) use these names; the patched llama.cpp reads the same strings in C++
(patches/), which cannot import them.
"""

from __future__ import annotations

import gguf

from .arch import LINEAR_KEYS, SPEC

PREFIX = "asvd."
FORMAT_VERSION = 1  # value of KEY_FORMAT_VERSION; its presence marks a file as ours
KEY_FORMAT_VERSION = "asvd.format_version"
KEY_METHOD = "asvd.method"
KEY_ALPHA = "asvd.alpha"
KEY_SCALING = "asvd.scaling"
KEY_RANK_ALIGN = "asvd.rank_align"
KEY_SENSITIVITY = "asvd.sensitivity"
KEY_RATIO_TARGET = "asvd.ratio.target"
KEY_RATIO_ACHIEVED = "asvd.ratio.achieved"
KEY_PPL_TARGET = "asvd.ppl.target"
KEY_PPL_CALIBRATION = "asvd.ppl.calibration"
KEY_KV_TARGET = "asvd.kv.target"
KEY_KV_ACHIEVED = "asvd.kv.achieved"
KEY_KV_LATENT = "asvd.kv.latent"
KEY_CALIBRATION = "asvd.calibration"
KEY_QUANT = "asvd.quant"
KEY_SIGMA_SPLIT = "asvd.sigma_split"
KEY_REFIT = "asvd.refit"  # what the factor pairs were refitted on (refit.py), "" if they were not
RANK_PREFIX = "asvd.rank."  # + the linear's GGUF base name: rank per layer, 0 = dense
# size plans (--size / --bpw) only
KEY_SIZE_TARGET = "asvd.size.target"
KEY_SIZE_BPW = "asvd.size.bpw"
KEY_SIZE_PLANNED = "asvd.size.planned"
KEY_SIZE_LOSS = "asvd.size.loss_predicted"
KEY_SIZE_TYPES_ONLY = "asvd.size.types_only"
KEY_SIZE_RUNTIME = "asvd.size.runtime"
TYPE_PREFIX = "asvd.type."  # + GGUF base name: the type asked per layer (block linears) or the tensor's type
LOSS_PREFIX = "asvd.loss."  # + GGUF base name: predicted loss increase (nats) per layer, or of the tensor


def rank_key(gguf_name: str) -> str:
    """The key of one block linear's per-layer ranks, e.g. rank_key("attn_k") = "asvd.rank.attn_k"."""
    return RANK_PREFIX + gguf_name


def type_key(gguf_name: str) -> str:
    """The key of a tensor's (or a linear's per-layer) planned types, e.g. "asvd.type.ffn_down"."""
    return TYPE_PREFIX + gguf_name


def loss_key(gguf_name: str) -> str:
    """The key of a tensor's (or a linear's per-layer) predicted loss increase, e.g. "asvd.loss.ffn_down"."""
    return LOSS_PREFIX + gguf_name


def size_metadata(cfg, plan) -> dict:
    """The asvd.size.* / asvd.type.* / asvd.loss.* keys of a size plan (`plan`: a ranks.RankPlan
    with choices), {key: (value, GGUFValueType)}: the budget asked (bytes, or bits per weight),
    the planned file bytes, the summed predicted loss increase (nats), and per block linear its
    type per layer and predicted loss per layer; token_embd / output as single values."""
    V = gguf.GGUFValueType
    meta = {
        KEY_SIZE_TARGET: (int(plan.budget_bytes), V.UINT64),
        KEY_SIZE_BPW: (float(cfg.bpw or 0.0), V.FLOAT32),
        KEY_SIZE_PLANNED: (int(plan.nbytes), V.UINT64),
        KEY_SIZE_LOSS: (float(plan.predicted_loss), V.FLOAT32),
        KEY_SIZE_TYPES_ONLY: (bool(cfg.types_only), V.BOOL),
        KEY_SIZE_RUNTIME: (cfg.runtime, V.STRING),
    }
    for k in LINEAR_KEYS:
        opts = [plan.choices[(i, k)] for i in range(plan.n_layer)]
        meta[type_key(SPEC[k].gguf)] = ([o.qtype for o in opts], V.ARRAY)
        meta[loss_key(SPEC[k].gguf)] = ([float(o.cost) for o in opts], V.ARRAY)
    for name in ("token_embd", "output"):
        if name in plan.choices:
            meta[type_key(name)] = (plan.choices[name].qtype, V.STRING)
            meta[loss_key(name)] = (float(plan.choices[name].cost), V.FLOAT32)
    return meta


def asvd_metadata(cfg, calib_source: str, ratio: float, kv: float, latent: bool,
                  rank_table: dict[str, list[int]] | None, calib_ppl: float, refit: str = "") -> dict:
    """The asvd.* keys of a converted file: {key: (value, GGUFValueType)}, in the order written.

    cfg: the ConvertConfig; calib_source: what the calibration windows were made of
    (chat.calibration_tokens); ratio, kv: achieved (RankPlan); calib_ppl: calibration perplexity
    of the written model (0 if not finite); rank_table: linear key -> rank per layer, or None
    (--dense: the file has no factored linears and no asvd.rank.* keys); refit: what the factor
    pairs were refitted on ("" when they were not; convert._refit).
    """
    V = gguf.GGUFValueType
    calib_desc = f"{calib_source}, {cfg.calib_samples} x {cfg.calib_seqlen} tokens, seed {cfg.seed}"
    meta = {
        KEY_FORMAT_VERSION: (FORMAT_VERSION, V.UINT32),
        KEY_METHOD: (cfg.method, V.STRING),
        KEY_ALPHA: (float(cfg.alpha), V.FLOAT32),
        KEY_SCALING: (cfg.scaling, V.STRING),
        KEY_RANK_ALIGN: (cfg.rank_align, V.UINT32),
        KEY_SENSITIVITY: (f"{cfg.sensitivity}/{cfg.allocation}", V.STRING),
        KEY_RATIO_TARGET: (float(cfg.ratio or 0.0), V.FLOAT32),
        KEY_RATIO_ACHIEVED: (float(ratio), V.FLOAT32),
        KEY_PPL_TARGET: (float(cfg.ppl_target or 0.0), V.FLOAT32),
        KEY_PPL_CALIBRATION: (float(calib_ppl), V.FLOAT32),
        KEY_KV_TARGET: (float(cfg.kv or 1.0), V.FLOAT32),
        KEY_KV_ACHIEVED: (float(kv), V.FLOAT32),
        KEY_KV_LATENT: (bool(latent), V.BOOL),
        KEY_CALIBRATION: (calib_desc, V.STRING),
        KEY_QUANT: (cfg.quant, V.STRING),
        KEY_SIGMA_SPLIT: (cfg.sigma_split, V.STRING),
        KEY_REFIT: (refit, V.STRING),
    }
    if rank_table is not None:
        for k in LINEAR_KEYS:
            meta[rank_key(SPEC[k].gguf)] = ([int(x) for x in rank_table[k]], V.ARRAY)
    return meta


_SCALAR_BYTES = {gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.BOOL: 1,
                 gguf.GGUFValueType.UINT16: 2, gguf.GGUFValueType.INT16: 2, gguf.GGUFValueType.UINT32: 4,
                 gguf.GGUFValueType.INT32: 4, gguf.GGUFValueType.FLOAT32: 4, gguf.GGUFValueType.UINT64: 8,
                 gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8}


def kv_bytes(meta: dict) -> int:
    """Bytes `meta` ({key: (value, GGUFValueType)}, as asvd_metadata returns it) takes in a GGUF
    key-value section (GGUF spec v3: key as u64 length + bytes, u32 type, the value; arrays as u32
    element type + u64 count + elements, as gguf-py writes them: ints INT32, floats FLOAT32)."""
    V = gguf.GGUFValueType
    total = 0
    for key, (value, vtype) in meta.items():
        total += 8 + len(key.encode()) + 4
        if vtype == V.STRING:
            total += 8 + len(str(value).encode())
        elif vtype == V.ARRAY:
            total += 4 + 8 + sum(8 + len(v.encode()) if isinstance(v, str) else 4 for v in value)
        else:
            total += _SCALAR_BYTES[vtype]
    return total
