"""llama.cpp's hyper-parameter rules, as a transformers config, in both directions.

A GGUF does not carry every hyper-parameter: llama.cpp's loader (src/models/<arch>.cpp) fills
the rest from fixed rules, and transformers' GGUF config mapping (integrations/ggml.py) knows
only some of the keys. `config_from_gguf` makes the transformers config of a GGUF compute what
llama.cpp computes from the same file; `check_config` refuses a Hugging Face config that
llama.cpp would run differently from transformers (no key could tell it); `extra_kv` gives the
GGUF keys our output needs beyond what llama.cpp's converter writes for such a config.

Gemma 3 (llama.cpp src/models/gemma3.cpp, conversion/gemma.py):
- sliding-window layers exist only when `gemma3.attention.sliding_window` is set; which ones:
  `gemma3.attention.sliding_window_pattern` (a per-layer array, or n: every n-th layer is
  global), default n = 6, so layers 5, 11, 17, ... are global;
- RoPE base of the local layers: `gemma3.rope.freq_base_swa`, default 10000; global layers use
  `gemma3.rope.freq_base` and the linear `rope.scaling.factor` (local layers are never scaled);
- the query scale is 1/sqrt(head_dim), except 1/sqrt(hidden / heads) for the 62-layer (27B)
  model: transformers' `query_pre_attn_scalar` must be that square;
- `gemma3.final_logit_softcapping` when present, none otherwise; no attention-logit softcapping.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .arch import arch_spec
from .errors import UserError
from .gguf_fast import FastGGUFReader
from .rope import gguf_rope_parameters, set_rope_parameters

GEMMA3_SWA_PATTERN = 6  # llama.cpp's default: load_swa_pattern(ml, 6) in src/models/gemma3.cpp
GEMMA3_SWA_ROPE_BASE = 10000.0  # llama_hparams::rope_freq_base_train_swa's default


def gemma3_layer_types(n_layer: int, pattern) -> list[str]:
    """Per-layer attention types for llama.cpp's sliding_window_pattern (an int n, or a per-layer list).

    llama_hparams::set_swa_pattern(n, dense_first=false): layer il is local iff n == 0 or
    il % n < n - 1.
    """
    if isinstance(pattern, (list, tuple)):
        if len(pattern) < n_layer:
            raise UserError(f"sliding_window_pattern has {len(pattern)} entries for {n_layer} layers")
        swa = [bool(x) for x in pattern[:n_layer]]
    else:
        n = int(pattern)
        swa = [n == 0 or il % n < n - 1 for il in range(n_layer)]
    return ["sliding_attention" if s else "full_attention" for s in swa]


def gemma3_query_scalar(n_layer: int, hidden: int, n_head: int, head_dim: int) -> int:
    """The query_pre_attn_scalar that llama.cpp's f_attention_scale implies (src/models/gemma3.cpp)."""
    return hidden // n_head if n_layer == 62 else head_dim


def config_from_gguf(path: Path, reader: FastGGUFReader | None = None):
    """transformers' config of a GGUF, completed with llama.cpp's rules for what the file leaves out.

    Raises UserError when transformers cannot read the file's configuration.
    """
    from transformers import AutoConfig

    path = Path(path)
    reader = reader or FastGGUFReader(path)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers raises many types for unsupported or corrupt GGUFs
        raise UserError(f"cannot read the model configuration of {path.name}: {str(e).splitlines()[0]}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config

    def get(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = get("general.architecture")
    key_length = get(f"{arch}.attention.key_length")
    if key_length is not None:  # transformers' GGUF mapping drops it for llama/qwen3 (qwen3 would default to 128)
        config.head_dim = int(key_length)
    if arch == "gemma3":
        _complete_gemma3(config, arch, get)
    else:  # transformers' GGUF mapping drops rope scaling (rope.py); gemma3 gets its per-layer-type RoPE above
        set_rope_parameters(config, gguf_rope_parameters(reader))
    return config


def _complete_gemma3(config, arch: str, get: Callable) -> None:
    n_layer = config.num_hidden_layers
    head_dim = config.head_dim
    config.query_pre_attn_scalar = gemma3_query_scalar(n_layer, config.hidden_size, config.num_attention_heads,
                                                       head_dim)
    softcap = get(f"{arch}.final_logit_softcapping")
    config.final_logit_softcapping = float(softcap) if softcap else None
    config.attn_logit_softcapping = None
    window = get(f"{arch}.attention.sliding_window")
    if window:
        config.sliding_window = int(window)
        config.layer_types = gemma3_layer_types(n_layer, get(f"{arch}.attention.sliding_window_pattern",
                                                             GEMMA3_SWA_PATTERN))
    else:  # llama.cpp: LLAMA_SWA_TYPE_NONE, every layer global with the global RoPE base
        config.layer_types = ["full_attention"] * n_layer
    full = {"rope_type": "default", "rope_theta": float(get(f"{arch}.rope.freq_base", 1_000_000.0))}
    scaling = get(f"{arch}.rope.scaling.type", "none" if get(f"{arch}.rope.scaling.factor") is None else "linear")
    factor = float(get(f"{arch}.rope.scaling.factor", get(f"{arch}.rope.scale_linear", 0.0)) or 0.0)
    if scaling == "linear" and factor not in (0.0, 1.0):
        full.update(rope_type="linear", factor=factor)
    elif scaling not in ("none", "linear"):
        raise UserError(f"gemma3 RoPE scaling '{scaling}' is not supported (only linear)")
    local = {"rope_type": "default", "rope_theta": float(get(f"{arch}.rope.freq_base_swa", GEMMA3_SWA_ROPE_BASE))}
    config.rope_parameters = {"full_attention": full, "sliding_attention": local}
    config.use_bidirectional_attention = False


def check_config(config, arch: str) -> None:
    """Refuse a Hugging Face config whose model llama.cpp would compute differently (UserError)."""
    if arch != "gemma3":
        return
    spec = arch_spec(arch)
    want = gemma3_query_scalar(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                               config.head_dim)
    if float(config.query_pre_attn_scalar) != float(want):
        raise UserError(f"{spec.gguf}: query_pre_attn_scalar {config.query_pre_attn_scalar} differs from the "
                        f"{want} llama.cpp derives (1/sqrt of it scales the queries there)")
    if getattr(config, "attn_logit_softcapping", None):
        raise UserError(f"{spec.gguf}: attn_logit_softcapping is not supported by llama.cpp's gemma3 graph")
    if getattr(config, "use_bidirectional_attention", False):
        raise UserError(f"{spec.gguf}: bidirectional attention (an embedding model) is not a causal LM")
    for kind, params in (config.rope_parameters or {}).items():
        rope_type = (params or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear") or (kind == "sliding_attention" and rope_type != "default"):
            raise UserError(f"{spec.gguf}: RoPE type '{rope_type}' on {kind} layers is not what llama.cpp runs")


def extra_kv(config, arch: str) -> dict:
    """GGUF keys (name -> value) our output adds to what llama.cpp's converter writes for `config`.

    gemma3: the converter writes no sliding_window_pattern, so llama.cpp assumes every 6th layer
    is global; a config with other layer types gets the per-layer array (true = sliding window),
    which llama.cpp's loader reads first.
    """
    if arch != "gemma3" or not getattr(config, "sliding_window", None):
        return {}
    types = list(config.layer_types)
    if types == gemma3_layer_types(len(types), GEMMA3_SWA_PATTERN):
        return {}
    return {f"{arch}.attention.sliding_window_pattern": [t == "sliding_attention" for t in types]}
