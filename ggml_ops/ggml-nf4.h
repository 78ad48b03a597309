#pragma once

// NF4: 4-bit NormalFloat quantization (the QLoRA codebook) as a ggml type, GGML_TYPE_NF4.
//
// Block of 32 values: one fp16 scale d and 16 bytes of 4-bit codebook indices, packed like
// IQ4_NL (qs[j] = L[j] | (L[j+16] << 4)); 18 bytes, 4.5 bits per weight. The codebook is
// kvalues_nf4 in ggml-common.h: the QLoRA NF4 values times 127, rounded to int8, so the int8
// dot-product kernels of IQ4_NL apply unchanged with another table. A value is d * kvalues_nf4[L].
//
// These are the reference (CPU, backend independent) functions that ggml-base uses for the
// type traits and ggml_quantize_chunk; the optimized dot products live in the backends.

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

// reference quantization, exactly: per block, d = fp16(amax/127); each value x goes to the
// number of codebook midpoints that are < x/d (a value on a midpoint takes the lower index)
GGML_API void   quantize_row_nf4_ref(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k);
GGML_API void   dequantize_row_nf4  (const void  * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);

// rows of n_per_row values (a multiple of 32); imatrix == NULL gives exactly quantize_row_nf4_ref,
// with an importance matrix a weighted search over the block scale (see ggml-nf4.c)
GGML_API size_t quantize_nf4(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst,
                             int64_t nrows, int64_t n_per_row, const float * imatrix);

#ifdef __cplusplus
}
#endif
