// CUDA kernel of GGML_OP_LOWRANK_ATTN (ggml_lowrank_attn, ggml_ops/ggml-lowrank.h).
#pragma once

#include "common.cuh"

void ggml_cuda_op_lowrank_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

bool ggml_cuda_lowrank_attn_supported(const ggml_tensor * op);
