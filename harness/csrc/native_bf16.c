/* The decode-time core's bf16 kernels on x86-64 CPUs with AVX512-BF16 (and AMX where present): linear products,
 * attention over the KV cache, and a whole Llama decoder layer in one call, for passes of up to 16 positions.
 *
 * y = x @ W.T (+ bias) with x (M, K), W (N, K) and y (M, N) in bf16, accumulated in fp32.
 *
 * Why: (1) every output element is computed by the same instruction sequence whatever M is and however the rows
 * are split between threads (chunks of 32 along K in order, one accumulator, one fixed reduction), so a verification
 * pass over k positions gives the very logits k one-position steps give: greedy speculative decoding in bf16 is
 * token-identical to bf16 autoregressive decoding, with no near-ties to explain. oneDNN picks a different kernel
 * per M and its sums differ in the last bits. (2) a one-position product is bound by how fast one core pulls weights
 * from memory; reading four rows at once with software prefetch ahead of the stream measured ~12.8 GB/s per core
 * here against oneDNN's ~9.5.
 * Built at first use by harness/native_bf16.py with the system C compiler; OpenMP is the process's own (torch's)
 * runtime, so the threads are torch's.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define PREFETCH 4096 /* elements ahead on each of the four rows (8 KiB): measured best of 2-16 KiB */
#define SMALL_M 4 /* ee_linear_bf16: passes of one position up to this many positions, of four above */

static inline uint16_t round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even (as torch) */
    return (uint16_t)(u >> 16);
}

/* 16 bf16 lanes (masked) to fp32 and back. VCVTNEPS2BF16 rounds to nearest even, as round_bf16 does; it differs
 * only on fp32 denormals (flushed), which no activation here reaches. Each lane alone: per element. */
static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(m, p));
}
static inline void store_bf16(uint16_t *p, __m512 x, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(x));
}
static inline __m512 round_ps(__m512 x) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(x)); }
static inline __mmask16 lanes_left(int64_t n) { return n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1); }

static inline __m512 dot_step(__m512 acc, const uint16_t *w, const uint16_t *x, __mmask32 mask) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(mask, w),
                            (__m512bh)_mm512_maskz_loadu_epi16(mask, x));
}

/* One output element per (row m, weight row n): chunks in order, then the tail chunk, then one reduction. */
static inline float dot_row(const uint16_t *w, const uint16_t *x, int64_t chunks, __mmask32 tail) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; c++) a = dot_step(a, w + 32 * c, x + 32 * c, 0xffffffffu);
    if (tail) a = dot_step(a, w + 32 * chunks, x + 32 * chunks, tail);
    return _mm512_reduce_add_ps(a);
}

/* Sixteen horizontal sums at once: lane i of the result is the sum of v[i]'s 16 lanes, always in the same order
 * (within each 128-bit quarter lanes (0+2)+(1+3), then quarters (0+1)+(2+3)) whatever the other vectors hold, so a
 * zero vector in place of an absent accumulator changes nothing else. ~1 instruction per sum against ~8 for
 * _mm512_reduce_add_ps. */
static inline __m512 hsum16(const __m512 v[16]) {
    __m512 t[8], u[4];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Four weight rows against Q (1-4) input rows: 4*Q accumulators, each fed chunk by chunk in order, so that the
 * weights are loaded once for Q rows (loads, not multiplies, bound a small-M product once the weights are hot), and
 * summed by one hsum16 (padded with zeros), whose sums do not depend on Q. */
static inline void block4(const uint16_t *w, const uint16_t *x, int64_t K, int64_t chunks, __mmask32 tail,
                          const int Q, float out[4][4]) {
    __m512 a[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
        for (int q = 0; q < Q; q++) a[r][q] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; c++) {
        const uint16_t *wc = w + 32 * c;
        /* every pass prefetches the stream ahead: a later pass over the block keeps it moving while it computes */
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(wc + r * K + PREFETCH), _MM_HINT_T1);
        __m512bh xv[4];
#pragma GCC unroll 4
        for (int q = 0; q < Q; q++) xv[q] = (__m512bh)_mm512_loadu_si512(x + q * K + 32 * c);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(wc + r * K);
#pragma GCC unroll 4
            for (int q = 0; q < Q; q++) a[r][q] = _mm512_dpbf16_ps(a[r][q], wv, xv[q]);
        }
    }
    if (tail) {
        const uint16_t *wc = w + 32 * chunks;
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
            for (int q = 0; q < Q; q++) a[r][q] = dot_step(a[r][q], wc + r * K, x + q * K + 32 * chunks, tail);
    }
    __m512 v[16];
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++)
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) v[4 * q + r] = q < Q ? a[r][q] : _mm512_setzero_ps();
    _mm512_storeu_ps(&out[0][0], hsum16(v)); /* out[q][r] = lane 4q + r */
}

void ee_linear_bf16(const uint16_t *x, const uint16_t *W, const float *bias, uint16_t *y,
                    int64_t M, int64_t N, int64_t K) {
    const int64_t chunks = K / 32;
    const __mmask32 tail = (__mmask32)((1ull << (K % 32)) - 1);
    const int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n = 4 * b;
        const uint16_t *w = W + n * K;
        /* Up to SMALL_M positions, one position per pass over the block (its four weight rows stay in L1 for the
         * passes after the first), and every pass prefetches the stream ahead. Measured on an AMD EPYC (Zen 4,
         * AVX512-BF16, no AMX), the 30 layers' products of SmolLM2-135M, 2 threads, three runs alternating with
         * the earlier kernel (4 positions per pass, prefetch in the first pass only), medians of 25 each: 2-8
         * positions cost 0.97-1.06x one position and 16 cost 1.28-1.35x, against 1.17-1.37x and 1.69-1.71x.
         * Not above 4: when the shared machine's memory read ~70 GB/s, 5-6 positions one at a time were
         * compute-bound (1.26-1.39x). Each output element's sum is the same whatever the pass size (block4). */
        const int step = M <= SMALL_M ? 1 : 4;
        for (int64_t m = 0; m < M; m += step) {
            const int Q = M - m < step ? (int)(M - m) : step;
            float out[4][4];
            if (n + 4 <= N) {
                switch (Q) { /* constant Q per call, so each copy is unrolled with its accumulators in registers */
                case 1: block4(w, x + m * K, K, chunks, tail, 1, out); break;
                case 2: block4(w, x + m * K, K, chunks, tail, 2, out); break;
                case 3: block4(w, x + m * K, K, chunks, tail, 3, out); break;
                default: block4(w, x + m * K, K, chunks, tail, 4, out); break;
                }
            } else {
                for (int q = 0; q < Q; q++)
                    for (int64_t r = 0; r < N - n; r++) out[q][r] = dot_row(w + r * K, x + (m + q) * K, chunks, tail);
            }
            const int64_t rows = n + 4 <= N ? 4 : N - n;
            for (int q = 0; q < Q; q++)
                for (int64_t r = 0; r < rows; r++) {
                    const float v = out[q][r];
                    y[(m + q) * N + n + r] = round_bf16(bias ? v + bias[n + r] : v);
                }
        }
    }
}

/* -- fp32 products for verification passes ----------------------------------------------------------------------
 * y = x @ W.T (+ bias) in fp32 for 2 <= M <= 16 rows (a one-position step keeps MKL's gemv, whose arithmetic the
 * fp32 golden tokens are pinned to). MKL and oneDNN run 8 rows at ~1.8x one row here (compute-bound small-M
 * paths); this streams the row-major weight once, 4 rows at a time against up to 4 inputs, 16 lanes per FMA, one
 * accumulator per element with chunks of 16 along K in order, so each row's result does not depend on M. */
static inline void block4_f32(const float *w, const float *x, int64_t K, const int Q, int prefetch, float out[4][4]) {
    __m512 a[4][4];
    const int64_t chunks = K / 16;
    const __mmask16 tail = (__mmask16)((1u << (K % 16)) - 1);
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
        for (int q = 0; q < Q; q++) a[r][q] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; c++) {
        if (prefetch) { /* a chunk is one cache line per row */
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(w + r * K + 16 * c + PREFETCH / 2), _MM_HINT_T1);
        }
        __m512 xv[4];
#pragma GCC unroll 4
        for (int q = 0; q < Q; q++) xv[q] = _mm512_loadu_ps(x + q * K + 16 * c);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const __m512 wv = _mm512_loadu_ps(w + r * K + 16 * c);
#pragma GCC unroll 4
            for (int q = 0; q < Q; q++) a[r][q] = _mm512_fmadd_ps(wv, xv[q], a[r][q]);
        }
    }
    if (tail) {
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const __m512 wv = _mm512_maskz_loadu_ps(tail, w + r * K + 16 * chunks);
#pragma GCC unroll 4
            for (int q = 0; q < Q; q++)
                a[r][q] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, x + q * K + 16 * chunks), a[r][q]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
        for (int q = 0; q < Q; q++) out[q][r] = _mm512_reduce_add_ps(a[r][q]);
}

/* Two weight rows against Q (5-8) input rows in one pass: 2*Q accumulators and Q inputs stay in registers, so that
 * streaming the weights overlaps all of the pass's multiplies (two passes of 4 rows x 4 inputs stream during the
 * first only). Each element's sum is block4_f32's: the same chunks of 16 in the same order, the same reduction.
 * Measured on an AMD EPYC (Zen 4), the 30 layers' products of SmolLM2-135M (bench/product_rows.py --dtype float32),
 * three runs alternating with the two-pass kernel: 5-8 positions 1.00-1.23x one position against 1.24-1.49x with
 * the shared machine's memory fast, 1.06-1.14x against 1.12-1.27x with it slow. Routing 3-4 positions here too
 * measured 1.04x at 4 but 1.27-1.29x at 8 (against 1.18-1.23x; why was not found), so they keep block4_f32. */
static inline void block2_f32(const float *w, const float *x, int64_t K, const int Q, int prefetch, float out[8][2]) {
    __m512 a[2][8];
    const int64_t chunks = K / 16;
    const __mmask16 tail = (__mmask16)((1u << (K % 16)) - 1);
#pragma GCC unroll 2
    for (int r = 0; r < 2; r++)
#pragma GCC unroll 8
        for (int q = 0; q < Q; q++) a[r][q] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; c++) {
        if (prefetch) {
#pragma GCC unroll 2
            for (int r = 0; r < 2; r++) _mm_prefetch((const char *)(w + r * K + 16 * c + PREFETCH / 2), _MM_HINT_T1);
        }
        __m512 xv[8];
#pragma GCC unroll 8
        for (int q = 0; q < Q; q++) xv[q] = _mm512_loadu_ps(x + q * K + 16 * c);
#pragma GCC unroll 2
        for (int r = 0; r < 2; r++) {
            const __m512 wv = _mm512_loadu_ps(w + r * K + 16 * c);
#pragma GCC unroll 8
            for (int q = 0; q < Q; q++) a[r][q] = _mm512_fmadd_ps(wv, xv[q], a[r][q]);
        }
    }
    if (tail) {
#pragma GCC unroll 2
        for (int r = 0; r < 2; r++) {
            const __m512 wv = _mm512_maskz_loadu_ps(tail, w + r * K + 16 * chunks);
#pragma GCC unroll 8
            for (int q = 0; q < Q; q++)
                a[r][q] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, x + q * K + 16 * chunks), a[r][q]);
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < 2; r++)
#pragma GCC unroll 8
        for (int q = 0; q < Q; q++) out[q][r] = _mm512_reduce_add_ps(a[r][q]);
}

void ee_linear_f32(const float *x, const float *W, const float *bias, float *y, int64_t M, int64_t N, int64_t K) {
    const int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n = 4 * b, rows = n + 4 <= N ? 4 : N - n;
        const float *w = W + n * K;
        float *pad = NULL; /* the last block, when N % 4 != 0: its rows, then zero rows */
        if (rows < 4) {
            pad = calloc(4 * (size_t)K, sizeof(float));
            memcpy(pad, w, sizeof(float) * rows * K);
            w = pad;
        }
        if (M <= 4) { /* one pass of block4_f32 */
            float out[4][4];
            switch (M) {
            case 1: block4_f32(w, x, K, 1, rows == 4, out); break;
            case 2: block4_f32(w, x, K, 2, rows == 4, out); break;
            case 3: block4_f32(w, x, K, 3, rows == 4, out); break;
            default: block4_f32(w, x, K, 4, rows == 4, out); break;
            }
            for (int q = 0; q < M; q++)
                for (int64_t r = 0; r < rows; r++) y[q * N + n + r] = bias ? out[q][r] + bias[n + r] : out[q][r];
        } else { /* passes of up to 8 positions, two weight rows at a time; only the first streams from memory */
            for (int64_t m = 0; m < M; m += 8) {
                const int Q = M - m < 8 ? (int)(M - m) : 8;
                const int pf = m == 0 && rows == 4;
                float out[8][4];
                if (Q > 4) {
                    for (int half = 0; half < 2; half++) {
                        float two[8][2];
                        const float *wh = w + 2 * half * K, *xm = x + m * K;
                        switch (Q) {
                        case 5: block2_f32(wh, xm, K, 5, pf, two); break;
                        case 6: block2_f32(wh, xm, K, 6, pf, two); break;
                        case 7: block2_f32(wh, xm, K, 7, pf, two); break;
                        default: block2_f32(wh, xm, K, 8, pf, two); break;
                        }
                        for (int q = 0; q < Q; q++) out[q][2 * half] = two[q][0], out[q][2 * half + 1] = two[q][1];
                    }
                } else { /* the last 1-4 of 9-12 positions */
                    float four[4][4];
                    switch (Q) {
                    case 1: block4_f32(w, x + m * K, K, 1, pf, four); break;
                    case 2: block4_f32(w, x + m * K, K, 2, pf, four); break;
                    case 3: block4_f32(w, x + m * K, K, 3, pf, four); break;
                    default: block4_f32(w, x + m * K, K, 4, pf, four); break;
                    }
                    for (int q = 0; q < Q; q++) memcpy(out[q], four[q], sizeof four[q]);
                }
                for (int q = 0; q < Q; q++)
                    for (int64_t r = 0; r < rows; r++)
                        y[(m + q) * N + n + r] = bias ? out[q][r] + bias[n + r] : out[q][r];
            }
        }
        free(pad);
    }
}

/* e^x, 16 lanes, each lane alone: Cephes' expf polynomial on x - n ln2 with |x - n ln2| <= ln2/2, scaled by 2^n;
 * below -87 it is 0 (fp32 underflow), above ~88.7 infinity. ~1 ulp, like libm's expf. */
static inline __m512 exp_ps(__m512 x) {
    const __m512 floor_ = _mm512_set1_ps(-87.0f);
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, floor_, _CMP_LT_OQ);
    x = _mm512_max_ps(x, floor_);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(y, n));
}

/* -- AMX (Intel Sapphire Rapids and later) ---------------------------------------------------------------------
 * Tiles: C (rows x 16, fp32) += A (rows x 32 bf16) . B (32 x 16 bf16, in VNNI pairs: B's row kk holds, for each of
 * its 16 columns, the pair of inputs 2kk, 2kk+1). Each element of C is its own row of A against its own column of B,
 * so it does not depend on the other rows or columns, and a tile's multiply costs the same for 1 and 16 of them. */
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Ask Linux for the AMX tile state (once per process; oneDNN asks the same); 1 when granted. */
int ee_amx_init(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tiles 0 (C), 1 (A) and 2 (B), A and C with `rows` rows, B a full 16 x 32. */
static void tiles_configure(int rows) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = (uint8_t)rows; cfg.colsb[0] = 64; /* C: rows of 16 fp32 */
    cfg.rows[1] = (uint8_t)rows; cfg.colsb[1] = 64; /* A: rows of 32 bf16 */
    cfg.rows[2] = 16; cfg.colsb[2] = 64;            /* B: 16 pair-rows of 16 columns */
    _tile_loadconfig(&cfg);
}

/* Attention scores on tiles (D % 32 == 0, D <= 256, G <= 16, the calling thread configured by tiles_configure(16)):
 * for 16 keys at a time, C = K rows (A, read in place from the cache) . the G heads' query vectors (B columns).
 * Replaces n reductions per head (dot_row's) with n/16 tile multiplies per D/32 chunk, the same for every G and Q:
 * each score is its key row against its query column alone, chunks of 32 in order. */
static void scores_amx(const uint16_t *q, const uint16_t *kh, int64_t h0, int64_t G, int64_t i, int64_t Q,
                       int64_t D, int64_t n, float scale, float *scores) {
    const int64_t chunks = D / 32;
    uint16_t b[8][16][32] __attribute__((aligned(64)));
    uint16_t last[16 * 256] __attribute__((aligned(64)));
    float c[16 * 16] __attribute__((aligned(64)));
    memset(b, 0, sizeof(uint16_t) * 512 * chunks);
    for (int64_t g = 0; g < G; g++) {
        const uint16_t *qg = q + ((h0 + g) * Q + i) * D;
        for (int64_t ch = 0; ch < chunks; ch++)
            for (int kk = 0; kk < 16; kk++) {
                b[ch][kk][2 * g] = qg[32 * ch + 2 * kk];
                b[ch][kk][2 * g + 1] = qg[32 * ch + 2 * kk + 1];
            }
    }
    for (int64_t j = 0; j < n; j += 16) {
        const int64_t rows = n - j < 16 ? n - j : 16;
        const uint16_t *a = kh + j * D;
        if (rows < 16) { /* the last keys, zero-padded: nothing past the query's prefix is read */
            memset(last, 0, sizeof(uint16_t) * 16 * D);
            memcpy(last, a, sizeof(uint16_t) * rows * D);
            a = last;
        }
        _tile_zero(0);
        for (int64_t ch = 0; ch < chunks; ch++) {
            _tile_loadd(1, a + 32 * ch, D * 2);
            _tile_loadd(2, b[ch], 64);
            _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, c, 64);
        for (int64_t r = 0; r < rows; r++)
            for (int64_t g = 0; g < G; g++) scores[g * n + j + r] = c[16 * r + g] * scale;
    }
}

/* One head's output: the n values weighted by their exp-scores p, summed in key order in fp32 (one accumulator per
 * 16 lanes), divided by the scores' total and rounded once to bf16. Inlined with a constant `lanes` so that the
 * accumulators stay in registers (the generic call spills them, same numbers). */
static inline __attribute__((always_inline)) void weigh_values(const float *p, const uint16_t *vh, int64_t n,
                                                               int64_t D, const int64_t lanes, float total,
                                                               uint16_t *o) {
    __m512 acc[16]; /* head_dim <= 256 */
    __mmask16 mask[16];
#pragma GCC unroll 16
    for (int64_t l = 0; l < lanes; l++) {
        acc[l] = _mm512_setzero_ps();
        mask[l] = lanes_left(D - 16 * l);
    }
    for (int64_t j = 0; j < n; j++) {
        const __m512 pj = _mm512_set1_ps(p[j]);
        const uint16_t *vj = vh + j * D;
#pragma GCC unroll 16
        for (int64_t l = 0; l < lanes; l++)
            acc[l] = _mm512_fmadd_ps(pj, _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(mask[l], vj + 16 * l)),
                                     acc[l]);
    }
    float buf[16];
    for (int64_t l = 0; l < lanes; l++) {
        _mm512_storeu_ps(buf, _mm512_div_ps(acc[l], _mm512_set1_ps(total)));
        for (int64_t e = 0; e < 16 && 16 * l + e < D; e++) o[16 * l + e] = round_bf16(buf[e]);
    }
}

/* Attention of Q new positions (the last Q of `end` cached ones) for one sequence, each query over its own causal
 * prefix: query i reads keys 0 .. end-Q+i. Like the products, every query is computed alone and the same way
 * whatever Q is: a verification pass gives the attention of one-position steps bit for bit.
 * q: (H, Q, D) contiguous; k, v: (KVH, capacity, D) with `head_stride` = capacity * D; out: (Q, H, D).
 * Scores are dot products in fp32 (dot_row), softmax in fp32 with the max subtracted (exp_ps), then a weighted sum of
 * V in fp32, rounded once to bf16. Every step is a fixed function of the query's own n scores. */
/* Heads h0 .. h0+G-1 (G <= 8, all reading the same K/V head) for query i over its n keys: each key's K row and V
 * row are loaded once for the G heads. Per head, the arithmetic is the same whatever G is: dot_row scores, then
 * max, exp and sum 16 scores at a time (a fixed function of the head's n scores), then V summed in key order. */
static void attend(const uint16_t *q, const uint16_t *kh, const uint16_t *vh, uint16_t *out, int64_t h0, int64_t G,
                   int64_t i, int64_t Q, int64_t H, int64_t D, int64_t n, float scale, float *scores, int amx) {
    const int64_t chunks = D / 32, lanes = (D + 15) / 16;
    const __mmask32 tail = (__mmask32)((1ull << (D % 32)) - 1);
    if (amx)
        scores_amx(q, kh, h0, G, i, Q, D, n, scale, scores);
    else /* 16 keys at a time: 16 accumulators, one tree of sums (hsum16); keys past n are never read */
        for (int64_t g = 0; g < G; g++) {
            const uint16_t *qg = q + ((h0 + g) * Q + i) * D;
            for (int64_t j = 0; j < n; j += 16) {
                const int64_t rows = n - j < 16 ? n - j : 16;
                __m512 acc[16];
#pragma GCC unroll 16
                for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
                for (int64_t c = 0; c <= chunks; c++) {
                    const __mmask32 m = c < chunks ? 0xffffffffu : tail;
                    if (!m) break;
                    const __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(m, qg + 32 * c);
#pragma GCC unroll 16
                    for (int r = 0; r < 16; r++)
                        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(r < rows ? m : 0,
                                                                                             kh + (j + r) * D + 32 * c), qv);
                }
                _mm512_mask_storeu_ps(scores + g * n + j, lanes_left(rows),
                                      _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(scale)));
            }
        }
    float total[8];
    for (int64_t g = 0; g < G; g++) {
        float *sg = scores + g * n;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 m = lanes_left(n - j);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, sg + j));
        }
        const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 m = lanes_left(n - j);
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + j), top));
            _mm512_mask_storeu_ps(sg + j, m, e);
            vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
        }
        total[g] = _mm512_reduce_add_ps(vsum);
    }
    for (int64_t g = 0; g < G; g++) {
        uint16_t *o = out + (i * H + h0 + g) * D;
        if (lanes == 4) /* head_dim 64 and 128 with every accumulator in a register */
            weigh_values(scores + g * n, vh, n, D, 4, total[g], o);
        else if (lanes == 8)
            weigh_values(scores + g * n, vh, n, D, 8, total[g], o);
        else
            weigh_values(scores + g * n, vh, n, D, lanes, total[g], o);
    }
}

void ee_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t head_stride,
                       uint16_t *out, int64_t H, int64_t KVH, int64_t Q, int64_t D, int64_t end, float scale,
                       int64_t amx) {
    const int64_t groups = H / KVH, parts = (groups + 7) / 8;
    const int tiles = amx && D % 32 == 0 && D <= 256; /* scores on tiles (scores_amx), else dot_row */
    /* one position: a task per head (9 tasks share 2 threads evenly); more: a task per (K/V head, query, <= 8 of
     * its heads), sharing each key's loads. Each head's numbers are the same either way. */
    const int64_t tasks = Q == 1 ? H : KVH * Q * parts;
#pragma omp parallel
    {
        float *scores = (float *)malloc(sizeof(float) * 8 * (size_t)(end > 0 ? end : 1));
        if (tiles) tiles_configure(16);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            int64_t h0, G, i;
            if (Q == 1) {
                h0 = t, G = 1, i = 0;
            } else {
                const int64_t kvh = t / (Q * parts), rest = t % (Q * parts), part = rest % parts;
                i = rest / parts;
                h0 = kvh * groups + 8 * part;
                G = groups - 8 * part < 8 ? groups - 8 * part : 8;
            }
            const int64_t kvh = h0 / groups, n = end - Q + i + 1;
            attend(q, k + kvh * head_stride, v + kvh * head_stride, out, h0, G, i, Q, H, D, n, scale, scores, tiles);
        }
        if (tiles) _tile_release();
        free(scores);
    }
}

/* The product on AMX tiles: C (M x 16) += A (M x 32 of x) . B (32 x 16 of W). The result does not depend on M
 * (see the tiles above), and a pass over up to 16 positions costs about what one costs: the weights' stream is the
 * only bound. W is pre-packed by the Python side (native_bf16.Weight): for each block of 16 output rows and 32
 * inputs, a 1 KiB tile whose row kk holds, for each of the 16 outputs, the pair W[n][2kk], W[n][2kk+1]. Needs
 * N % 16 == 0 and K % 32 == 0 (else the AVX512 kernel runs). */
void ee_linear_bf16_amx(const uint16_t *x, const uint16_t *Wp, const float *bias, uint16_t *y,
                        int64_t M, int64_t N, int64_t K) {
    const int64_t kblocks = K / 32, nblocks = N / 16;
#pragma omp parallel
    {
        tiles_configure((int)M);
        float c[16 * 16];
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < nblocks; nb++) {
            const uint16_t *wb = Wp + nb * kblocks * 512;
            _tile_zero(0);
            for (int64_t kb = 0; kb < kblocks; kb++) {
                _tile_loadd(1, x + 32 * kb, K * 2);
                _tile_loadd(2, wb + 512 * kb, 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, c, 64);
            const __m512 b = bias ? _mm512_loadu_ps(bias + 16 * nb) : _mm512_setzero_ps();
            for (int64_t m = 0; m < M; m++) /* + bias (or + 0: exact), rounded to bf16, 16 outputs at once */
                store_bf16(y + m * N + 16 * nb, _mm512_add_ps(_mm512_loadu_ps(c + 16 * m), b), 0xffff);
        }
        _tile_release();
    }
}

/* -- one decoder layer in one call ------------------------------------------------------------------------------
 * The lean layer's forward (Llama: RMSNorm, q/k/v, rotary, attention over the cache, o, residual, RMSNorm, gated
 * SiLU MLP, residual) for M <= 16 positions of one sequence, so that a decode step issues 30 calls instead of
 * ~5,000 small torch operators (their dispatch and Python cost ~13 ms of a 35 ms bf16 step here). Every
 * elementwise step is per position, so the layer stays batch-invariant. Rounding to bf16 follows transformers'
 * bf16 module graph (norm: fp32 x * rsqrt(mean x^2 + eps), rounded, times the weight, rounded; rotary: q*cos and
 * rotate_half(q)*sin each rounded, then their sum; SiLU rounded, times up, rounded; each residual sum rounded). */
typedef struct {
    const uint16_t *data; /* row-major weight, or AMX tiles when amx */
    const float *bias;    /* fp32 or NULL */
    int64_t amx, out;
} ee_weight;

static inline float bf(uint16_t u) {
    uint32_t v = (uint32_t)u << 16;
    float f;
    memcpy(&f, &v, 4);
    return f;
}

static inline float rbf(float f) { return bf(round_bf16(f)); }

static void run_linear(const ee_weight *w, const uint16_t *x, uint16_t *y, int64_t M, int64_t K) {
    if (w->amx) ee_linear_bf16_amx(x, w->data, w->bias, y, M, w->out, K);
    else ee_linear_bf16(x, w->data, w->bias, y, M, w->out, K);
}

/* Per position: fp32 sum of squares (16 lanes, then one reduction), then weight * round(x * rsqrt(mean + eps)). */
static void rms_norm(const uint16_t *h, const uint16_t *w, float eps, uint16_t *out, int64_t M, int64_t d) {
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *hm = h + m * d;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 16) {
            const __m512 x = load_bf16(hm + i, lanes_left(d - i));
            ss = _mm512_fmadd_ps(x, x, ss);
        }
        const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)d + eps));
        for (int64_t i = 0; i < d; i += 16) {
            const __mmask16 k = lanes_left(d - i);
            store_bf16(out + m * d + i, _mm512_mul_ps(load_bf16(w + i, k), round_ps(_mm512_mul_ps(load_bf16(hm + i, k), r))), k);
        }
    }
}

/* h += r, rounded to bf16, per element. */
static void add_residual(uint16_t *h, const uint16_t *r, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = lanes_left(n - i);
        store_bf16(h + i, _mm512_add_ps(load_bf16(h + i, k), load_bf16(r + i, k)), k);
    }
}

/* Rotary on one head's D values: round(round(x * cos) + round(rotate_half(x) * sin)), rotate_half(x) being
 * (-x[half:], x[:half]); 16 lanes at a time where half % 16 == 0, else element by element (same numbers). */
static void rotate(const uint16_t *x, const uint16_t *c, const uint16_t *s, uint16_t *dst, int64_t D) {
    const int64_t half = D / 2;
    if (half % 16 == 0) {
        for (int64_t i = 0; i < D; i += 16) {
            const __m512 rot = i < half ? _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(
                                              load_bf16(x + i + half, 0xffff)), _mm512_set1_epi32((int)0x80000000u)))
                                        : load_bf16(x + i - half, 0xffff); /* negated by its sign bit, as -x */
            const __m512 a = round_ps(_mm512_mul_ps(load_bf16(x + i, 0xffff), load_bf16(c + i, 0xffff)));
            store_bf16(dst + i, _mm512_add_ps(a, round_ps(_mm512_mul_ps(rot, load_bf16(s + i, 0xffff)))), 0xffff);
        }
        return;
    }
    for (int64_t i = 0; i < D; i++) {
        const float rot = i < half ? -bf(x[i + half]) : bf(x[i - half]);
        dst[i] = round_bf16(rbf(bf(x[i]) * bf(c[i])) + rbf(rot * bf(s[i])));
    }
}

void ee_layer_bf16(uint16_t *h, int64_t M, int64_t d, const uint16_t *in_w, float in_eps, const uint16_t *post_w,
                   float post_eps, const ee_weight *qkv, const ee_weight *o, const ee_weight *gate_up,
                   const ee_weight *down, int64_t H, int64_t KVH, int64_t D, int64_t inter, const uint16_t *cos,
                   const uint16_t *sin, uint16_t *kc, uint16_t *vc, int64_t cap, int64_t past, float scale,
                   int64_t amx) {
    const int64_t qd = H * D, kvd = KVH * D, width = qd + 2 * kvd;
    uint16_t *x = malloc(2 * M * d), *proj = malloc(2 * M * width), *qs = malloc(2 * M * qd);
    uint16_t *att = malloc(2 * M * qd), *gu = malloc(2 * M * 2 * inter), *act = malloc(2 * M * inter);
    uint16_t *res = malloc(2 * M * d);
    rms_norm(h, in_w, in_eps, x, M, d);
    run_linear(qkv, x, proj, M, d);
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *c = cos + m * D, *s = sin + m * D, *row = proj + m * width;
        for (int64_t hh = 0; hh < H + KVH; hh++) /* query heads, then key heads: rotary */
            rotate(row + hh * D, c, s, hh < H ? qs + (hh * M + m) * D : kc + (hh - H) * cap * D + (past + m) * D, D);
        for (int64_t g = 0; g < KVH; g++) /* values as they are */
            memcpy(vc + g * cap * D + (past + m) * D, row + qd + kvd + g * D, 2 * D);
    }
    ee_attention_bf16(qs, kc, vc, cap * D, att, H, KVH, M, D, past + M, scale, amx);
    run_linear(o, att, res, M, qd);
    add_residual(h, res, M * d);
    rms_norm(h, post_w, post_eps, x, M, d);
    run_linear(gate_up, x, gu, M, d);
    for (int64_t m = 0; m < M; m++) /* SiLU(gate) * up, 16 lanes at a time (each lane alone: per element) */
        for (int64_t i = 0; i < inter; i += 16) {
            const __mmask16 mask = lanes_left(inter - i);
            const __m512 g = load_bf16(gu + m * 2 * inter + i, mask);
            const __m512 u = load_bf16(gu + m * 2 * inter + inter + i, mask);
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
            const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            /* round SiLU to bf16 (as the module graph does), multiply by up, round again */
            store_bf16(act + m * inter + i, _mm512_mul_ps(round_ps(silu), u), mask);
        }
    run_linear(down, act, res, M, inter);
    add_residual(h, res, M * d);
    free(x); free(proj); free(qs); free(att); free(gu); free(act); free(res);
}
