// CPU kernel of GGML_OP_LOWRANK_ATTN: attention of a few query tokens over a latent KV cache.
//
// First the threads convert A_k, together, into one F32 copy stored transposed (r_k rows of
// n_embd_k_gqa): K = sum_r c[r] * A_k[:, r] is then r_k full-width SIMD multiply-adds per cell,
// with no horizontal sums (a vec_dot per output row of K, r_k long, was slower than the
// unfused matmul it replaces). Threads split the cached cells. For each cell a thread rebuilds
// K, adds the bias, applies RoPE, scores every query head of every token against it and folds
// the cell into a running softmax over the latent V (online softmax, as flash attention does).
// With a k-norm (qwen3, gemma3) each head's slice of K is RMS-normalised (and scaled by the norm
// weight) between the bias and RoPE, with the sums of ggml's rms_norm, so the chain is the one
// the model's graph builds.
// Each thread keeps its own (max, sum, accumulator) per query row; after a barrier the threads
// merge them, each merging a share of the rows.
//
// RoPE angles are p * omega[i] (ggml_lowrank_attn_rope_omega). cos/sin are computed exactly at
// every 32nd cell and wherever positions are not consecutive, and advanced by one rotation per
// cell in between, so the kernel does not spend n_dims/2 sincos per cell and layer. The anchors
// depend on the cell index only, not on the thread split: results do not change with -t.

#include "ggml-cpu-lowrank.h"

#include "ggml-lowrank.h"
#include "ggml-cpu-impl.h"
#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "simd-mappings.h"
#include "vec.h"

#include <math.h>
#include <string.h>

#define LOWRANK_ATTN_ANCHOR 32
#define LOWRANK_ATTN_CELLS  4  // cells whose K is rebuilt together
#define LOWRANK_ATTN_PAD    16 // floats between threads' areas: one cache line

struct lowrank_attn_shape {
    int64_t d;        // n_embd_head
    int64_t n_head;
    int64_t n_tokens; // per stream
    int64_t n_stream;
    int64_t r_k;
    int64_t r_v;
    int64_t n_out;    // n_embd_head*n_head_kv
    int64_t n_kv;
    int     n_dims;
    int64_t row;      // floats per partial row: max, sum, r_v accumulators
    int64_t part;     // floats of one thread's partials
    int64_t scratch;  // floats of one thread's scratch
    int64_t stride;   // floats from one thread's area to the next (cache-line aligned)
};

static struct lowrank_attn_shape lowrank_attn_shape(const struct ggml_tensor * dst) {
    const struct ggml_tensor * q   = dst->src[0];
    const struct ggml_tensor * a_k = dst->src[1];
    const struct ggml_tensor * c_k = dst->src[2];
    const struct ggml_tensor * c_v = dst->src[3];

    struct lowrank_attn_shape s;
    s.d        = q->ne[0];
    s.n_head   = q->ne[1];
    s.n_tokens = q->ne[2];
    s.n_stream = q->ne[3];
    s.r_k      = a_k->ne[0];
    s.r_v      = c_v->ne[0];
    s.n_out    = a_k->ne[1];
    s.n_kv     = c_k->ne[1];
    s.n_dims   = ggml_get_op_params_i32(dst, GGML_LOWRANK_ATTN_N_DIMS);
    s.row      = s.r_v + 2;
    s.part     = s.n_stream*s.n_tokens*s.n_head*s.row;

    // k and latent K as F32 of LOWRANK_ATTN_CELLS cells, latent V as F32, cos, sin, step cos, step sin
    s.scratch = LOWRANK_ATTN_CELLS*(s.n_out + s.r_k) + s.r_v + 4*(s.n_dims/2);
    s.stride  = (s.part + s.scratch + 2*LOWRANK_ATTN_PAD - 1)/LOWRANK_ATTN_PAD*LOWRANK_ATTN_PAD;
    return s;
}

size_t ggml_lowrank_attn_work_size(const struct ggml_tensor * dst, int n_threads) {
    const struct lowrank_attn_shape s = lowrank_attn_shape(dst);
    // per thread partials, scratch and angle steps (double); A_k^T in F32, shared
    return (size_t) n_threads*(s.stride*sizeof(float) + (s.n_dims/2)*sizeof(double)) + s.r_k*s.n_out*sizeof(float);
}

static inline float lowrank_attn_mask(const struct ggml_tensor * mask, int64_t j, int64_t t, int64_t s) {
    const int64_t i3 = mask->ne[3] == 1 ? 0 : s;
    const char * p = (const char *) mask->data + j*mask->nb[0] + t*mask->nb[1] + i3*mask->nb[3];
    return mask->type == GGML_TYPE_F16 ? GGML_CPU_FP16_TO_FP32(*(const ggml_fp16_t *) p) : *(const float *) p;
}

// one latent row as F32: a pointer into the cache when it already is F32, else converted into buf
static inline const float * lowrank_attn_row_f32(const struct ggml_tensor * c, const char * row, int64_t n, float * buf) {
    if (c->type == GGML_TYPE_F32) {
        return (const float *) row;
    }
    if (c->type == GGML_TYPE_F16) {
        ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) row, buf, n); // SIMD, unlike the generic to_float
        return buf;
    }
    ggml_get_type_traits(c->type)->to_float(row, buf, n);
    return buf;
}

// K of LOWRANK_ATTN_CELLS cells at once: k[n][0:n_out] += sum_r c[n][r] * a_t[r*n_out : (r+1)*n_out].
// Each load of A_k^T serves every cell, and the accumulators (cells x two SIMD vectors) stay in
// registers across all r: multiply-adds bound instead of memory bound.
static void lowrank_attn_rebuild(int64_t n_out, int64_t r_k, const float * a_t, const float * const * c, float * k) {
    enum { NC = LOWRANK_ATTN_CELLS };
    int64_t i0 = 0;
#if defined(GGML_SIMD) && !defined(__ARM_FEATURE_SVE) && !defined(__riscv_v_intrinsic)
    // NC cells x 2 vectors of accumulators: 8 + 2 (A) + 1 (c) of AVX2's 16 registers
    for (; i0 + 2*GGML_F32_EPR <= n_out; i0 += 2*GGML_F32_EPR) {
        GGML_F32_VEC acc[NC][2];
        for (int n = 0; n < NC; ++n) {
            acc[n][0] = GGML_F32_VEC_LOAD(k + n*n_out + i0);
            acc[n][1] = GGML_F32_VEC_LOAD(k + n*n_out + i0 + GGML_F32_EPR);
        }
        for (int64_t r = 0; r < r_k; ++r) {
            const float * ar = a_t + r*n_out + i0;
            GGML_F32_VEC a0 = GGML_F32_VEC_LOAD(ar);
            GGML_F32_VEC a1 = GGML_F32_VEC_LOAD(ar + GGML_F32_EPR);
#if defined(__GNUC__) && defined(__AVX__) && !defined(__AVX512F__)
            // keep A in registers: GCC would fold these loads into every FMA, doubling the loads
            // per FMA, and the loop is load bound then
            __asm__("" : "+x"(a0), "+x"(a1));
#endif
            for (int n = 0; n < NC; ++n) {
                const GGML_F32_VEC b = GGML_F32_VEC_SET1(c[n][r]);
                acc[n][0] = GGML_F32_VEC_FMA(acc[n][0], a0, b);
                acc[n][1] = GGML_F32_VEC_FMA(acc[n][1], a1, b);
            }
        }
        for (int n = 0; n < NC; ++n) {
            GGML_F32_VEC_STORE(k + n*n_out + i0,                acc[n][0]);
            GGML_F32_VEC_STORE(k + n*n_out + i0 + GGML_F32_EPR, acc[n][1]);
        }
    }
#endif
    for (int n = 0; n < NC; ++n) { // the rest (n_out is a multiple of the tile for usual head sizes)
        for (int64_t r = 0; r < r_k; ++r) {
            for (int64_t i = i0; i < n_out; ++i) {
                k[n*n_out + i] += a_t[r*n_out + i]*c[n][r];
            }
        }
    }
}

void ggml_compute_forward_lowrank_attn(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const struct ggml_tensor * q    = dst->src[0];
    const struct ggml_tensor * a_k  = dst->src[1];
    const struct ggml_tensor * c_k  = dst->src[2];
    const struct ggml_tensor * c_v  = dst->src[3];
    const struct ggml_tensor * pos  = dst->src[4];
    const struct ggml_tensor * mask = dst->src[5];
    const struct ggml_tensor * b_k  = dst->src[6];
    const struct ggml_tensor * ff   = dst->src[7];
    const struct ggml_tensor * kn_w = dst->src[8];

    GGML_ASSERT(q->nb[0] == sizeof(float));
    GGML_ASSERT(c_k->nb[0] == ggml_type_size(c_k->type) && c_v->nb[0] == ggml_type_size(c_v->type));
    GGML_ASSERT(dst->nb[0] == sizeof(float));

    const struct lowrank_attn_shape sh = lowrank_attn_shape(dst);
    const int ith = params->ith;
    const int nth = params->nth;

    const int mode = ggml_get_op_params_i32(dst, GGML_LOWRANK_ATTN_MODE);
    const float scale = ggml_get_op_params_f32(dst, GGML_LOWRANK_ATTN_SCALE);
    const bool  k_norm     = ggml_get_op_params_i32(dst, GGML_LOWRANK_ATTN_K_NORM) != 0;
    const float k_norm_eps = ggml_get_op_params_f32(dst, GGML_LOWRANK_ATTN_K_NORM_EPS);
    const int64_t n_pair = sh.n_dims/2;
    const int64_t gqa    = sh.n_head/(sh.n_out/sh.d);

    float  * part  = (float *) params->wdata + ith*sh.stride;
    float  * k     = part + sh.part;
    float  * ck_f  = k + LOWRANK_ATTN_CELLS*sh.n_out;
    float  * cv_f  = ck_f + LOWRANK_ATTN_CELLS*sh.r_k;
    float  * cs    = cv_f + sh.r_v;
    float  * sn    = cs + n_pair;
    float  * st_c  = sn + n_pair;
    float  * st_s  = st_c + n_pair;
    double * omega = (double *) ((float *) params->wdata + nth*sh.stride) + ith*n_pair;
    float  * a_t   = (float *) ((double *) ((float *) params->wdata + nth*sh.stride) + nth*n_pair);

    float mscale;
    ggml_lowrank_attn_rope_omega(dst, ff ? (const float *) ff->data : NULL, omega, &mscale);
    for (int64_t i = 0; i < n_pair; ++i) {
        st_c[i] = (float) cos(omega[i]);
        st_s[i] = (float) sin(omega[i]);
    }

    // A_k^T in F32: a_t[r*n_out + i] = A_k[i, r]; rows of A_k shared out among the threads
    for (int64_t i = sh.n_out*ith/nth; i < sh.n_out*(ith + 1)/nth; ++i) {
        const float * row = lowrank_attn_row_f32(a_k, (const char *) a_k->data + i*a_k->nb[1], sh.r_k, ck_f);
        for (int64_t r = 0; r < sh.r_k; ++r) {
            a_t[r*sh.n_out + i] = row[r];
        }
    }

    ggml_barrier(params->threadpool);

    for (int64_t r = 0; r < sh.n_stream*sh.n_tokens*sh.n_head; ++r) {
        float * pr = part + r*sh.row;
        pr[0] = -INFINITY;
        pr[1] = 0.0f;
        memset(pr + 2, 0, sh.r_v*sizeof(float));
    }

    // cell ranges start at multiples of LOWRANK_ATTN_ANCHOR: the RoPE anchors do not depend on -t
    const int64_t n_blk = (sh.n_kv + LOWRANK_ATTN_ANCHOR - 1)/LOWRANK_ATTN_ANCHOR;
    const int64_t j0 = MIN(sh.n_kv, n_blk*ith/nth*LOWRANK_ATTN_ANCHOR);
    const int64_t j1 = MIN(sh.n_kv, n_blk*(ith + 1)/nth*LOWRANK_ATTN_ANCHOR);

    for (int64_t s = 0; s < sh.n_stream; ++s) {
        const int32_t * p = (const int32_t *) pos->data + s*sh.n_kv;
        int64_t prev = -1; // cell of the last computed cos/sin

        for (int64_t jn = j0; jn < j1; ) {
            // the next live cells (masked for every token: skipped), K rebuilt together
            int64_t cells[LOWRANK_ATTN_CELLS];
            const float * ck[LOWRANK_ATTN_CELLS];
            int nc = 0;
            for (; jn < j1 && nc < LOWRANK_ATTN_CELLS; ++jn) {
                bool live = false;
                for (int64_t t = 0; t < sh.n_tokens && !live; ++t) {
                    live = lowrank_attn_mask(mask, jn, t, s) != -INFINITY;
                }
                if (live) {
                    cells[nc++] = jn;
                }
            }
            if (nc == 0) {
                break;
            }
            for (int n = 0; n < LOWRANK_ATTN_CELLS; ++n) {
                // a short group repeats its first latent; those rows of K are not used
                ck[n] = n < nc ? lowrank_attn_row_f32(c_k, (const char *) c_k->data + cells[n]*c_k->nb[1] + s*c_k->nb[2],
                                                      sh.r_k, ck_f + n*sh.r_k)
                               : ck[0];
                if (b_k) {
                    memcpy(k + n*sh.n_out, b_k->data, sh.n_out*sizeof(float));
                } else {
                    memset(k + n*sh.n_out, 0, sh.n_out*sizeof(float));
                }
            }
            lowrank_attn_rebuild(sh.n_out, sh.r_k, a_t, ck, k);

            for (int n = 0; n < nc; ++n) {
                const int64_t j = cells[n];
                float * kc = k + n*sh.n_out;

                if (k_norm) {
                    // per head, as ggml_rms_norm then ggml_mul by the weight
                    for (int64_t g = 0; g < sh.n_out/sh.d; ++g) {
                        float * kg = kc + g*sh.d;
                        ggml_float sum = 0.0;
                        for (int64_t i = 0; i < sh.d; ++i) {
                            sum += (ggml_float) (kg[i]*kg[i]);
                        }
                        const float mean = sum/sh.d;
                        ggml_vec_scale_f32((int) sh.d, kg, 1.0f/sqrtf(mean + k_norm_eps));
                        if (kn_w) {
                            ggml_vec_mul_f32((int) sh.d, kg, kg, (const float *) kn_w->data);
                        }
                    }
                }

                // RoPE with the cell's position
                if (j % LOWRANK_ATTN_ANCHOR == 0 || prev != j - 1 || p[j] != p[j - 1] + 1) {
                    for (int64_t i = 0; i < n_pair; ++i) {
                        const double th = (double) p[j]*omega[i];
                        cs[i] = (float) cos(th);
                        sn[i] = (float) sin(th);
                    }
                } else {
                    for (int64_t i = 0; i < n_pair; ++i) {
                        const float c0 = cs[i];
                        cs[i] = c0*st_c[i] - sn[i]*st_s[i];
                        sn[i] = sn[i]*st_c[i] + c0*st_s[i];
                    }
                }
                prev = j;
                for (int64_t g = 0; g < sh.n_out/sh.d; ++g) {
                    float * kg = kc + g*sh.d;
                    for (int64_t i = 0; i < n_pair; ++i) {
                        const int64_t i0 = mode == GGML_ROPE_TYPE_NEOX ? i : 2*i;
                        const int64_t i1 = mode == GGML_ROPE_TYPE_NEOX ? i + n_pair : 2*i + 1;
                        const float x0 = kg[i0];
                        const float x1 = kg[i1];
                        const float c  = cs[i]*mscale;
                        const float si = sn[i]*mscale;
                        kg[i0] = x0*c - x1*si;
                        kg[i1] = x0*si + x1*c;
                    }
                }

                const float * cv = lowrank_attn_row_f32(c_v, (const char *) c_v->data + j*c_v->nb[1] + s*c_v->nb[2], sh.r_v, cv_f);

                // score and fold into the running softmax of every query row
                for (int64_t t = 0; t < sh.n_tokens; ++t) {
                    const float m = lowrank_attn_mask(mask, j, t, s);
                    if (m == -INFINITY) {
                        continue;
                    }
                    for (int64_t h = 0; h < sh.n_head; ++h) {
                        const float * qr = (const float *) ((const char *) q->data + h*q->nb[1] + t*q->nb[2] + s*q->nb[3]);
                        float score;
                        ggml_vec_dot_f32((int) sh.d, &score, 0, qr, 0, kc + (h/gqa)*sh.d, 0, 1);
                        score = score*scale + m;

                        float * pr = part + ((s*sh.n_tokens + t)*sh.n_head + h)*sh.row;
                        float w = 1.0f;
                        if (score > pr[0]) {
                            const float ms = expf(pr[0] - score); // 0 for the first live cell
                            ggml_vec_scale_f32((int) sh.r_v, pr + 2, ms);
                            pr[1] *= ms;
                            pr[0]  = score;
                        } else {
                            w = expf(score - pr[0]);
                        }
                        ggml_vec_mad_f32((int) sh.r_v, pr + 2, cv, w);
                        pr[1] += w;
                    }
                }
            }
        }
    }

    ggml_barrier(params->threadpool);

    // merge the threads' partials; a row with no live cell (all masked) gives zeros
    const int64_t n_rows = sh.n_stream*sh.n_tokens*sh.n_head;
    const int64_t r0 = n_rows*ith/nth;
    const int64_t r1 = n_rows*(ith + 1)/nth;
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t h = r % sh.n_head;
        const int64_t t = (r/sh.n_head) % sh.n_tokens;
        const int64_t s = r/(sh.n_head*sh.n_tokens);
        float * out = (float *) ((char *) dst->data + t*dst->nb[1] + h*dst->nb[2] + s*dst->nb[3]);

        float mx = -INFINITY;
        for (int it = 0; it < nth; ++it) {
            const float * pr = (const float *) params->wdata + it*sh.stride + r*sh.row;
            mx = MAX(mx, pr[0]);
        }
        memset(out, 0, sh.r_v*sizeof(float));
        if (mx == -INFINITY) {
            continue;
        }
        float sum = 0.0f;
        for (int it = 0; it < nth; ++it) {
            const float * pr = (const float *) params->wdata + it*sh.stride + r*sh.row;
            if (pr[0] == -INFINITY) {
                continue;
            }
            const float w = expf(pr[0] - mx);
            sum += pr[1]*w;
            ggml_vec_mad_f32((int) sh.r_v, out, pr + 2, w);
        }
        ggml_vec_scale_f32((int) sh.r_v, out, 1.0f/sum);
    }
}
