// ggml-lowrank.c - see ggml-lowrank.h
//
// Composition of existing ops only: no new kernel, so no backend needs new code and the
// scheduler can place each half where its weight lives.

#include "ggml-lowrank.h"

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
