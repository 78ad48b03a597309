// NF4 reference quantization and dequantization (GGML_TYPE_NF4), built into ggml-base.
// The format and the exact reference rule are described in ggml-nf4.h; the block struct and
// the codebook (block_nf4, kvalues_nf4) are in ggml-common.h next to IQ4_NL's.

#define GGML_COMMON_DECL_C
#define GGML_COMMON_IMPL_C
#include "ggml-common.h"

#include "ggml-nf4.h"
#include "ggml-impl.h"

#include <math.h>
#include <string.h>

// decision boundaries of the codebook: mid[i] = (kvalues_nf4[i] + kvalues_nf4[i+1]) / 2
static float nf4_mid(int i) {
    return 0.5f*((float)kvalues_nf4[i] + (float)kvalues_nf4[i + 1]);
}

// index of v in the codebook: the number of midpoints below v (ties go to the lower index)
static inline uint8_t nf4_index(const float * mid, float v) {
    uint8_t l = 0;
    for (int i = 0; i < 15; ++i) {
        l += mid[i] < v;
    }
    return l;
}

static void nf4_mids(float * mid) {
    for (int i = 0; i < 15; ++i) {
        mid[i] = nf4_mid(i);
    }
}

static void nf4_pack(const uint8_t * L, uint8_t * qs) {
    for (int j = 0; j < QK_NF4/2; ++j) {
        qs[j] = L[j] | (L[j + QK_NF4/2] << 4);
    }
}

// the reference rule for one block; also the final index assignment for a chosen scale
static void nf4_quantize_block_ref(const float * mid, const float * x, block_nf4 * y) {
    float amax = 0.0f;
    for (int j = 0; j < QK_NF4; ++j) {
        amax = fmaxf(amax, fabsf(x[j]));
    }
    const float d = amax / 127.0f;
    y->d = GGML_FP32_TO_FP16(d);
    const float df = GGML_FP16_TO_FP32(y->d);
    const float id = df != 0.0f ? 1.0f/df : 0.0f;
    uint8_t L[QK_NF4];
    for (int j = 0; j < QK_NF4; ++j) {
        L[j] = nf4_index(mid, x[j]*id);
    }
    nf4_pack(L, y->qs);
}

void quantize_row_nf4_ref(const float * GGML_RESTRICT x, void * GGML_RESTRICT vy, int64_t k) {
    GGML_ASSERT(k % QK_NF4 == 0);
    block_nf4 * GGML_RESTRICT y = (block_nf4 *) vy;
    float mid[15];
    nf4_mids(mid);
    const int64_t nb = k / QK_NF4;
    for (int64_t i = 0; i < nb; ++i) {
        nf4_quantize_block_ref(mid, x + i*QK_NF4, y + i);
    }
}

void dequantize_row_nf4(const void * GGML_RESTRICT vx, float * GGML_RESTRICT y, int64_t k) {
    GGML_ASSERT(k % QK_NF4 == 0);
    const block_nf4 * GGML_RESTRICT x = (const block_nf4 *) vx;
    const int64_t nb = k / QK_NF4;
    for (int64_t i = 0; i < nb; ++i) {
        const float d = GGML_FP16_TO_FP32(x[i].d);
        const uint8_t * qs = x[i].qs;
        for (int j = 0; j < QK_NF4/2; ++j) {
            y[j           ] = d * kvalues_nf4[qs[j] & 0xf];
            y[j + QK_NF4/2] = d * kvalues_nf4[qs[j] >>  4];
        }
        y += QK_NF4;
    }
}

// With an importance matrix: the weights are w[j] = qw[j] * sqrt(sigma2 + x[j]^2) as for IQ4_NL.
// Candidate inverse scales +-(127 + t)/amax, t = -7..7 (both signs: the codebook is not
// symmetric), each with its least-squares scale sum(w q x)/sum(w q^2) for its indices; the
// candidate with the smallest weighted error wins. t = 0 with the + sign is the reference
// assignment, so the weighted error is never above the reference's before the fp16 rounding
// of the scale; the indices are then re-assigned for the stored (rounded) scale.
static void nf4_quantize_block_weighted(const float * mid, const float * x, const float * qw, block_nf4 * y) {
    float amax = 0.0f, sigma2 = 0.0f;
    for (int j = 0; j < QK_NF4; ++j) {
        amax = fmaxf(amax, fabsf(x[j]));
        sigma2 += x[j]*x[j];
    }
    sigma2 *= 2.0f/QK_NF4;
    if (!(amax > 0.0f) || !isfinite(amax)) {
        nf4_quantize_block_ref(mid, x, y);
        return;
    }
    float w[QK_NF4];
    for (int j = 0; j < QK_NF4; ++j) {
        w[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j]);
    }
    float best_d = amax / 127.0f, best = -1.0f;
    for (int sign = 1; sign >= -1; sign -= 2) {
        for (int t = -7; t <= 7; ++t) {
            const float id = sign*(127.0f + t)/amax;
            float sumqx = 0.0f, sumq2 = 0.0f;
            for (int j = 0; j < QK_NF4; ++j) {
                const float q = kvalues_nf4[nf4_index(mid, x[j]*id)];
                sumqx += w[j]*q*x[j];
                sumq2 += w[j]*q*q;
            }
            // weighted error at the optimal scale is sum(w x^2) - sumqx^2/sumq2
            if (sumq2 > 0.0f && (best < 0.0f || sumqx*sumqx > best*sumq2)) {
                best_d = sumqx/sumq2;
                best   = best_d*sumqx;
            }
        }
    }
    y->d = GGML_FP32_TO_FP16(best_d);
    const float df = GGML_FP16_TO_FP32(y->d);
    const float id = df != 0.0f ? 1.0f/df : 0.0f;
    uint8_t L[QK_NF4];
    for (int j = 0; j < QK_NF4; ++j) {
        L[j] = nf4_index(mid, x[j]*id);
    }
    nf4_pack(L, y->qs);
}

size_t quantize_nf4(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrow, int64_t n_per_row,
                    const float * quant_weights) {
    GGML_ASSERT(n_per_row % QK_NF4 == 0);
    const int64_t nb = n_per_row / QK_NF4;
    block_nf4 * y = (block_nf4 *) dst;
    if (quant_weights == NULL) {
        quantize_row_nf4_ref(src, y, nrow*n_per_row);
    } else {
        float mid[15];
        nf4_mids(mid);
        for (int64_t row = 0; row < nrow; ++row) {
            for (int64_t i = 0; i < nb; ++i) {
                nf4_quantize_block_weighted(mid, src + row*n_per_row + i*QK_NF4, quant_weights + i*QK_NF4,
                                            y + row*nb + i);
            }
        }
    }
    return nrow * nb * sizeof(block_nf4);
}
