/* Decode attention straight from a paged bfloat16 KV pool, for a CPU (exegpt/models/paged_decode.py
 * builds and loads this file; the module doc there says why it exists).
 *
 * One query token per row. Row r attends over its keys lo[r] .. hi[r]-1, key t living in slot
 * key_blocks[r][t / block_size] * block_size + t % block_size of the pool [slots, H_kv, D]: only
 * those slots are read, each once, so no padding, no gathered copy and no stale slot is touched.
 * q, K, V and the output are bfloat16 (raw 16-bit words). A score is the sum of the exact products
 * of q's and K's bf16 values in float32 (AVX512-BF16 dot products where the CPU has them), then
 * scaled; the softmax (a vectorised exp) and the weighted sum of values run in float32 too. An optional additive bias [rows, bias_heads, bias_stride] (float32,
 * bias_heads 1 or H) is added to query head h's score of key t as bias[r][h][t].
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(bits >> 16);
}

/* row[d] = x[d] as float32, d < n. */
static inline void widen(const uint16_t *x, float *row, int64_t n) {
    int64_t d = 0;
#if defined(__AVX512F__)
    for (; d + 16 <= n; d += 16) {
        __m256i half = _mm256_loadu_si256((const __m256i *)(x + d));
        __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16);
        _mm512_storeu_ps(row + d, _mm512_castsi512_ps(wide));
    }
#endif
    for (; d < n; d++) row[d] = bf16_to_float(x[d]);
}

/* sum of a[d] * b[d] over bf16 words, d < n. */
static inline float dot_bf16(const uint16_t *a, const uint16_t *b, int64_t n) {
    int64_t d = 0;
    float s = 0.0f;
#if defined(__AVX512BF16__)
    __m512 sum = _mm512_setzero_ps();
    for (; d + 32 <= n; d += 32)
        sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(a + d),
                               (__m512bh)_mm512_loadu_si512(b + d));
    s = _mm512_reduce_add_ps(sum);
#endif
    for (; d < n; d++) s += bf16_to_float(a[d]) * bf16_to_float(b[d]);
    return s;
}

#if defined(__AVX512F__)
/* exp of 16 floats (Cephes' expf polynomial, ~1 ulp): x = n ln2 + r, exp x = 2^n p(r). NaN stays
 * NaN; below -88 it is 0. */
static inline __m512 exp16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-88.0f), _CMP_LT_OQ);
    return _mm512_maskz_scalef_ps(~tiny, p, n);
}
#endif

/* The largest of x[i], i < n (n >= 1). */
static inline float largest(const float *x, int64_t n) {
    int64_t i = 0;
    float top = -INFINITY;
#if defined(__AVX512F__)
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= n; i += 16) best = _mm512_max_ps(best, _mm512_loadu_ps(x + i));
    top = _mm512_reduce_max_ps(best);
#endif
    for (; i < n; i++) top = x[i] > top ? x[i] : top;
    return top;
}

/* x[i] = exp(x[i] - top) for i < n; returns their sum. */
static inline float exp_shifted(float *x, int64_t n, float top) {
    int64_t i = 0;
    float total = 0.0f;
#if defined(__AVX512F__)
    __m512 sum = _mm512_setzero_ps();
    const __m512 shift = _mm512_set1_ps(top);
    for (; i + 16 <= n; i += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), shift));
        _mm512_storeu_ps(x + i, e);
        sum = _mm512_add_ps(sum, e);
    }
    total = _mm512_reduce_add_ps(sum);
#endif
    for (; i < n; i++) total += (x[i] = expf(x[i] - top));
    return total;
}

/* y[d] += p * x[d], d < n. */
static inline void axpy(float p, const float *x, float *y, int64_t n) {
    int64_t d = 0;
#if defined(__AVX512F__)
    const __m512 scale = _mm512_set1_ps(p);
    for (; d + 16 <= n; d += 16)
        _mm512_storeu_ps(y + d, _mm512_fmadd_ps(scale, _mm512_loadu_ps(x + d),
                                                _mm512_loadu_ps(y + d)));
#endif
    for (; d < n; d++) y[d] += p * x[d];
}

/* One row: its H query heads over its visible keys lo .. hi-1, every key's slot read once, all
 * KV heads together (a slot's H_kv x D values are contiguous). `scores` holds H x (hi - lo)
 * floats, `acc` H x D, `row` D. */
static void attend_row(const uint16_t *q, const uint16_t *k_pool, const uint16_t *v_pool,
                       const int64_t *blocks, int64_t lo, int64_t hi, const float *bias,
                       int64_t bias_heads, int64_t bias_stride, uint16_t *out, int64_t num_heads,
                       int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale,
                       float *scores, float *row, float *acc) {
    const int64_t n = hi - lo, group = num_heads / num_kv_heads, width = num_kv_heads * head_dim;
    for (int64_t i = 0, t = lo, block = lo / block_size, j = lo % block_size; i < n;
         i++, t++, j = j + 1 == block_size ? (block++, 0) : j + 1) {
        const uint16_t *kp = k_pool + (blocks[block] * block_size + j) * width;
        for (int64_t kv = 0; kv < num_kv_heads; kv++) {
            for (int64_t h = kv * group; h < (kv + 1) * group; h++) {
                float s = dot_bf16(q + h * head_dim, kp + kv * head_dim, head_dim) * scale;
                if (bias) s += bias[(bias_heads == 1 ? 0 : h) * bias_stride + t];
                scores[h * n + i] = s;
            }
        }
    }
    for (int64_t h = 0; h < num_heads; h++) {
        float *sh = scores + h * n;
        float top = -INFINITY, total = 0.0f;
        top = largest(sh, n);
        total = exp_shifted(sh, n, top);
        const float inv = total > 0.0f ? 1.0f / total : 0.0f;
        for (int64_t i = 0; i < n; i++) sh[i] *= inv;
    }
    memset(acc, 0, sizeof(float) * num_heads * head_dim);
    for (int64_t i = 0, block = lo / block_size, j = lo % block_size; i < n;
         i++, j = j + 1 == block_size ? (block++, 0) : j + 1) {
        const uint16_t *vp = v_pool + (blocks[block] * block_size + j) * width;
        for (int64_t kv = 0; kv < num_kv_heads; kv++) {
            widen(vp + kv * head_dim, row, head_dim);
            for (int64_t h = kv * group; h < (kv + 1) * group; h++)
                axpy(scores[h * n + i], row, acc + h * head_dim, head_dim);
        }
    }
    for (int64_t e = 0; e < num_heads * head_dim; e++) out[e] = float_to_bf16(acc[e]);
}

/* Rows first .. last-1 of the call below, with scratch of their own; returns 0, or -1 when the
 * scratch cannot be allocated. */
static int attend_rows(int64_t first, int64_t last, const uint16_t *q,
                       const int64_t *row_index, const uint16_t *k_pool, const uint16_t *v_pool,
                       const int64_t *key_blocks, int64_t max_blocks,
                       const int32_t *key_ranges, const float *bias, int64_t bias_heads,
                       int64_t bias_stride, uint16_t *out, int64_t num_heads,
                       int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale) {
    int64_t longest = 1;
    for (int64_t r = first; r < last; r++) {
        const int64_t n = (int64_t)key_ranges[2 * r + 1] - key_ranges[2 * r];
        longest = n > longest ? n : longest;
    }
    const int64_t features = num_heads * head_dim;
    float *scratch = malloc(sizeof(float) * (num_heads * longest + features + head_dim));
    if (!scratch) return -1;
    float *scores = scratch, *acc = scores + num_heads * longest;
    float *row = acc + features;
    for (int64_t r = first; r < last; r++) {
        const int64_t at = row_index ? row_index[r] : r; /* the row's query and output */
        attend_row(q + at * features, k_pool, v_pool, key_blocks + r * max_blocks,
                   key_ranges[2 * r], key_ranges[2 * r + 1],
                   bias ? bias + r * bias_heads * bias_stride : NULL, bias_heads, bias_stride,
                   out + at * features, num_heads, num_kv_heads, head_dim, block_size, scale,
                   scores, row, acc);
    }
    free(scratch);
    return 0;
}

/* q and out [N, H, D]; row r reads q[row_index[r]] and writes out[row_index[r]] (row_index
 * NULL: row r itself, N = rows); k_pool, v_pool [slots, H_kv, D]; key_blocks [rows,
 * max_blocks]; key_ranges [rows, 2] (lo, hi) with 0 <= lo < hi <= max_blocks x block_size.
 * Rows are split among `num_threads` OpenMP threads. Returns 0, or -1 when scratch memory ran
 * out. */
int exegpt_paged_decode_bf16(const uint16_t *q, const int64_t *row_index,
                             const uint16_t *k_pool, const uint16_t *v_pool,
                             const int64_t *key_blocks, int64_t max_blocks,
                             const int32_t *key_ranges, const float *bias, int64_t bias_heads,
                             int64_t bias_stride, uint16_t *out, int64_t rows, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                             float scale, int num_threads) {
    int failed = 0;
    if (num_threads < 2 || rows < 2)
        return attend_rows(0, rows, q, row_index, k_pool, v_pool, key_blocks, max_blocks,
                           key_ranges, bias, bias_heads, bias_stride, out, num_heads,
                           num_kv_heads, head_dim, block_size, scale);
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
#ifdef _OPENMP
        extern int omp_get_thread_num(void);
        extern int omp_get_num_threads(void);
        const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
#else
        const int64_t part = 0, parts = 1;
#endif
        const int64_t first = rows * part / parts, last = rows * (part + 1) / parts;
        failed |= attend_rows(first, last, q, row_index, k_pool, v_pool, key_blocks,
                              max_blocks, key_ranges, bias, bias_heads, bias_stride, out,
                              num_heads, num_kv_heads, head_dim, block_size, scale) != 0;
    }
    return failed ? -1 : 0;
}

/* 1 where this build splits rows among OpenMP threads, 0 where it runs them on the caller's
 * thread (built without OpenMP: paged_decode.py falls back to that build). */
int exegpt_paged_decode_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
