#pragma once

// CPU backend functions of GGML_TYPE_NF4 (see ggml-nf4.h): from_float and the dot product
// with Q8_0 activations (vec_dot_type Q8_0, as for IQ4_NL).

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

void quantize_row_nf4(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k);

void ggml_vec_dot_nf4_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx,
                           const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_nf4_q8_0_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx,
                                   const void * GGML_RESTRICT vy, size_t by, int nrc);

#ifdef __cplusplus
}
#endif
