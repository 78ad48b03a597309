"""A GGUF's RoPE as transformers rope parameters, so the torch model rotates as llama.cpp does.

transformers' GGUF loader maps only `rope.freq_base`: it drops the `rope.scaling.*` keys and the
`rope_freqs.weight` tensor (per-frequency divisors that llama.cpp's converter generates for
Llama 3.x `rope_scaling`). A float model loaded that way is a different model from the one
llama.cpp runs (calibrated, analysed and scored wrongly). This module reads what llama.cpp reads
(src/llama-model.cpp load_hparams, src/llama-context.cpp, ggml's rope with freq_factors) and
returns the transformers `rope_parameters` that give the same rotation angles:

* `rope.scaling.type` none, or linear with factor 0/1: no scaling (llama.cpp's default type is
  linear; factor 0 means 1).
* linear, factor F: theta_i = p / F * base^(-2i/d): transformers' `linear`.
* yarn, factor F: transformers' `yarn` with llama.cpp's fixed choices (beta_fast 32, beta_slow
  1, ramp over `rope.scaling.original_context_length` or the training context) and its cos/sin
  magnitude (0.1 ln F + 1) * `rope.scaling.attn_factor`.
* `rope_freqs.weight` f_i: theta_i = p * base^(-2i/d) / f_i. Llama 3.x's rule (Meta's
  `apply_scaling`, transformers' `llama3`) has f = 1 for short wavelengths, f = factor for long
  ones and 1/f linear in 1/wavelength between; the parameters are recovered from the tensor
  (only the ratios original_context / low_freq_factor and / high_freq_factor are determined, so
  low_freq_factor is set to 1) and the frequencies they give are checked against the tensor.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import UserError

# llama.cpp's yarn: ggml's rope_yarn_corr_dims defaults, not read from the file by the pinned tree
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0
FREQ_RTOL = 1e-5  # float32 rounding of the tensor and of transformers' float32 arithmetic


def _value(fields: dict, key: str, default=None):
    f = fields.get(key)
    return default if f is None else f.contents()


def rope_freqs(reader) -> np.ndarray | None:
    """The file's rope_freqs.weight (n_rot/2,) as float64, or None."""
    from .ggml_quants import dequantize

    t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    return None if t is None else np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)


def base_inv_freq(base: float, dim: int) -> np.ndarray:
    """base^(-2i/dim) for i < dim/2 (float64): unscaled RoPE frequencies, radians per position."""
    return 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def llama3_from_factors(factors: np.ndarray, base: float, dim: int) -> dict:
    """Llama 3.x rope parameters (factor, low/high_freq_factor, original context) whose rule
    reproduces the per-frequency divisors `factors` (dim/2,), as llama.cpp's converter made them
    (conversion/llama.py generate_extra_tensors).

    In the smooth band s = (1/f - 1/F) / (1 - 1/F) is linear in x = 1/wavelength,
    s = (x - 1/P) / (1/Q - 1/P) with P = ctx / low_freq_factor and Q = ctx / high_freq_factor;
    two or more band points give the line by least squares, fewer leave a range of lines and one
    inside the gaps to the neighbouring points is taken. Raises UserError when the divisors do
    not follow the rule (checked by the caller against transformers' own computation).
    """
    f = np.asarray(factors, dtype=np.float64)
    wl = 2 * math.pi / base_inv_freq(base, dim)  # increasing with i
    big = float(f.max())
    ones = np.abs(f - 1) <= 1e-6
    fulls = np.abs(f - big) <= 1e-6 * big
    band = ~ones & ~fulls
    x = 1 / wl
    s = (1 / f - 1 / big) / (1 - 1 / big)
    x_one = x[ones].min() if ones.any() else x.max() * 2  # nearest unscaled frequency (x falls with i)
    x_full = x[fulls].max() if fulls.any() else x.min() / 2  # nearest fully scaled one
    if band.sum() >= 2:
        slope, icpt = np.polyfit(x[band], s[band], 1)
        inv_p, inv_q = -icpt / slope, (1 - icpt) / slope
    elif band.sum() == 1:
        x0, s0 = float(x[band][0]), float(s[band][0])
        step = 0.5 * min((x0 - x_full) / max(s0, 1e-12), (x_one - x0) / max(1 - s0, 1e-12))
        inv_p, inv_q = x0 - s0 * step, x0 + (1 - s0) * step
    else:  # no band point: any band inside the gap between the two regions
        inv_p, inv_q = x_full + (x_one - x_full) / 3, x_full + 2 * (x_one - x_full) / 3
    if not (inv_q > inv_p > 0):
        raise UserError("rope_freqs.weight does not follow Llama 3's frequency rule; asvd2gguf cannot model it "
                        "in torch")
    ctx = max(1, round(1 / inv_p))
    return {"rope_type": "llama3", "factor": big, "low_freq_factor": float(ctx * inv_p),
            "high_freq_factor": float(ctx * inv_q), "original_max_position_embeddings": int(ctx)}


def gguf_rope_parameters(reader) -> dict | None:
    """transformers rope parameters (rope_type, its keys, rope_theta) for the RoPE llama.cpp
    applies to this GGUF; None when it applies plain RoPE (nothing for transformers to change).

    `reader`: a GGUF reader (fields and tensors: gguf_fast.FastGGUFReader or gguf.GGUFReader).
    Raises UserError for a scaling llama.cpp applies that transformers cannot express here.
    """
    arch = str(_value(reader.fields, "general.architecture", ""))

    def key(name: str, default=None):
        return _value(reader.fields, f"{arch}.{name}", default)

    head_dim = int(key("rope.dimension_count", 0) or key("attention.key_length", 0)
                   or int(key("embedding_length", 0)) // max(int(key("attention.head_count", 1)), 1))
    base = float(key("rope.freq_base", 10000.0))
    stype = str(key("rope.scaling.type", "linear"))  # llama.cpp's default when the key is absent
    factor = float(key("rope.scaling.factor", 0.0) or key("rope.scale_linear", 0.0) or 1.0)  # 0 means 1
    f = rope_freqs(reader)
    scaled = stype not in ("none", "linear") or (stype == "linear" and factor != 1.0)
    if f is not None:
        if scaled:
            raise UserError(f"rope_freqs.weight together with rope scaling '{stype}' (factor {factor:g}) is not "
                            "supported")
        if f.shape[0] != head_dim // 2:
            raise UserError(f"rope_freqs.weight has {f.shape[0]} entries, expected {head_dim // 2}")
        if np.allclose(f, 1.0, rtol=0, atol=1e-7):
            return None
        return {**llama3_from_factors(f, base, head_dim), "rope_theta": base}
    if stype == "none" or not scaled:
        return None
    if stype == "linear":
        return {"rope_type": "linear", "factor": factor, "rope_theta": base}
    if stype == "yarn":
        if float(key("rope.scaling.yarn_log_multiplier", 0.0)):
            raise UserError("yarn with rope.scaling.yarn_log_multiplier is not supported")
        n_ctx = key("rope.scaling.original_context_length") or key("context_length")
        attn = float(key("rope.scaling.attn_factor", 1.0))
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": int(n_ctx),
                "beta_fast": YARN_BETA_FAST, "beta_slow": YARN_BETA_SLOW,
                "attention_factor": attn * (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0), "rope_theta": base}
    raise UserError(f"rope scaling type '{stype}' is not supported (supported: none, linear, yarn, Llama 3 "
                    "rope_freqs)")


def set_rope_parameters(config, params: dict | None) -> None:
    """Put `params` (gguf_rope_parameters) on a transformers config, for transformers 4.x and 5.x."""
    if params is None:
        return
    if hasattr(config, "rope_parameters"):  # transformers 5: one dict, rope_theta inside
        config.rope_parameters = dict(params)
    else:
        config.rope_theta = params["rope_theta"]
        config.rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}


def check_rope_freqs(model, reader) -> None:
    """Assert the torch model's RoPE frequencies equal llama.cpp's for a file with rope_freqs.weight.

    Raises UserError when they differ by more than float32 rounding (FREQ_RTOL): the torch model
    would then not be the model llama.cpp runs.
    """
    f = rope_freqs(reader)
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    if f is None or rot is None:
        return
    have = rot.inv_freq.detach().double().cpu().numpy()
    cfg = model.config
    base = float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    want = base_inv_freq(base, 2 * f.shape[0]) / f
    if have.shape != want.shape or not np.allclose(have, want, rtol=FREQ_RTOL, atol=0):
        worst = float(np.max(np.abs(have / want - 1))) if have.shape == want.shape else float("inf")
        raise UserError(f"the torch model's RoPE frequencies differ from rope_freqs.weight (relative {worst:.2g})")
