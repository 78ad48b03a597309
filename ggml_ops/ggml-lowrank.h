// ggml-lowrank.h - low-rank (factored) matrix multiplication for ASVD-compressed models
//
// Part of asvd2gguf: copied into the pinned llama.cpp tree as ggml/include/ggml-lowrank.h and
// compiled into ggml-base (see patches/0001-ggml-add-asvd-ggml_ops-sources.patch).
//
// A dense weight W (n_out x n_in) is replaced by two factors, W ~= A B, with
//   B = input  factor, ggml ne = [n_in, r]  (GGUF name <base>.lr_in.weight)
//   A = output factor, ggml ne = [r, n_out] (GGUF name <base>.lr_out.weight)
// The op is composed of two ggml_mul_mat so every backend (CPU, CUDA, Metal, Vulkan, ...)
// runs it with its existing, tuned matmul kernels, for every weight type they support.

#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

    // y = a (b x)
    //   a: [r,    n_out]  output factor (any type ggml_mul_mat accepts as src0)
    //   b: [n_in, r]      input factor
    //   x: [n_in, n_tokens, ne2, ne3] activations (F32)
    // result: [n_out, n_tokens, ne2, ne3] F32
    GGML_API struct ggml_tensor * ggml_mul_mat_lowrank(
            struct ggml_context * ctx,
            struct ggml_tensor  * a,
            struct ggml_tensor  * b,
            struct ggml_tensor  * x);

    // the latent half of the product, c = b x ([r, n_tokens, ...]); what a latent KV cache stores
    GGML_API struct ggml_tensor * ggml_mul_mat_lowrank_latent(
            struct ggml_context * ctx,
            struct ggml_tensor  * b,
            struct ggml_tensor  * x);

    // rebuild from a latent: y = a c ([n_out, ...]); c may be a (strided) view of a cache
    GGML_API struct ggml_tensor * ggml_mul_mat_lowrank_rebuild(
            struct ggml_context * ctx,
            struct ggml_tensor  * a,
            struct ggml_tensor  * c);

    // Attention of a few query tokens (decoding) over a latent KV cache, in one op: for every
    // cached cell j, K_j = RoPE(norm(a_k c_k[j] + b_k), pos[j]) is rebuilt on the fly per KV head
    // (never stored), s = scale * q . K_j + mask, and the softmax weights sum the latent V rows
    // c_v[j]. norm is the identity, or with k_norm a per-head RMSNorm (qwen3's and gemma3's
    // k-norm: x / sqrt(mean(x^2) + k_norm_eps), times k_norm_w when given).
    // The result stays latent (r_v wide): multiplying by A_v, viewed per KV group, gives the
    // heads' outputs. Separate ops would write K (n_kv x n_embd_k_gqa) to memory, cast it, RoPE
    // it and read it again for every layer and token; here each cell is touched once.
    //   q:     [n_embd_head, n_head, n_tokens, n_stream] F32, RoPE'd queries
    //   a_k:   [r_k, n_embd_head*n_head_kv] output factor of k_proj (any type with a CPU vec_dot)
    //   c_k:   [r_k, n_kv, n_stream] latent K cache (view), F32/F16/BF16/quantized
    //   c_v:   [r_v, n_kv, n_stream] latent V cache (view)
    //   pos:   I32 [n_kv*n_stream] each cell's position
    //   mask:  [n_kv, >= n_tokens, 1, 1 or n_stream] F16 or F32 (-INF: masked)
    //   b_k:   F32 [n_embd_head*n_head_kv] k_proj bias, added before the norm and RoPE, or NULL
    //   k_norm_w: F32 [n_embd_head] weight of the per-head RMSNorm (shared by the KV heads), or NULL
    //   freq_factors: RoPE frequency factors (as ggml_rope_ext) or NULL
    //   mode: GGML_ROPE_TYPE_NORMAL or GGML_ROPE_TYPE_NEOX
    // result: [r_v, n_tokens, n_head, n_stream] F32
    GGML_API struct ggml_tensor * ggml_lowrank_attn(
            struct ggml_context * ctx,
            struct ggml_tensor  * q,
            struct ggml_tensor  * a_k,
            struct ggml_tensor  * c_k,
            struct ggml_tensor  * c_v,
            struct ggml_tensor  * pos,
            struct ggml_tensor  * mask,
            struct ggml_tensor  * b_k,
            bool                  k_norm,
            struct ggml_tensor  * k_norm_w,
            float                 k_norm_eps,
            struct ggml_tensor  * freq_factors,
            float                 scale,
            int                   n_dims,
            int                   mode,
            int                   n_ctx_orig,
            float                 freq_base,
            float                 freq_scale,
            float                 ext_factor,
            float                 attn_factor,
            float                 beta_fast,
            float                 beta_slow);

    // op_params of GGML_OP_LOWRANK_ATTN: int32 n_dims, mode, n_ctx_orig, then float scale,
    // freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow, then int32 k_norm
    // (1: RMSNorm per head) and float k_norm_eps
    enum ggml_lowrank_attn_param {
        GGML_LOWRANK_ATTN_N_DIMS,
        GGML_LOWRANK_ATTN_MODE,
        GGML_LOWRANK_ATTN_N_CTX_ORIG,
        GGML_LOWRANK_ATTN_SCALE,
        GGML_LOWRANK_ATTN_FREQ_BASE,
        GGML_LOWRANK_ATTN_FREQ_SCALE,
        GGML_LOWRANK_ATTN_EXT_FACTOR,
        GGML_LOWRANK_ATTN_ATTN_FACTOR,
        GGML_LOWRANK_ATTN_BETA_FAST,
        GGML_LOWRANK_ATTN_BETA_SLOW,
        GGML_LOWRANK_ATTN_K_NORM,
        GGML_LOWRANK_ATTN_K_NORM_EPS,
        GGML_LOWRANK_ATTN_N_PARAMS,
    };

    // per rotated pair i (n_dims/2 of them) the angle per position step, and the magnitude
    // scale, of ggml_rope_ext with these parameters (YaRN included): angle(p) = p * omega[i].
    // freq_factors: host copy of the factors or NULL
    GGML_API void ggml_lowrank_attn_rope_omega(
            const struct ggml_tensor * op, const float * freq_factors, double * omega, float * mscale);

#ifdef __cplusplus
}
#endif
