// CPU kernel of GGML_OP_LOWRANK_ATTN (ggml_lowrank_attn, ggml_ops/ggml-lowrank.h).
#pragma once

#include "ggml.h"

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_compute_params;

// scratch bytes for n_threads threads (ggml_graph_plan)
size_t ggml_lowrank_attn_work_size(const struct ggml_tensor * dst, int n_threads);

void ggml_compute_forward_lowrank_attn(const struct ggml_compute_params * params, struct ggml_tensor * dst);

#ifdef __cplusplus
}
#endif
