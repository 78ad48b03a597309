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

#ifdef __cplusplus
}
#endif
