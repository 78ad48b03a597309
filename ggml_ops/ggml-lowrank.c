// ggml-lowrank.c - see ggml-lowrank.h
//
// ggml_mul_mat_lowrank is a composition of existing ops only: no new kernel, so no backend
// needs new code and the scheduler can place each half where its weight lives.
// ggml_lowrank_attn is a real op (GGML_OP_LOWRANK_ATTN, patches/0005) with CPU and CUDA kernels
// in ggml_ops/ggml-cpu and ggml_ops/ggml-cuda.

#include "ggml-lowrank.h"
#include "ggml-impl.h"

#include <math.h>

struct ggml_tensor * ggml_mul_mat_lowrank_latent(
        struct ggml_context * ctx,
        struct ggml_tensor  * b,
        struct ggml_tensor  * x) {
    GGML_ASSERT(b->ne[0] == x->ne[0]); // n_in
    return ggml_mul_mat(ctx, b, x);
}

struct ggml_tensor * ggml_mul_mat_lowrank_rebuild(
        struct ggml_context * ctx,
        struct ggml_tensor  * a,
        struct ggml_tensor  * c) {
    GGML_ASSERT(a->ne[0] == c->ne[0]); // r
    return ggml_mul_mat(ctx, a, c);
}

struct ggml_tensor * ggml_mul_mat_lowrank(
        struct ggml_context * ctx,
        struct ggml_tensor  * a,
        struct ggml_tensor  * b,
        struct ggml_tensor  * x) {
    GGML_ASSERT(a->ne[0] == b->ne[1]); // rank agrees between the factors
    return ggml_mul_mat_lowrank_rebuild(ctx, a, ggml_mul_mat_lowrank_latent(ctx, b, x));
}

struct ggml_tensor * ggml_lowrank_attn(
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
        float                 beta_slow) {
    const int64_t n_embd_head = q->ne[0];
    const int64_t n_head      = q->ne[1];
    const int64_t n_tokens    = q->ne[2];
    const int64_t n_stream    = q->ne[3];
    const int64_t n_kv        = c_k->ne[1];

    GGML_ASSERT(q->type == GGML_TYPE_F32);
    GGML_ASSERT(a_k->ne[0] == c_k->ne[0]);                  // r_k agrees between factor and cache
    GGML_ASSERT(a_k->ne[1] % n_embd_head == 0);
    GGML_ASSERT(n_head % (a_k->ne[1]/n_embd_head) == 0);    // GQA: whole groups of query heads
    GGML_ASSERT(c_v->ne[1] == n_kv && c_k->ne[2] == n_stream && c_v->ne[2] == n_stream);
    GGML_ASSERT(pos->type == GGML_TYPE_I32 && ggml_nelements(pos) == n_kv*n_stream);
    GGML_ASSERT(mask->type == GGML_TYPE_F16 || mask->type == GGML_TYPE_F32);
    GGML_ASSERT(mask->ne[0] == n_kv && mask->ne[1] >= n_tokens);
    GGML_ASSERT(mask->ne[3] == 1 || mask->ne[3] == n_stream);
    GGML_ASSERT(b_k == NULL || (b_k->type == GGML_TYPE_F32 && ggml_nelements(b_k) == a_k->ne[1]));
    GGML_ASSERT(k_norm_w == NULL || (k_norm && k_norm_w->type == GGML_TYPE_F32 && ggml_nelements(k_norm_w) == n_embd_head &&
                                     ggml_is_contiguous(k_norm_w)));
    GGML_ASSERT(!k_norm || k_norm_eps >= 0.0f);
    GGML_ASSERT(freq_factors == NULL || (freq_factors->type == GGML_TYPE_F32 && freq_factors->ne[0] >= n_dims/2));
    GGML_ASSERT(mode == GGML_ROPE_TYPE_NORMAL || mode == GGML_ROPE_TYPE_NEOX);
    GGML_ASSERT(n_dims > 0 && n_dims % 2 == 0 && n_dims <= n_embd_head);

    struct ggml_tensor * result = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, c_v->ne[0], n_tokens, n_head, n_stream);

    int32_t params[GGML_LOWRANK_ATTN_N_PARAMS];
    params[GGML_LOWRANK_ATTN_N_DIMS]     = n_dims;
    params[GGML_LOWRANK_ATTN_MODE]       = mode;
    params[GGML_LOWRANK_ATTN_N_CTX_ORIG] = n_ctx_orig;
    memcpy(params + GGML_LOWRANK_ATTN_SCALE,       &scale,       sizeof(float));
    memcpy(params + GGML_LOWRANK_ATTN_FREQ_BASE,   &freq_base,   sizeof(float));
    memcpy(params + GGML_LOWRANK_ATTN_FREQ_SCALE,  &freq_scale,  sizeof(float));
    memcpy(params + GGML_LOWRANK_ATTN_EXT_FACTOR,  &ext_factor,  sizeof(float));
    memcpy(params + GGML_LOWRANK_ATTN_ATTN_FACTOR, &attn_factor, sizeof(float));
    memcpy(params + GGML_LOWRANK_ATTN_BETA_FAST,   &beta_fast,   sizeof(float));
    memcpy(params + GGML_LOWRANK_ATTN_BETA_SLOW,   &beta_slow,   sizeof(float));
    params[GGML_LOWRANK_ATTN_K_NORM] = k_norm ? 1 : 0;
    memcpy(params + GGML_LOWRANK_ATTN_K_NORM_EPS,  &k_norm_eps,  sizeof(float));
    ggml_set_op_params(result, params, sizeof(params));

    result->op     = GGML_OP_LOWRANK_ATTN;
    result->src[0] = q;
    result->src[1] = a_k;
    result->src[2] = c_k;
    result->src[3] = c_v;
    result->src[4] = pos;
    result->src[5] = mask;
    result->src[6] = b_k;
    result->src[7] = freq_factors;
    result->src[8] = k_norm_w;

    return result;
}

void ggml_lowrank_attn_rope_omega(const struct ggml_tensor * op, const float * freq_factors, double * omega, float * mscale) {
    const int32_t * p = (const int32_t *) op->op_params;
    const int n_dims     = p[GGML_LOWRANK_ATTN_N_DIMS];
    const int n_ctx_orig = p[GGML_LOWRANK_ATTN_N_CTX_ORIG];
    float freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow;
    memcpy(&freq_base,   p + GGML_LOWRANK_ATTN_FREQ_BASE,   sizeof(float));
    memcpy(&freq_scale,  p + GGML_LOWRANK_ATTN_FREQ_SCALE,  sizeof(float));
    memcpy(&ext_factor,  p + GGML_LOWRANK_ATTN_EXT_FACTOR,  sizeof(float));
    memcpy(&attn_factor, p + GGML_LOWRANK_ATTN_ATTN_FACTOR, sizeof(float));
    memcpy(&beta_fast,   p + GGML_LOWRANK_ATTN_BETA_FAST,   sizeof(float));
    memcpy(&beta_slow,   p + GGML_LOWRANK_ATTN_BETA_SLOW,   sizeof(float));

    float corr_dims[2];
    ggml_rope_yarn_corr_dims(n_dims, n_ctx_orig, freq_base, beta_fast, beta_slow, corr_dims);

    // ggml_rope's theta = p * theta_scale^i / ff, interpolated by YaRN: linear in p for every
    // pair, so one angle per position step describes it
    const double theta_scale = pow((double) freq_base, -2.0/n_dims);
    *mscale = attn_factor;
    if (ext_factor != 0.0f) {
        *mscale *= 1.0f + 0.1f*logf(1.0f/freq_scale);
    }
    for (int i = 0; i < n_dims/2; ++i) {
        const double extrap = pow(theta_scale, i) / (double) (freq_factors ? freq_factors[i] : 1.0f);
        double theta = (double) freq_scale*extrap;
        if (ext_factor != 0.0f) {
            const float y        = (i - corr_dims[0]) / MAX(0.001f, corr_dims[1] - corr_dims[0]);
            const float ramp_mix = (1 - MIN(1, MAX(0, y))) * ext_factor;
            theta = theta*(double) (1 - ramp_mix) + extrap*(double) ramp_mix;
        }
        omega[i] = theta;
    }
}
