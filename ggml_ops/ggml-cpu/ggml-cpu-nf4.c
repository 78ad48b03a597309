// CPU kernels of GGML_TYPE_NF4: IQ4_NL's dot products (ggml-cpu/quants.c and arch/{x86,arm}/quants.c)
// with the NF4 codebook kvalues_nf4 in place of kvalues_iq4nl. Both codebooks are int8 within
// [-127, 127], so the sign trick of the AVX2 kernel (|a| * sign(b, a)) stays exact.
// One file for all architectures: AVX2 and NEON paths, the scalar loop everywhere else and for
// the tail block.

#define GGML_COMMON_DECL_C
#define GGML_COMMON_IMPL_C
#include "ggml-common.h"

#include "ggml-cpu-impl.h"
#include "simd-mappings.h"
#include "ggml-nf4.h"
#include "ggml-cpu-nf4.h"

#include <assert.h>

void quantize_row_nf4(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    assert(k % QK_NF4 == 0);
    quantize_row_nf4_ref(x, y, k);
}

static inline float nf4_vec_dot_blocks_scalar(const block_nf4 * GGML_RESTRICT x, const block_q8_0 * GGML_RESTRICT y,
                                              int ib, int nb) {
    float sumf = 0;
    for (; ib < nb; ++ib) {
        const float d = GGML_CPU_FP16_TO_FP32(y[ib].d)*GGML_CPU_FP16_TO_FP32(x[ib].d);
        int sumi1 = 0, sumi2 = 0;
        for (int j = 0; j < QK_NF4/2; ++j) {
            sumi1 += y[ib].qs[j+       0] * kvalues_nf4[x[ib].qs[j] & 0xf];
            sumi2 += y[ib].qs[j+QK_NF4/2] * kvalues_nf4[x[ib].qs[j] >>  4];
        }
        sumf += d * (sumi1 + sumi2);
    }
    return sumf;
}

void ggml_vec_dot_nf4_q8_0_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx,
                                   const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    GGML_UNUSED(nrc);
    GGML_UNUSED(bx);
    GGML_UNUSED(by);
    GGML_UNUSED(bs);
    assert(n % QK_NF4 == 0);
    static_assert(QK_NF4 == QK8_0, "QK_NF4 and QK8_0 must be the same");

    *s = nf4_vec_dot_blocks_scalar((const block_nf4 *) vx, (const block_q8_0 *) vy, 0, n / QK_NF4);
}

#if defined(__AVX2__)
static inline float nf4_hsum_float_8(const __m256 x) {
    __m128 res = _mm256_extractf128_ps(x, 1);
    res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    res = _mm_add_ss(res, _mm_movehdup_ps(res));
    return _mm_cvtss_f32(res);
}

// multiply int8 pairs and add adjacent products into int16 (x in [-127, 127])
static inline __m256i nf4_mul_add_epi8(const __m256i x, const __m256i y) {
    const __m256i ax = _mm256_sign_epi8(x, x);
    const __m256i sy = _mm256_sign_epi8(y, x);
    return _mm256_maddubs_epi16(ax, sy);
}

#define NF4_MM256_SET_M128I(a, b) _mm256_insertf128_si256(_mm256_castsi128_si256(b), (a), 1)
#endif

void ggml_vec_dot_nf4_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx,
                           const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    GGML_UNUSED(nrc);
    GGML_UNUSED(bx);
    GGML_UNUSED(by);
    GGML_UNUSED(bs);
    assert(n % QK_NF4 == 0);

    const block_nf4  * GGML_RESTRICT x = vx;
    const block_q8_0 * GGML_RESTRICT y = vy;

    const int nb = n / QK_NF4;

    int ib = 0;
    float sumf = 0;

#if defined(__AVX2__)
    const __m128i values128 = _mm_loadu_si128((const __m128i *) kvalues_nf4);
    const __m128i m4b  = _mm_set1_epi8(0x0f);
    const __m256i mone = _mm256_set1_epi16(1);

    __m256 accum1 = _mm256_setzero_ps();
    __m256 accum2 = _mm256_setzero_ps();
    for (; ib + 1 < nb; ib += 2) {
        const __m128i q4bits_1 = _mm_loadu_si128((const __m128i *) x[ib + 0].qs);
        const __m128i q4bits_2 = _mm_loadu_si128((const __m128i *) x[ib + 1].qs);
        const __m256i q8b_1 = _mm256_loadu_si256((const __m256i *) y[ib + 0].qs);
        const __m256i q8b_2 = _mm256_loadu_si256((const __m256i *) y[ib + 1].qs);
        const __m256i q4b_1 = NF4_MM256_SET_M128I(_mm_shuffle_epi8(values128, _mm_and_si128(_mm_srli_epi16(q4bits_1, 4), m4b)),
                                                  _mm_shuffle_epi8(values128, _mm_and_si128(q4bits_1, m4b)));
        const __m256i q4b_2 = NF4_MM256_SET_M128I(_mm_shuffle_epi8(values128, _mm_and_si128(_mm_srli_epi16(q4bits_2, 4), m4b)),
                                                  _mm_shuffle_epi8(values128, _mm_and_si128(q4bits_2, m4b)));
        const __m256i p16_1 = nf4_mul_add_epi8(q4b_1, q8b_1);
        const __m256i p16_2 = nf4_mul_add_epi8(q4b_2, q8b_2);
        const __m256i p_1 = _mm256_madd_epi16(p16_1, mone);
        const __m256i p_2 = _mm256_madd_epi16(p16_2, mone);
        accum1 = _mm256_fmadd_ps(_mm256_set1_ps(GGML_CPU_FP16_TO_FP32(y[ib + 0].d)*GGML_CPU_FP16_TO_FP32(x[ib + 0].d)),
                _mm256_cvtepi32_ps(p_1), accum1);
        accum2 = _mm256_fmadd_ps(_mm256_set1_ps(GGML_CPU_FP16_TO_FP32(y[ib + 1].d)*GGML_CPU_FP16_TO_FP32(x[ib + 1].d)),
                _mm256_cvtepi32_ps(p_2), accum2);
    }

    sumf = nf4_hsum_float_8(_mm256_add_ps(accum1, accum2));

#elif defined(__ARM_NEON)
    const int8x16_t values = vld1q_s8(kvalues_nf4);
    const uint8x16_t m4b = vdupq_n_u8(0x0f);
    uint8x16x2_t q4bits;
    int8x16x4_t q4b;
    int8x16x4_t q8b;
    int32x4_t prod_1, prod_2;

    for (; ib + 1 < nb; ib += 2) {
        q4bits.val[0] = vld1q_u8(x[ib + 0].qs);
        q4bits.val[1] = vld1q_u8(x[ib + 1].qs);
        q8b.val[0]    = vld1q_s8(y[ib + 0].qs);
        q8b.val[1]    = vld1q_s8(y[ib + 0].qs + 16);
        q8b.val[2]    = vld1q_s8(y[ib + 1].qs);
        q8b.val[3]    = vld1q_s8(y[ib + 1].qs + 16);

        q4b.val[0] = ggml_vqtbl1q_s8(values, vandq_u8  (q4bits.val[0], m4b));
        q4b.val[1] = ggml_vqtbl1q_s8(values, vshrq_n_u8(q4bits.val[0], 4));
        q4b.val[2] = ggml_vqtbl1q_s8(values, vandq_u8  (q4bits.val[1], m4b));
        q4b.val[3] = ggml_vqtbl1q_s8(values, vshrq_n_u8(q4bits.val[1], 4));

        prod_1 = ggml_vdotq_s32(ggml_vdotq_s32(vdupq_n_s32(0), q4b.val[0], q8b.val[0]), q4b.val[1], q8b.val[1]);
        prod_2 = ggml_vdotq_s32(ggml_vdotq_s32(vdupq_n_s32(0), q4b.val[2], q8b.val[2]), q4b.val[3], q8b.val[3]);

        sumf +=
            GGML_CPU_FP16_TO_FP32(x[ib+0].d) * GGML_CPU_FP16_TO_FP32(y[ib + 0].d) * vaddvq_s32(prod_1) +
            GGML_CPU_FP16_TO_FP32(x[ib+1].d) * GGML_CPU_FP16_TO_FP32(y[ib + 1].d) * vaddvq_s32(prod_2);
    }
#endif

    *s = sumf + nf4_vec_dot_blocks_scalar(x, y, ib, nb);
}
