// CUDA kernel of GGML_OP_LOWRANK_ATTN: attention of a few query tokens over a latent KV cache.
//
// Same math as the CPU kernel (ggml_ops/ggml-cpu/ggml-cpu-lowrank.c). The cells are split into
// chunks; one block handles one chunk, one KV head and one stream, one thread per K dimension:
// per cell it rebuilds that head's K slice from the latent (A_k in F16), adds the bias, applies
// the per-head RMSNorm when the op has a k-norm (a block sum of squares), applies RoPE (theta = p * omega, as ggml's CUDA rope computes it in F32), scores the head's query
// heads of every token and folds the latent V row into a running softmax whose (max, sum,
// accumulator) rows live in a scratch buffer. A second kernel merges the chunks.
// A_k of another type and quantized latents are converted to F16 first (ggml's converters).

#include "lowrank-attn.cuh"
#include "convert.cuh"

#include "ggml-lowrank.h"

#define LOWRANK_ATTN_MAX_HEAD  256 // threads per block = n_embd_head
#define LOWRANK_ATTN_MAX_ROWS  64  // query rows (tokens x query heads of one KV head) per block
#define LOWRANK_ATTN_CHUNK     64  // cells per chunk, at least
#define LOWRANK_ATTN_SCRATCH   (64ll << 20)

struct lowrank_attn_args {
    int64_t d, n_head, n_tok, n_stream, r_k, r_v, n_kv, gqa;
    int64_t q_nb1, q_nb2, q_nb3;                 // bytes
    int64_t ck_nb1, ck_nb2, cv_nb1, cv_nb2;      // bytes
    int64_t m_nb1, m_nb3, m_ne3;                 // bytes / planes
    int     n_dims, neox, mask_f16, k_norm;
    float   k_norm_eps;
    float   scale, freq_base, freq_scale, ext_factor, mscale, corr0, corr1;
    int64_t chunk;                               // cells per chunk
};

template <typename T>
static __device__ __forceinline__ float lowrank_attn_load(const T * p) {
    return ggml_cuda_cast<float>(*p);
}

static __device__ __forceinline__ float lowrank_attn_mask(const char * mask, const lowrank_attn_args & a, int64_t j, int64_t t, int64_t s) {
    const char * p = mask + (a.m_ne3 == 1 ? 0 : s*a.m_nb3) + t*a.m_nb1;
    return a.mask_f16 ? __half2float(((const half *) p)[j]) : ((const float *) p)[j];
}

static __device__ __forceinline__ float lowrank_attn_block_sum(float x, float * red) {
    for (int off = WARP_SIZE/2; off > 0; off >>= 1) {
        x += __shfl_xor_sync(0xffffffff, x, off, WARP_SIZE);
    }
    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    __syncthreads();
    if (lane == 0) {
        red[warp] = x;
    }
    __syncthreads();
    float sum = 0.0f;
    for (int w = 0; w < (int) (blockDim.x / WARP_SIZE); ++w) {
        sum += red[w];
    }
    return sum;
}

// grid: (n_chunks, n_head_kv, n_stream); block: d threads
template <typename TC>
static __global__ void lowrank_attn_partial(
        const char * __restrict__ q, const half * __restrict__ a_k, const TC * __restrict__ c_k, const TC * __restrict__ c_v,
        const int32_t * __restrict__ pos, const char * __restrict__ mask, const float * __restrict__ b_k,
        const float * __restrict__ freq_factors, const float * __restrict__ k_norm_w, float * __restrict__ part,
        const lowrank_attn_args a) {
    extern __shared__ float smem[];
    float * ck_s  = smem;              // r_k
    float * cv_s  = ck_s + a.r_k;      // r_v
    float * k_s   = cv_s + a.r_v;      // d
    float * red   = k_s + a.d;         // warps
    float * w_s   = red + WARP_SIZE;   // per query row: softmax rescale and weight of the cell
    float * m_s   = w_s + 2*LOWRANK_ATTN_MAX_ROWS; // per query row: running max, sum

    const int64_t chunk = blockIdx.x;
    const int64_t g     = blockIdx.y;
    const int64_t s     = blockIdx.z;
    const int     d     = threadIdx.x;
    const int64_t rows  = a.n_tok*a.gqa;
    const int64_t j0    = chunk*a.chunk;
    const int64_t j1    = min(j0 + a.chunk, a.n_kv);

    // this thread's rotation: pair index, partner and sign
    const int half_dims = a.n_dims/2;
    int   pair = -1;
    float omega = 0.0f;
    if (d < a.n_dims) {
        pair = a.neox ? d % half_dims : d/2;
        const float extrap = powf(a.freq_base, -2.0f*pair/a.n_dims) / (freq_factors ? freq_factors[pair] : 1.0f);
        omega = a.freq_scale*extrap;
        if (a.ext_factor != 0.0f) {
            const float y   = (pair - a.corr0) / fmaxf(0.001f, a.corr1 - a.corr0);
            const float mix = (1.0f - fminf(1.0f, fmaxf(0.0f, y))) * a.ext_factor;
            omega = omega*(1.0f - mix) + extrap*mix;
        }
    }
    const bool first = a.neox ? d < half_dims : d % 2 == 0; // x0 of its pair
    const int  other = a.neox ? (first ? d + half_dims : d - half_dims) : (first ? d + 1 : d - 1);

    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
        m_s[2*r + 0] = -INFINITY;
        m_s[2*r + 1] = 0.0f;
    }
    float * acc0 = part + ((chunk*a.n_stream + s)*a.n_tok*a.n_head)*(a.r_v + 2);
    for (int64_t t = 0; t < a.n_tok; ++t) {
        for (int64_t hh = 0; hh < a.gqa; ++hh) {
            float * acc = acc0 + (t*a.n_head + g*a.gqa + hh)*(a.r_v + 2) + 2;
            for (int64_t r = threadIdx.x; r < a.r_v; r += blockDim.x) {
                acc[r] = 0.0f;
            }
        }
    }
    __syncthreads();

    const half * a_row = a_k + (g*a.d + d)*a.r_k;

    for (int64_t j = j0; j < j1; ++j) {
        bool live = false;
        for (int64_t t = 0; t < a.n_tok && !live; ++t) {
            live = lowrank_attn_mask(mask, a, j, t, s) != -INFINITY;
        }
        if (!live) {
            continue; // the same for every thread of the block
        }

        const TC * ck = (const TC *) ((const char *) c_k + j*a.ck_nb1 + s*a.ck_nb2);
        const TC * cv = (const TC *) ((const char *) c_v + j*a.cv_nb1 + s*a.cv_nb2);
        for (int64_t r = threadIdx.x; r < a.r_k; r += blockDim.x) {
            ck_s[r] = lowrank_attn_load(ck + r);
        }
        for (int64_t r = threadIdx.x; r < a.r_v; r += blockDim.x) {
            cv_s[r] = lowrank_attn_load(cv + r);
        }
        __syncthreads();

        float kd = 0.0f;
        for (int64_t r = 0; r < a.r_k; ++r) {
            kd += __half2float(a_row[r])*ck_s[r];
        }
        if (b_k) {
            kd += b_k[g*a.d + d];
        }
        if (a.k_norm) {
            const float ss = lowrank_attn_block_sum(kd*kd, red);
            kd *= rsqrtf(ss/a.d + a.k_norm_eps);
            if (k_norm_w) {
                kd *= k_norm_w[d];
            }
        }
        k_s[d] = kd;
        __syncthreads();

        if (pair >= 0) {
            float sn, cs;
            sincosf(pos[s*a.n_kv + j]*omega, &sn, &cs);
            sn *= a.mscale;
            cs *= a.mscale;
            const float x_other = k_s[other];
            kd = first ? kd*cs - x_other*sn : x_other*sn + kd*cs;
        }

        for (int64_t t = 0; t < a.n_tok; ++t) {
            const float m = lowrank_attn_mask(mask, a, j, t, s);
            for (int64_t hh = 0; hh < a.gqa; ++hh) {
                const int64_t h = g*a.gqa + hh;
                const float * qr = (const float *) (q + h*a.q_nb1 + t*a.q_nb2 + s*a.q_nb3);
                const float score = lowrank_attn_block_sum(qr[d]*kd, red)*a.scale + m;
                if (threadIdx.x == 0) {
                    const int64_t r = t*a.gqa + hh;
                    float ms = 1.0f;
                    float w  = 0.0f;
                    if (score != -INFINITY) {
                        if (score > m_s[2*r]) {
                            ms = expf(m_s[2*r] - score);
                            m_s[2*r] = score;
                            w = 1.0f;
                        } else {
                            w = expf(score - m_s[2*r]);
                        }
                    }
                    m_s[2*r + 1] = m_s[2*r + 1]*ms + w;
                    w_s[2*r + 0] = ms;
                    w_s[2*r + 1] = w;
                }
            }
        }
        __syncthreads();

        for (int64_t t = 0; t < a.n_tok; ++t) {
            for (int64_t hh = 0; hh < a.gqa; ++hh) {
                const int64_t r  = t*a.gqa + hh;
                const float   ms = w_s[2*r + 0];
                const float   w  = w_s[2*r + 1];
                float * acc = acc0 + (t*a.n_head + g*a.gqa + hh)*(a.r_v + 2) + 2;
                for (int64_t i = threadIdx.x; i < a.r_v; i += blockDim.x) {
                    acc[i] = acc[i]*ms + w*cv_s[i];
                }
            }
        }
        __syncthreads();
    }

    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
        const int64_t t  = r / a.gqa;
        const int64_t hh = r % a.gqa;
        float * pr = acc0 + (t*a.n_head + g*a.gqa + hh)*(a.r_v + 2);
        pr[0] = m_s[2*r + 0];
        pr[1] = m_s[2*r + 1];
    }
}

// grid: n_stream*n_tok*n_head; out: [r_v, n_tok, n_head, n_stream]
static __global__ void lowrank_attn_merge(const float * __restrict__ part, float * __restrict__ dst,
        const int64_t n_chunks, const int64_t rows_all, const int64_t r_v,
        const int64_t n_tok, const int64_t n_head, const int64_t nb1, const int64_t nb2, const int64_t nb3) {
    const int64_t row = blockIdx.x;               // (s*n_tok + t)*n_head + h
    const int64_t h   = row % n_head;
    const int64_t t   = (row / n_head) % n_tok;
    const int64_t s   = row / (n_head*n_tok);
    float * out = (float *) ((char *) dst + t*nb1 + h*nb2 + s*nb3);

    float mx = -INFINITY;
    for (int64_t c = 0; c < n_chunks; ++c) {
        mx = fmaxf(mx, part[(c*rows_all + row)*(r_v + 2)]);
    }
    float sum = 0.0f;
    for (int64_t c = 0; c < n_chunks; ++c) {
        const float * pr = part + (c*rows_all + row)*(r_v + 2);
        if (pr[0] != -INFINITY) {
            sum += pr[1]*expf(pr[0] - mx);
        }
    }
    for (int64_t i = threadIdx.x; i < r_v; i += blockDim.x) {
        float v = 0.0f;
        if (mx != -INFINITY) {
            for (int64_t c = 0; c < n_chunks; ++c) {
                const float * pr = part + (c*rows_all + row)*(r_v + 2);
                if (pr[0] != -INFINITY) {
                    v += pr[2 + i]*expf(pr[0] - mx);
                }
            }
            v /= sum;
        }
        out[i] = v;
    }
}

static bool lowrank_attn_latent_ok(const ggml_tensor * c) {
    return c->type == GGML_TYPE_F16 || c->type == GGML_TYPE_F32 ||
        (ggml_get_to_fp16_cuda(c->type) != nullptr && c->nb[1] == (size_t) ggml_row_size(c->type, c->ne[0]));
}

bool ggml_cuda_lowrank_attn_supported(const ggml_tensor * op) {
    const ggml_tensor * q   = op->src[0];
    const ggml_tensor * a_k = op->src[1];
    const int64_t d   = q->ne[0];
    const int64_t gqa = q->ne[1] / (a_k->ne[1] / d);
    return d % WARP_SIZE == 0 && d <= LOWRANK_ATTN_MAX_HEAD && q->ne[2]*gqa <= LOWRANK_ATTN_MAX_ROWS &&
        ggml_is_contiguous(a_k) && (a_k->type == GGML_TYPE_F16 || ggml_get_to_fp16_cuda(a_k->type) != nullptr) &&
        lowrank_attn_latent_ok(op->src[2]) && lowrank_attn_latent_ok(op->src[3]) &&
        (op->src[2]->type == GGML_TYPE_F32) == (op->src[3]->type == GGML_TYPE_F32);
}

// a latent cache view as F16 or F32 rows: as it is, or converted stream by stream
static const void * lowrank_attn_latent(ggml_backend_cuda_context & ctx, const ggml_tensor * c,
        ggml_cuda_pool_alloc<half> & buf, int64_t & nb1, int64_t & nb2) {
    nb1 = c->nb[1];
    nb2 = c->nb[2];
    if (c->type == GGML_TYPE_F16 || c->type == GGML_TYPE_F32) {
        return c->data;
    }
    const int64_t n = c->ne[0]*c->ne[1];
    buf.alloc(n*c->ne[2]);
    const to_fp16_cuda_t to_fp16 = ggml_get_to_fp16_cuda(c->type);
    for (int64_t s = 0; s < c->ne[2]; ++s) {
        to_fp16((const char *) c->data + s*c->nb[2], buf.ptr + s*n, n, ctx.stream());
    }
    nb1 = c->ne[0]*sizeof(half);
    nb2 = n*sizeof(half);
    return buf.ptr;
}

void ggml_cuda_op_lowrank_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * a_k  = dst->src[1];
    const ggml_tensor * c_k  = dst->src[2];
    const ggml_tensor * c_v  = dst->src[3];
    const ggml_tensor * pos  = dst->src[4];
    const ggml_tensor * mask = dst->src[5];
    const ggml_tensor * b_k  = dst->src[6];
    const ggml_tensor * ff   = dst->src[7];
    const ggml_tensor * kn_w = dst->src[8];
    cudaStream_t stream = ctx.stream();

    GGML_ASSERT(ggml_cuda_lowrank_attn_supported(dst));
    GGML_ASSERT(ggml_is_contiguous(dst));

    lowrank_attn_args a;
    a.d        = q->ne[0];
    a.n_head   = q->ne[1];
    a.n_tok    = q->ne[2];
    a.n_stream = q->ne[3];
    a.r_k      = a_k->ne[0];
    a.r_v      = c_v->ne[0];
    a.n_kv     = c_k->ne[1];
    a.gqa      = a.n_head / (a_k->ne[1] / a.d);
    a.q_nb1 = q->nb[1]; a.q_nb2 = q->nb[2]; a.q_nb3 = q->nb[3];
    a.m_nb1 = mask->nb[1]; a.m_nb3 = mask->nb[3]; a.m_ne3 = mask->ne[3];
    a.mask_f16 = mask->type == GGML_TYPE_F16;
    a.n_dims   = ggml_get_op_params_i32(dst, GGML_LOWRANK_ATTN_N_DIMS);
    a.neox     = ggml_get_op_params_i32(dst, GGML_LOWRANK_ATTN_MODE) == GGML_ROPE_TYPE_NEOX;
    a.k_norm     = ggml_get_op_params_i32(dst, GGML_LOWRANK_ATTN_K_NORM);
    a.k_norm_eps = ggml_get_op_params_f32(dst, GGML_LOWRANK_ATTN_K_NORM_EPS);
    a.scale      = ggml_get_op_params_f32(dst, GGML_LOWRANK_ATTN_SCALE);
    a.freq_base  = ggml_get_op_params_f32(dst, GGML_LOWRANK_ATTN_FREQ_BASE);
    a.freq_scale = ggml_get_op_params_f32(dst, GGML_LOWRANK_ATTN_FREQ_SCALE);
    a.ext_factor = ggml_get_op_params_f32(dst, GGML_LOWRANK_ATTN_EXT_FACTOR);
    a.mscale     = ggml_get_op_params_f32(dst, GGML_LOWRANK_ATTN_ATTN_FACTOR);
    if (a.ext_factor != 0.0f) {
        a.mscale *= 1.0f + 0.1f*logf(1.0f/a.freq_scale);
    }
    float corr[2];
    ggml_rope_yarn_corr_dims(a.n_dims, ggml_get_op_params_i32(dst, GGML_LOWRANK_ATTN_N_CTX_ORIG), a.freq_base,
        ggml_get_op_params_f32(dst, GGML_LOWRANK_ATTN_BETA_FAST), ggml_get_op_params_f32(dst, GGML_LOWRANK_ATTN_BETA_SLOW), corr);
    a.corr0 = corr[0];
    a.corr1 = corr[1];

    // A_k in F16
    ggml_cuda_pool_alloc<half> a_buf(ctx.pool());
    const half * a_h = (const half *) a_k->data;
    if (a_k->type != GGML_TYPE_F16) {
        a_buf.alloc(ggml_nelements(a_k));
        ggml_get_to_fp16_cuda(a_k->type)(a_k->data, a_buf.ptr, ggml_nelements(a_k), stream);
        a_h = a_buf.ptr;
    }

    ggml_cuda_pool_alloc<half> ck_buf(ctx.pool());
    ggml_cuda_pool_alloc<half> cv_buf(ctx.pool());
    const void * ck = lowrank_attn_latent(ctx, c_k, ck_buf, a.ck_nb1, a.ck_nb2);
    const void * cv = lowrank_attn_latent(ctx, c_v, cv_buf, a.cv_nb1, a.cv_nb2);
    const bool f32 = c_k->type == GGML_TYPE_F32;

    // chunks: enough blocks to fill the GPU, scratch bounded
    const int64_t n_head_kv = a.n_head / a.gqa;
    const int64_t rows_all  = a.n_stream*a.n_tok*a.n_head;
    const int64_t nsm       = ggml_cuda_info().devices[ctx.device].nsm;
    int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>((a.n_kv + LOWRANK_ATTN_CHUNK - 1)/LOWRANK_ATTN_CHUNK,
                                                               (4*nsm + n_head_kv*a.n_stream - 1)/(n_head_kv*a.n_stream)));
    n_chunks = std::max<int64_t>(1, std::min<int64_t>(n_chunks, LOWRANK_ATTN_SCRATCH/(rows_all*(a.r_v + 2)*(int64_t) sizeof(float))));
    a.chunk  = (a.n_kv + n_chunks - 1)/n_chunks;

    ggml_cuda_pool_alloc<float> part(ctx.pool(), n_chunks*rows_all*(a.r_v + 2));

    const dim3   grid(n_chunks, n_head_kv, a.n_stream);
    const dim3   block(a.d);
    const size_t smem = (a.r_k + a.r_v + a.d + WARP_SIZE + 4*LOWRANK_ATTN_MAX_ROWS)*sizeof(float);
    const float * bias = b_k ? (const float *) b_k->data : nullptr;
    const float * ffp  = ff  ? (const float *) ff->data  : nullptr;
    const float * knw  = kn_w ? (const float *) kn_w->data : nullptr;
    if (f32) {
        lowrank_attn_partial<float><<<grid, block, smem, stream>>>((const char *) q->data, a_h, (const float *) ck, (const float *) cv,
            (const int32_t *) pos->data, (const char *) mask->data, bias, ffp, knw, part.ptr, a);
    } else {
        lowrank_attn_partial<half><<<grid, block, smem, stream>>>((const char *) q->data, a_h, (const half *) ck, (const half *) cv,
            (const int32_t *) pos->data, (const char *) mask->data, bias, ffp, knw, part.ptr, a);
    }
    CUDA_CHECK(cudaGetLastError());

    lowrank_attn_merge<<<rows_all, 128, 0, stream>>>(part.ptr, (float *) dst->data, n_chunks, rows_all, a.r_v,
        a.n_tok, a.n_head, dst->nb[1], dst->nb[2], dst->nb[3]);
    CUDA_CHECK(cudaGetLastError());
}
