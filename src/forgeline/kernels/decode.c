/* The decoding step of a Llama-family model on a CPU, for a batch of at most 16 rows, one new token per row.
 *
 * Why native code: in batched decoding every new token costs one pass over all the weights with only M = batch
 * rows of activations. BLAS sgemm is tuned for large M and at M = 8 reaches about half the bandwidth a plain stream
 * over W achieves; and around the matrix products a decoder layer is some forty small torch operations (norms,
 * rotary embedding, cache writes, single-query attention, SwiGLU, residual adds), each a dispatch and an OpenMP
 * wake-up that costs more than its arithmetic at this size. Here a layer is five calls:
 *
 *   forgeline_linear(norm -> [wq; wk; wv])   forgeline_attention(rope, cache write, softmax(qK^T)V)
 *   forgeline_linear(wo, += residual)        forgeline_swiglu(norm -> silu(w1 x) * w3 x)
 *   forgeline_linear(w2, += residual)
 *
 * Arithmetic: fp32 accumulation everywhere; bf16 weights, activations and cache entries are widened to fp32 exactly
 * and results rounded to bf16 once (round to nearest even). fp32 results equal torch's up to summation order.
 *
 * Threads come from the OpenMP runtime torch already loaded (same soname, so the same pool); the caller passes
 * torch's thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MAX_ROWS 16
#define MAX_MATRICES 3

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float load_elem(const void *p, int is_bf16, int64_t i) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_elem(void *p, int is_bf16, int64_t i, float v) {
    if (is_bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* ------------------------------------------------------------------------------------------------------------
 * Dot products of R weight rows with MM activation rows (the activations already fp32, in L1)
 * ------------------------------------------------------------------------------------------------------------ */

/* Few activation rows leave the FMA units waiting on latency unless more weight rows run side by side. */
#define ROWS_FOR(MM) ((MM) <= 2 ? 4 : 2)

#ifdef __AVX512F__

/* Each weight row asks for the line this far ahead of itself: the hardware prefetcher alone keeps too few misses
 * in flight to saturate memory from one core (measured: fp32 ref-small step 11.7 -> 6-8 ms with 2-16 KiB). */
#define PREFETCH_BYTES 4096

static inline __m512 load_w(const void *row, int is_bf16, int64_t k, __mmask16 mask) {
    if (is_bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)row + k);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(mask, (const float *)row + k);
}

/* out[r * 8 + m] = dot(rows[r], x[m]). R and MM are compile-time constants in every instantiation below, so the
 * loops unroll and the R * MM accumulators stay in registers. */
static inline __attribute__((always_inline)) void dots_avx512(const float *x, int64_t K, const void *const *rows,
                                                              int is_bf16, int R, int MM, float *out) {
    __m512 acc[4][8];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < MM; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = (K - k >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1u);
        __m512 wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)rows[r] + (k << (is_bf16 ? 1 : 2)) + PREFETCH_BYTES, _MM_HINT_T0);
            wv[r] = load_w(rows[r], is_bf16, k, mask);
        }
#pragma GCC unroll 8
        for (int m = 0; m < MM; m++) {
            const __m512 xv = _mm512_maskz_loadu_ps(mask, x + (int64_t)m * K + k);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < MM; m++) out[r * 8 + m] = _mm512_reduce_add_ps(acc[r][m]);
}

#define INSTANCE(MM)                                                                                       \
    static void dots_f32_##MM(const float *x, int64_t K, const void *const *rows, float *out) {           \
        dots_avx512(x, K, rows, 0, ROWS_FOR(MM), MM, out);                                                 \
    }                                                                                                      \
    static void dots_bf16_##MM(const float *x, int64_t K, const void *const *rows, float *out) {          \
        dots_avx512(x, K, rows, 1, ROWS_FOR(MM), MM, out);                                                 \
    }
INSTANCE(1) INSTANCE(2) INSTANCE(3) INSTANCE(4) INSTANCE(5) INSTANCE(6) INSTANCE(7) INSTANCE(8)
#undef INSTANCE

typedef void (*dots_fn)(const float *, int64_t, const void *const *, float *);
static const dots_fn DOTS_F32[9] = {0, dots_f32_1, dots_f32_2, dots_f32_3, dots_f32_4,
                                    dots_f32_5, dots_f32_6, dots_f32_7, dots_f32_8};
static const dots_fn DOTS_BF16[9] = {0, dots_bf16_1, dots_bf16_2, dots_bf16_3, dots_bf16_4,
                                     dots_bf16_5, dots_bf16_6, dots_bf16_7, dots_bf16_8};

/* rows[0 .. ROWS_FOR(MM) - 1] must all be valid pointers (callers repeat the last row of a short block). */
static void dots(const float *x, int64_t K, int MM, const void *const *rows, int is_bf16, float *out) {
    (is_bf16 ? DOTS_BF16 : DOTS_F32)[MM](x, K, rows, out);
}

#else /* portable C: the compiler vectorises the k loop */

static void dots(const float *x, int64_t K, int MM, const void *const *rows, int is_bf16, float *out) {
    for (int r = 0; r < ROWS_FOR(MM); r++) {
        for (int m = 0; m < MM; m++) {
            const float *xm = x + (int64_t)m * K;
            float s = 0.0f;
            if (is_bf16) {
                const uint16_t *w = (const uint16_t *)rows[r];
                for (int64_t k = 0; k < K; k++) s += bf16_to_f32(w[k]) * xm[k];
            } else {
                const float *w = (const float *)rows[r];
                for (int64_t k = 0; k < K; k++) s += w[k] * xm[k];
            }
            out[r * 8 + m] = s;
        }
    }
}

#endif

/* The activations as fp32, optionally RMS-normalised and scaled by norm_w (the pre-norm of the layer): read once
 * here, then from L1 for every weight row. */
static float *stage_input(const void *x, const void *norm_w, float eps, int64_t M, int64_t K, int is_bf16) {
    float *xf = (float *)malloc(sizeof(float) * (size_t)(M * K));
    if (!xf) return NULL;
    for (int64_t m = 0; m < M; m++) {
        float *row = xf + m * K;
        for (int64_t k = 0; k < K; k++) row[k] = load_elem(x, is_bf16, m * K + k);
        if (norm_w) {
            double ss = 0.0;
            for (int64_t k = 0; k < K; k++) ss += (double)row[k] * row[k];
            const float rstd = 1.0f / sqrtf((float)(ss / (double)K) + eps);
            for (int64_t k = 0; k < K; k++) row[k] = row[k] * rstd * load_elem(norm_w, is_bf16, k);
        }
    }
    return xf;
}

/* ------------------------------------------------------------------------------------------------------------
 * Linear layers
 * ------------------------------------------------------------------------------------------------------------ */

/* y (M, sum of ns) = [norm](x) [W_0; W_1; ...]^T + [b_0; b_1; ...], each W_j (ns[j], K) row-major as nn.Linear
 * stores it; with accumulate, y += that instead (a residual add). dtype 0: fp32 everything, 1: bf16 everything.
 * norm_w may be NULL (no normalisation); any bias may be NULL. Returns 0, or -1 on bad arguments. */
int forgeline_linear(const void *x, const void *norm_w, float eps, const void *const *ws, const void *const *bs,
                     const int64_t *ns, int n_matrices, void *y, int64_t M, int64_t K, int dtype, int accumulate,
                     int nthreads) {
    if (M < 1 || M > MAX_ROWS || K < 1 || n_matrices < 1 || n_matrices > MAX_MATRICES || (dtype != 0 && dtype != 1))
        return -1;
    const int is_bf16 = dtype == 1;
    int64_t N = 0;
    for (int j = 0; j < n_matrices; j++) N += ns[j];
    float *xf = stage_input(x, norm_w, eps, M, K, is_bf16);
    if (!xf) return -1;
    const int R = ROWS_FOR(M < 8 ? M : 8);
    const int64_t blocks = (N + R - 1) / R;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t n0 = blk * R;
        const int nrows = (int)(N - n0 < R ? N - n0 : R);
        const void *rows[4];
        const void *bias[4];
        int64_t col[4];
        for (int r = 0; r < 4; r++) {
            int64_t n = n0 + (r < nrows ? r : nrows - 1), j = 0;
            col[r] = n;
            while (n >= ns[j]) n -= ns[j++];
            rows[r] = is_bf16 ? (const void *)((const uint16_t *)ws[j] + n * K)
                              : (const void *)((const float *)ws[j] + n * K);
            bias[r] = bs[j] ? (is_bf16 ? (const void *)((const uint16_t *)bs[j] + n)
                                       : (const void *)((const float *)bs[j] + n))
                            : NULL;
        }
        float out[4 * 8];
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const int mb = (int)(M - m0 < 8 ? M - m0 : 8);
            dots(xf + m0 * K, K, mb, rows, is_bf16, out);
            for (int r = 0; r < nrows; r++) {
                const float b = bias[r] ? load_elem(bias[r], is_bf16, 0) : 0.0f;
                for (int m = 0; m < mb; m++) {
                    const int64_t at = (m0 + m) * N + col[r];
                    float v = out[r * 8 + m] + b;
                    if (accumulate) v += load_elem(y, is_bf16, at);
                    store_elem(y, is_bf16, at, v);
                }
            }
        }
    }
    free(xf);
    return 0;
}

/* y (M, N) = silu(norm(x) W1^T) * (norm(x) W3^T): the SwiGLU hidden layer in one pass over W1 and W3. */
int forgeline_swiglu(const void *x, const void *norm_w, float eps, const void *w1, const void *w3, void *y,
                     int64_t M, int64_t N, int64_t K, int dtype, int nthreads) {
    if (M < 1 || M > MAX_ROWS || K < 1 || N < 1 || (dtype != 0 && dtype != 1)) return -1;
    const int is_bf16 = dtype == 1;
    const size_t esz = is_bf16 ? 2 : 4;
    float *xf = stage_input(x, norm_w, eps, M, K, is_bf16);
    if (!xf) return -1;
    const int R = ROWS_FOR(M < 8 ? M : 8); /* R / 2 hidden units per block: (w1 row, w3 row) pairs */
    const int units = R / 2;
    const int64_t blocks = (N + units - 1) / units;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t n0 = blk * units;
        const int nunits = (int)(N - n0 < units ? N - n0 : units);
        const void *rows[4];
        for (int u = 0; u < units; u++) {
            const int64_t n = n0 + (u < nunits ? u : nunits - 1);
            rows[2 * u] = (const char *)w1 + (size_t)(n * K) * esz;
            rows[2 * u + 1] = (const char *)w3 + (size_t)(n * K) * esz;
        }
        float out[4 * 8];
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const int mb = (int)(M - m0 < 8 ? M - m0 : 8);
            /* a second pass of rows (M > 8) uses the instance for mb rows, which may take 4 rows: pad with copies */
            const void *padded[4] = {rows[0], rows[1], rows[R > 2 ? 2 : 0], rows[R > 2 ? 3 : 1]};
            dots(xf + m0 * K, K, mb, padded, is_bf16, out);
            for (int u = 0; u < nunits; u++) {
                for (int m = 0; m < mb; m++) {
                    const float g = out[(2 * u) * 8 + m], up = out[(2 * u + 1) * 8 + m];
                    store_elem(y, is_bf16, (m0 + m) * N + n0 + u, g / (1.0f + expf(-g)) * up);
                }
            }
        }
    }
    free(xf);
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------
 * Attention of one new token per row against the KV cache
 * ------------------------------------------------------------------------------------------------------------ */

/* qkv (B, (Hq + 2 Hkv) * D): this step's projections, heads in order q..., k..., v... (as the fused linear above
 * writes them). cos, sin (B, D) fp32: the rotary angles of each row's position, repeated over the two halves.
 * k_cache, v_cache (B, Hkv, cache_len, D) contiguous: the new key (rotated) and value are written at position
 * `pos`, then each query head attends to positions 0..pos of its kv head (head h uses kv head h / (Hq / Hkv)).
 * key_mask (B, pos + 1) bytes, 1 = attend, or NULL for all. out (B, Hq * D). Rows whose keys are all masked get 0. */
int forgeline_attention(const void *qkv, const float *cos, const float *sin, void *k_cache, void *v_cache,
                        const uint8_t *key_mask, void *out, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                        int64_t cache_len, int64_t pos, float scale, int dtype, int nthreads) {
    if (B < 1 || Hq < 1 || Hkv < 1 || Hq % Hkv || D < 2 || D % 2 || pos < 0 || pos >= cache_len ||
        (dtype != 0 && dtype != 1))
        return -1;
    const int is_bf16 = dtype == 1;
    const int64_t half = D / 2, group = Hq / Hkv, width = (Hq + 2 * Hkv) * D, S = pos + 1;

    /* the new keys and values into the cache; rotation in fp32, as torch's path computes it */
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bh = 0; bh < B * Hkv; bh++) {
        const int64_t b = bh / Hkv, h = bh % Hkv;
        const int64_t src_k = b * width + (Hq + h) * D, src_v = b * width + (Hq + Hkv + h) * D;
        const int64_t dst = ((b * Hkv + h) * cache_len + pos) * D;
        const float *c = cos + b * D, *s = sin + b * D;
        for (int64_t i = 0; i < half; i++) {
            const float x1 = load_elem(qkv, is_bf16, src_k + i), x2 = load_elem(qkv, is_bf16, src_k + half + i);
            store_elem(k_cache, is_bf16, dst + i, x1 * c[i] - x2 * s[i]);
            store_elem(k_cache, is_bf16, dst + half + i, x2 * c[half + i] + x1 * s[half + i]);
        }
        for (int64_t i = 0; i < D; i++) store_elem(v_cache, is_bf16, dst + i, load_elem(qkv, is_bf16, src_v + i));
    }

    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)S);
        float *q = (float *)malloc(sizeof(float) * (size_t)D);
        float *acc = (float *)malloc(sizeof(float) * (size_t)D);
        float *kv = (float *)malloc(sizeof(float) * (size_t)D);
        if (!scores || !q || !acc || !kv) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * Hq; bh++) {
            if (!scores || !q || !acc || !kv) continue;
            const int64_t b = bh / Hq, h = bh % Hq, kvh = h / group;
            const float *c = cos + b * D, *s = sin + b * D;
            const int64_t src_q = b * width + h * D;
            for (int64_t i = 0; i < half; i++) { /* rotate, and fold the softmax scale into q */
                const float x1 = load_elem(qkv, is_bf16, src_q + i), x2 = load_elem(qkv, is_bf16, src_q + half + i);
                q[i] = (x1 * c[i] - x2 * s[i]) * scale;
                q[half + i] = (x2 * c[half + i] + x1 * s[half + i]) * scale;
            }
            const int64_t base = (b * Hkv + kvh) * cache_len * D;
            float max_score = -INFINITY;
            for (int64_t j = 0; j < S; j++) {
                if (key_mask && !key_mask[b * S + j]) {
                    scores[j] = -INFINITY;
                    continue;
                }
                const int64_t at = base + j * D;
                float dot = 0.0f;
                if (is_bf16) {
                    for (int64_t i = 0; i < D; i++) kv[i] = bf16_to_f32(((const uint16_t *)k_cache)[at + i]);
#pragma omp simd reduction(+ : dot)
                    for (int64_t i = 0; i < D; i++) dot += q[i] * kv[i];
                } else {
                    const float *kr = (const float *)k_cache + at;
#pragma omp simd reduction(+ : dot)
                    for (int64_t i = 0; i < D; i++) dot += q[i] * kr[i];
                }
                scores[j] = dot;
                if (dot > max_score) max_score = dot;
            }
            for (int64_t i = 0; i < D; i++) acc[i] = 0.0f;
            float total = 0.0f;
            if (max_score != -INFINITY) {
                for (int64_t j = 0; j < S; j++) {
                    if (scores[j] == -INFINITY) continue;
                    const float p = expf(scores[j] - max_score);
                    total += p;
                    const int64_t at = base + j * D;
                    if (is_bf16) {
                        for (int64_t i = 0; i < D; i++) kv[i] = bf16_to_f32(((const uint16_t *)v_cache)[at + i]);
#pragma omp simd
                        for (int64_t i = 0; i < D; i++) acc[i] += p * kv[i];
                    } else {
                        const float *vr = (const float *)v_cache + at;
#pragma omp simd
                        for (int64_t i = 0; i < D; i++) acc[i] += p * vr[i];
                    }
                }
            }
            const float inv = total > 0.0f ? 1.0f / total : 0.0f;
            for (int64_t i = 0; i < D; i++) store_elem(out, is_bf16, b * Hq * D + h * D + i, acc[i] * inv);
        }
        free(scores);
        free(q);
        free(acc);
        free(kv);
    }
    return failed ? -1 : 0;
}
