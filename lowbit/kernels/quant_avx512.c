/* lowbit's CPU quantizer for symmetric integer grids (int2..int8), AVX-512.
 *
 * It computes what lowbit.kernels.reference.quantize computes for a float32, bfloat16 or
 * float16 operand (read as float32, exactly) on a symmetric integer format, bit for bit
 * (the Python side, lowbit/kernels/avx512.py, computes the steps with
 * lowbit.formats.grid_step and self-tests against the reference):
 *
 *   y = x / d                        IEEE division, correctly rounded (vdivps)
 *   stochastic: q = floor(y) + [u < y - floor(y)],  u = counter noise of the element index
 *   nearest:    q = round-half-even(y)
 *   code = NaN ? 0 : clamp(q, -emax, emax)  as int8
 *
 * d is the row's (or the tensor's) step, 1 where the group is all zero. The noise is
 * lowbit.noise.counter_uniform: element i (row-major index in the quantized (R, D) shape)
 * gets h((i·K1 mod 2^32) XOR seed), h the two-round 32-bit mixer, 24 bits kept. The
 * uint32 arithmetic here is the reference's int64 arithmetic masked to 32 bits.
 *
 * Built without -ffast-math and with -ffp-contract=off: every operation is the IEEE one.
 * On a CPU with AVX2 but no AVX-512 the same file is built with LOWBIT_AVX2_SHIM defined:
 * each 512-bit intrinsic then runs on two 256-bit halves (avx512_on_avx2.h).
 */
#ifdef LOWBIT_AVX2_SHIM
#include "avx512_on_avx2.h"
/* a 512-bit value there is a struct of two registers, passed through memory to a function
 * not inlined (codes16 ran 3x slower than the compiled quantizer): the vector helpers inline */
#define VEC static inline __attribute__((always_inline))
#else
#include <immintrin.h>
#define VEC static inline
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#define THREAD_NUM() omp_get_thread_num()
#define NUM_THREADS() omp_get_num_threads()
#else  /* built without OpenMP where the compiler has none: one thread */
#define THREAD_NUM() 0
#define NUM_THREADS() 1
#endif

#define K1 0x27D4EB2Du
#define K2 0x045D9F3Bu

VEC __m512 noise16(__m512i idx, __m512i seed) {
    __m512i h = _mm512_xor_si512(_mm512_mullo_epi32(idx, _mm512_set1_epi32((int)K1)), seed);
    h = _mm512_mullo_epi32(_mm512_xor_si512(_mm512_srli_epi32(h, 16), h), _mm512_set1_epi32((int)K2));
    h = _mm512_mullo_epi32(_mm512_xor_si512(_mm512_srli_epi32(h, 16), h), _mm512_set1_epi32((int)K2));
    h = _mm512_xor_si512(_mm512_srli_epi32(h, 16), h);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)), _mm512_set1_ps(0x1p-24f));
}

VEC __m512i set1i(int v) { return _mm512_set1_epi32(v); }

/* FP8 elements (lowbit.formats.round_elements on an Element) of y = x / d as their code
 * bytes. k = max(exponent(|y|), emin) - man is the grid spacing's exponent there (read from
 * y's float32 exponent bits, as Element.spacing_exp), t = y * 2^-k (exact), q = t rounded
 * (stochastic: floor(t) + [u < t - floor(t)], the addition done even when it adds 0, so
 * that -0 + 0 = +0 as in the reference; nearest: half to even), v = q * 2^k (exact, on the
 * grid, |v| <= max). The byte is c10's float -> float8 conversion of v, exact for a grid
 * value: sign << 7 | exponent + bias << man | mantissa (normal), v / 2^(emin - man)
 * (subnormal), 0x7F for NaN (with the sign bit). kind 1: E4M3FN (man 3, emin -6, bias 7);
 * 2: E5M2 (man 2, emin -14, bias 15). */
VEC __m128i fp8_codes16(__m512 y, __m512i idx, __m512i seed, int sr, int kind) {
    const int man = kind == 1 ? 3 : 2, emin = kind == 1 ? -6 : -14, bias = kind == 1 ? 7 : 15;
    const __m512i ybits = _mm512_castps_si512(y);
    __m512i e = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(ybits, 23), set1i(0xFF)), set1i(127));
    const __m512i k = _mm512_sub_epi32(_mm512_max_epi32(e, set1i(emin)), set1i(man));
    const __m512 inv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(set1i(127), k), 23));
    const __m512 sp = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(set1i(127), k), 23));
    const __m512 t = _mm512_mul_ps(y, inv);
    __m512 q;
    if (sr) {
        const __m512 low = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        const __mmask16 up = _mm512_cmp_ps_mask(noise16(idx, seed), _mm512_sub_ps(t, low), _CMP_LT_OQ);
        q = _mm512_add_ps(low, _mm512_maskz_mov_ps(up, _mm512_set1_ps(1.0f)));
    } else {
        q = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    const __m512i v = _mm512_castps_si512(_mm512_mul_ps(q, sp));
    const __m512i sign = _mm512_slli_epi32(_mm512_srli_epi32(v, 31), 7);
    const __m512i a = _mm512_and_si512(v, set1i(0x7FFFFFFF));
    const __m512i biased = _mm512_srli_epi32(a, 23);
    const __mmask16 normal = _mm512_cmp_epi32_mask(biased, set1i(emin + 127), _MM_CMPINT_NLT);
    const __mmask16 nan = _mm512_cmp_epi32_mask(a, set1i(0x7F800000), _MM_CMPINT_NLE);
    const __m512i norm = _mm512_or_si512(
        _mm512_slli_epi32(_mm512_add_epi32(biased, set1i(bias - 127)), man),
        _mm512_and_si512(_mm512_srli_epi32(a, 23 - man), set1i((1 << man) - 1)));
    const __m512 scale_sub = _mm512_castsi512_ps(set1i((127 - (emin - man)) << 23));  /* 2^-(emin - man) */
    const __m512i sub = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(a), scale_sub));
    __m512i code = _mm512_mask_mov_epi32(sub, normal, norm);
    code = _mm512_mask_mov_epi32(code, nan, set1i(0x7F));
    return _mm512_cvtepi32_epi8(_mm512_or_si512(code, sign));
}

/* 16 codes of x / d (lanes' element indices idx) as 16 bytes. mode: bit 0 stochastic
 * rounding, bits 1-2 the grid: 0 the integer grid (clamped to +-emax), 1 E4M3, 2 E5M2
 * (fp8_codes16). */
VEC __m128i codes16(__m512 x, __m512 d, __m512i idx, __m512i seed, int mode, __m512 emax) {
    __m512 y = _mm512_div_ps(x, d), q;
    const int sr = mode & 1;
    if (mode >> 1) return fp8_codes16(y, idx, seed, sr, mode >> 1);
    if (sr) {
        __m512 low = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        __mmask16 up = _mm512_cmp_ps_mask(noise16(idx, seed), _mm512_sub_ps(y, low), _CMP_LT_OQ);
        q = _mm512_mask_add_ps(low, up, low, _mm512_set1_ps(1.0f));
    } else {
        q = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    q = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(q, q, _CMP_ORD_Q), q);            /* NaN -> 0 */
    q = _mm512_min_ps(_mm512_max_ps(q, _mm512_sub_ps(_mm512_setzero_ps(), emax)), emax);
    return _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q));                            /* exact */
}

VEC __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

/* Element types of x: float32, bfloat16, float16 (each converted to float32 exactly, as
 * the reference's x.to(float32)). */
enum { F32 = 0, BF16 = 1, F16 = 2 };

/* 16 elements of x from element offset off (masked lanes 0) as float32. */
VEC __m512 load16(const void *x, int64_t off, __mmask16 k, int dtype) {
    if (dtype == BF16) {
        __m256i h = _mm256_maskz_loadu_epi16(k, (const uint16_t *)x + off);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    if (dtype == F16)
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, (const uint16_t *)x + off));
    return _mm512_maskz_loadu_ps(k, (const float *)x + off);
}

/* BHQ's row transform T x = S x - 2 v (sum over the row's group), element by element
 * (lowbit.quantizers.bhq._apply_forward, the same float32 operations in the same order):
 * y = x * s[r] - v2[r] * dots[group[r], c], with v2 = 2 v. t == NULL: the identity. */
typedef struct {
    const float *s, *v2, *dots;
    const int64_t *group;
} RowTransform;

/* x * s - v2 * d, 16 elements (s, v2 a row's; d its group's sums there, masked lanes 0). */
VEC __m512 householder16(__m512 x, __m512 s, __m512 v2, const float *d, __mmask16 k) {
    return _mm512_sub_ps(_mm512_mul_ps(x, s), _mm512_mul_ps(v2, _mm512_maskz_loadu_ps(k, d)));
}

VEC __m512 transform16(__m512 v, const RowTransform *t, int64_t r, int64_t cols, int64_t c,
                                 __mmask16 k) {
    if (!t) return v;
    return householder16(v, _mm512_set1_ps(t->s[r]), _mm512_set1_ps(t->v2[r]), t->dots + t->group[r] * cols + c, k);
}

static const int32_t LANES[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* amax[r] = max |x[r, :]| (NaN where the row holds a NaN), x (rows, cols) of type dtype with
 * row stride ld (elements). */
static void row_absmax(const void *x, int dtype, int64_t rows, int64_t cols, int64_t ld,
                       const RowTransform *t, float *amax, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        __m512 m = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int64_t c = 0; c < cols; c += 16) {
            const __mmask16 k = tail_mask(cols - c);
            /* lanes past the row are 0 (a transform of them, 0 * inf, could be NaN) */
            __m512 v = _mm512_maskz_mov_ps(k, _mm512_abs_ps(transform16(load16(x, r * ld + c, k, dtype), t, r,
                                                                        cols, c, k)));
            m = _mm512_max_ps(m, v);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        }
        amax[r] = nan ? NAN : _mm512_reduce_max_ps(m);
    }
}

void lowbit_row_absmax(const void *x, int dtype, int64_t rows, int64_t cols, int64_t ld, float *amax,
                       int threads) {
    row_absmax(x, dtype, rows, cols, ld, NULL, amax, threads);
}


/* cm[c..c+16) = max(cm, a) for a = |x| (an's lanes NaN), keeping NaN (masked lanes untouched). */
VEC void column_max16(float *cm, __m512 a, __mmask16 an, __mmask16 k) {
    const __m512 nw = _mm512_max_ps(a, _mm512_maskz_loadu_ps(k, cm));  /* old NaN -> old (2nd operand) */
    _mm512_mask_storeu_ps(cm, k, _mm512_mask_mov_ps(nw, an, a));        /* new NaN -> NaN */
}

/* camax[c] for c in [lo, hi): the maximum over the nt threads' column maxima
 * scratch[u * stride + c] (NaN where one is). */
static void merge_column_max(const float *scratch, int64_t stride, int nt, int64_t lo, int64_t hi, float *camax) {
    for (int64_t c = lo; c < hi; c++) {
        float m = 0.0f;
        int nan = 0;
        for (int u = 0; u < nt; u++) {
            const float v = scratch[(int64_t)u * stride + c];
            nan |= v != v;
            m = v > m ? v : m;
        }
        camax[c] = nan ? NAN : m;
    }
}

/* max |x[r, :]| (NaN where the row holds a NaN), and cm[c] = max(cm[c], |x[r, c]|) keeping NaN. */
static inline float row_and_column_absmax(const void *x, int dtype, int64_t r, int64_t cols, int64_t ld,
                                          float *cm) {
    __m512 m = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t c = 0; c < cols; c += 16) {
        const __mmask16 k = tail_mask(cols - c);
        const __m512 v = _mm512_abs_ps(load16(x, r * ld + c, k, dtype));
        const __mmask16 vn = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        m = _mm512_max_ps(m, v);
        nan |= vn;
        column_max16(cm + c, v, vn, k);
    }
    return nan ? NAN : _mm512_reduce_max_ps(m);
}

/* Row and column absmax of x (rows, cols) in one read: ramax (rows; NULL: not wanted), camax (cols).
 * scratch: threads * cols floats (one column maximum per thread, merged at the end). */
static void pair_absmax(const void *x, int dtype, int64_t rows, int64_t cols, int64_t ld, float *ramax,
                        float *camax, float *scratch, int threads) {
#pragma omp parallel num_threads(threads)
    {
        const int t = THREAD_NUM(), nt = NUM_THREADS();
        float *cm = scratch + (int64_t)t * cols;
        memset(cm, 0, (size_t)cols * sizeof(float));
        int64_t lo = rows * t / nt, hi = rows * (t + 1) / nt;
        for (int64_t r = lo; r < hi; r++) {
            const float m = row_and_column_absmax(x, dtype, r, cols, ld, cm);
            if (ramax) ramax[r] = m;
        }
#pragma omp barrier
        merge_column_max(scratch, cols, nt, cols * t / nt, cols * (t + 1) / nt, camax);
    }
}

/* pair_absmax of one entry on the calling thread: camax (cols) written directly. */
static void pair_absmax_serial(const void *x, int dtype, int64_t rows, int64_t cols, int64_t ld, float *ramax,
                               float *camax) {
    memset(camax, 0, (size_t)cols * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        const float m = row_and_column_absmax(x, dtype, r, cols, ld, camax);
        if (ramax) ramax[r] = m;
    }
}

/* pair_absmax of a batch of entries x + e * bstride (e < batch, each (rows, cols), row
 * stride ld): ramax + e * rows (NULL: not wanted), camax + e * cols. With fewer entries
 * than threads, each entry's rows are split among the threads; otherwise whole entries
 * are. scratch: threads * cols floats. */
void lowbit_pair_absmax(const void *x, int dtype, int64_t batch, int64_t bstride, int64_t rows, int64_t cols,
                        int64_t ld, float *ramax, float *camax, float *scratch, int threads) {
    const size_t es = dtype == F32 ? 4 : 2;  /* bytes per element */
    if (batch < threads) {
        for (int64_t e = 0; e < batch; e++)
            pair_absmax((const char *)x + e * bstride * es, dtype, rows, cols, ld, ramax ? ramax + e * rows : NULL,
                        camax + e * cols, scratch, threads);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t e = 0; e < batch; e++)
        pair_absmax_serial((const char *)x + e * bstride * es, dtype, rows, cols, ld,
                           ramax ? ramax + e * rows : NULL, camax + e * cols);
}

/* codes (rows, cols) row-major of x (rows, cols, row stride ld); d[r * dstride] the
 * divisor of row r (dstride 0: one for the tensor). */
static void quantize_rows(const void *x, int dtype, int64_t rows, int64_t cols, int64_t ld,
                          const RowTransform *t, const float *d, int64_t dstride, uint32_t seed, int sr,
                          float emax, int8_t *codes, int threads) {
    const __m512i lane = _mm512_loadu_si512(LANES), vseed = _mm512_set1_epi32((int)seed);
    const __m512 vemax = _mm512_set1_ps(emax);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const __m512 vd = _mm512_set1_ps(d[r * dstride]);
        const uint32_t base = (uint32_t)((uint64_t)r * (uint64_t)cols);
        int8_t *o = codes + r * cols;
        for (int64_t c = 0; c < cols; c += 16) {
            __mmask16 k = tail_mask(cols - c);
            __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)(base + (uint32_t)c)), lane);
            __m128i b = codes16(transform16(load16(x, r * ld + c, k, dtype), t, r, cols, c, k), vd, idx,
                                vseed, sr, vemax);
            _mm_mask_storeu_epi8(o + c, k, b);
        }
    }
}

void lowbit_quantize_rows(const void *x, int dtype, int64_t rows, int64_t cols, int64_t ld, const float *d,
                          int64_t dstride, uint32_t seed, int sr, float emax, int8_t *codes, int threads) {
    quantize_rows(x, dtype, rows, cols, ld, NULL, d, dstride, seed, sr, emax, codes, threads);
}

/* BHQ's forward transform and the row quantizer in one function (T x is never written):
 * absmax of T x's rows into amax, then nothing else; lowbit_bhq_quantize_rows the codes.
 * s, v2 (= 2 v), group (rows), dots (G, cols) row-major float32. */
void lowbit_bhq_absmax(const void *x, int dtype, int64_t rows, int64_t cols, int64_t ld, const float *s,
                       const float *v2, const int64_t *group, const float *dots, float *amax, int threads) {
    const RowTransform t = {s, v2, dots, group};
    row_absmax(x, dtype, rows, cols, ld, &t, amax, threads);
}

/* BHQ's inverse T^-1 y = S^-1 (y - 2 v dots[group]) of float32 rows, the reference's
 * ((y - (2 v) * dots[group]) / s), written to out (out == y: in place). y and out row-major
 * with row strides ldy, ldo; dots (G, cols) row-major. */
void lowbit_bhq_inverse_rows(const float *y, int64_t rows, int64_t cols, int64_t ldy, const float *s,
                             const float *v2, const int64_t *group, const float *dots, float *out,
                             int64_t ldo, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *yr = y + r * ldy, *dr = dots + group[r] * cols;
        float *o = out + r * ldo;
        const __m512 vv = _mm512_set1_ps(v2[r]), vs = _mm512_set1_ps(s[r]);
        for (int64_t c = 0; c < cols; c += 16) {
            const __mmask16 k = tail_mask(cols - c);
            const __m512 a = _mm512_maskz_loadu_ps(k, yr + c), d = _mm512_maskz_loadu_ps(k, dr + c);
            _mm512_mask_storeu_ps(o + c, k, _mm512_div_ps(_mm512_sub_ps(a, _mm512_mul_ps(vv, d)), vs));
        }
    }
}

/* 1 where a kernel may read rows through the CSR index (crow (n_groups + 1,), members (n,)):
 * crow non-decreasing from 0 to n, and members each row of [0, n) once (the kernels write
 * only the rows they list, into fresh buffers); else 0 (or -1 where no scratch could be
 * had). O(N + G), run before each kernel that indexes by it: the Python side memoizes its
 * own full check on the fields' versions, which a write through .data or numpy does not
 * move (reviews: such a write made a kernel read and write outside its tensors, or, in
 * range, leave a row's results uninitialised). */
int lowbit_csr_ok(const int64_t *crow, const int64_t *members, int64_t n_groups, int64_t n) {
    if (n_groups < 0 || crow[0] != 0 || crow[n_groups] != n) return 0;
    for (int64_t j = 0; j < n_groups; j++)
        if (crow[j + 1] < crow[j]) return 0;
    unsigned char *seen = (unsigned char *)calloc((size_t)(n > 0 ? n : 1), 1);
    if (!seen) return -1;
    int ok = 1;
    for (int64_t m = 0; m < n && ok; m++) {
        const int64_t r = members[m];
        if ((uint64_t)r >= (uint64_t)n || seen[r]) ok = 0;
        else seen[r] = 1;
    }
    free(seen);
    return ok;
}

#define GS_BAND 256

/* acc[i] (i < nv: columns c0 + 16 i ..) = the sum over group j's rows (members[crow[j] :
 * crow[j + 1]], ascending) of w[r] * x[r, c0 + ..] (each product rounded, from +0). */
static inline void group_band_sums(const void *x, int dtype, int64_t ld, const float *w, const int64_t *crow,
                                   const int64_t *members, int64_t j, int64_t c0, int64_t width, __m512 *acc) {
    const int64_t nv = (width + 15) / 16;
    for (int64_t i = 0; i < nv; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t m = crow[j]; m < crow[j + 1]; m++) {
        const int64_t r = members[m];
        const __m512 wr = _mm512_set1_ps(w[r]);
        for (int64_t i = 0; i < nv; i++) {
            const __mmask16 k = tail_mask(width - 16 * i);
            acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(load16(x, r * ld + c0 + 16 * i, k, dtype), wr));
        }
    }
}

/* BHQ's group sums dots[j, :] = sum over the rows r of group j of w[r] * x[r, :], the rows in
 * ascending order, each product rounded to float32 and then added to a float32 sum that
 * starts at +0 (lowbit.quantizers.bhq._group_sums on the CPU: torch's index_add_ of the
 * weighted rows, which adds the rows one by one in index order). Group j's rows are
 * members[crow[j] : crow[j + 1]], ascending. x (rows, cols) of type dtype with row stride
 * ld; w (rows,) float32; dots (n_groups, cols) row-major. Each task is one group and a
 * band of at most GS_BAND columns, summed in registers: every element's additions keep the
 * reference's order whatever the threads. The tasks go to the threads in guided chunks:
 * the text GPT's gradients have ~1,000 groups of ~2 rows, whose tasks one at a time
 * (schedule(dynamic, 4) until 2026-12-06) cost their scheduling as much as their sums. */
void lowbit_bhq_group_sums(const void *x, int dtype, int64_t cols, int64_t ld, const float *w,
                           const int64_t *crow, const int64_t *members, int64_t n_groups, float *dots,
                           int threads) {
    const int64_t bands = (cols + GS_BAND - 1) / GS_BAND;
#pragma omp parallel for num_threads(threads) schedule(guided)
    for (int64_t task = 0; task < n_groups * bands; task++) {
        const int64_t j = task / bands, c0 = (task % bands) * GS_BAND;
        const int64_t width = cols - c0 < GS_BAND ? cols - c0 : GS_BAND, nv = (width + 15) / 16;
        __m512 acc[GS_BAND / 16];
        group_band_sums(x, dtype, ld, w, crow, members, j, c0, width, acc);
        for (int64_t i = 0; i < nv; i++)
            _mm512_mask_storeu_ps(dots + j * cols + c0 + 16 * i, tail_mask(width - 16 * i), acc[i]);
    }
}

/* One band of at most 64 columns (c0 .. c0 + width) of group j's inverse, its four sums
 * in registers: acc = sum over the group's rows (ascending) of v[r] * y[r, band] (each
 * product rounded, added to a sum from +0: lowbit_bhq_group_sums' order and arithmetic),
 * then out[r, band] = (y[r, band] - v2[r] * acc) / s[r] (lowbit_bhq_inverse_rows'). */
static inline void sums_inverse_band(const float *y, int64_t ldy, const float *s, const float *v, const float *v2,
                                     const int64_t *mb, const int64_t *me, int64_t c0, int64_t width, float *out,
                                     int64_t ldo) {
    const __mmask16 k0 = tail_mask(width), k1 = width > 16 ? tail_mask(width - 16) : 0,
                    k2 = width > 32 ? tail_mask(width - 32) : 0, k3 = width > 48 ? tail_mask(width - 48) : 0;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (const int64_t *m = mb; m < me; m++) {
        const float *p = y + *m * ldy + c0;
        const __m512 w = _mm512_set1_ps(v[*m]);
        a0 = _mm512_add_ps(a0, _mm512_mul_ps(_mm512_maskz_loadu_ps(k0, p), w));
        a1 = _mm512_add_ps(a1, _mm512_mul_ps(_mm512_maskz_loadu_ps(k1, p + 16), w));
        a2 = _mm512_add_ps(a2, _mm512_mul_ps(_mm512_maskz_loadu_ps(k2, p + 32), w));
        a3 = _mm512_add_ps(a3, _mm512_mul_ps(_mm512_maskz_loadu_ps(k3, p + 48), w));
    }
    for (const int64_t *m = mb; m < me; m++) {
        const float *p = y + *m * ldy + c0;
        float *o = out + *m * ldo + c0;
        const __m512 vv = _mm512_set1_ps(v2[*m]), vs = _mm512_set1_ps(s[*m]);
        _mm512_mask_storeu_ps(o, k0, _mm512_div_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k0, p), _mm512_mul_ps(vv, a0)), vs));
        _mm512_mask_storeu_ps(o + 16, k1, _mm512_div_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k1, p + 16), _mm512_mul_ps(vv, a1)), vs));
        _mm512_mask_storeu_ps(o + 32, k2, _mm512_div_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k2, p + 32), _mm512_mul_ps(vv, a2)), vs));
        _mm512_mask_storeu_ps(o + 48, k3, _mm512_div_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k3, p + 48), _mm512_mul_ps(vv, a3)), vs));
    }
}

/* BHQ's inverse with its own group sums, group by group: out = S^-1 (y - 2 v dots[group])
 * with dots[j, :] = sum over group j's rows of v[r] * y[r, :] (lowbit_bhq_group_sums' order
 * and arithmetic, then lowbit_bhq_inverse_rows'), each task one group's band of 64
 * columns (sums_inverse_band: four sums in registers, then the band's rows while they
 * are in cache; a group of nearly all rows — one spike row — still goes to every thread,
 * which a task per whole group did not: 2x the time, a review): y read from memory once,
 * no dots written. (Until 2026-12-06 a task was a
 * group and a band of 256 columns whose sums lived in an array on the stack: 1.25x the
 * time, docs/benchmarks.md "BHQ's sums in registers…".) y, out float32 row-major with row
 * strides ldy, ldo (out == y: in place); s, v2 (= 2 v), v (rows,) float32; the groups' CSR
 * index crow, members as lowbit_bhq_group_sums. */
void lowbit_bhq_sums_inverse(const float *y, int64_t cols, int64_t ldy, const float *s, const float *v,
                             const float *v2, const int64_t *crow, const int64_t *members, int64_t n_groups,
                             float *out, int64_t ldo, int threads) {
    const int64_t bands = (cols + 63) / 64;
#pragma omp parallel for num_threads(threads) schedule(guided)
    for (int64_t task = 0; task < n_groups * bands; task++) {  /* a group's band: one group of all rows still splits */
        const int64_t j = task / bands, c0 = (task % bands) * 64;
        if (cols - c0 >= 64)  /* (a constant width: the masks fold away) */
            sums_inverse_band(y, ldy, s, v, v2, members + crow[j], members + crow[j + 1], c0, 64, out, ldo);
        else
            sums_inverse_band(y, ldy, s, v, v2, members + crow[j], members + crow[j + 1], c0, cols - c0, out, ldo);
    }
}

/* One band of group j for lowbit_bhq_epilogue_inverse: the epilogue of its rows'
 * int32 sums (lowbit_epilogue_rows' (float(acc) * sa) * sb, no bias) written over them as
 * float32 while v[r] * y is summed (sums_inverse_band's order and arithmetic), then the
 * band's rows inverted from cache (sums_inverse_band's second loop), in place. */
static inline void epilogue_inverse_band(int32_t *acc, int64_t n, int64_t m, const float *sa, int sa_rows,
                                         const float *sb, int sb_cols, int64_t sb_bstride, const float *s,
                                         const float *v, const float *v2, const int64_t *mb, const int64_t *me,
                                         int64_t c0, int64_t width) {
    const __mmask16 k0 = tail_mask(width), k1 = width > 16 ? tail_mask(width - 16) : 0,
                    k2 = width > 32 ? tail_mask(width - 32) : 0, k3 = width > 48 ? tail_mask(width - 48) : 0;
    const __mmask16 km[4] = {k0, k1, k2, k3};
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (const int64_t *p = mb; p < me; p++) {
        const int64_t r = *p;
        int32_t *row = acc + r * n + c0;
        const __m512 va = _mm512_set1_ps(sa[sa_rows ? r : 0]), w = _mm512_set1_ps(v[r]);
        const float *sbr = sb_cols ? sb + (r / m) * sb_bstride + c0 : NULL;
        const __m512 vb = _mm512_set1_ps(sb[0]);
        for (int q = 0; q < 4; q++) {
            const __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(km[q], row + 16 * q)),
                                                         va),
                                           sbr ? _mm512_maskz_loadu_ps(km[q], sbr + 16 * q) : vb);
            _mm512_mask_storeu_ps((float *)row + 16 * q, km[q], y);
            a[q] = _mm512_add_ps(a[q], _mm512_mul_ps(y, w));
        }
    }
    for (const int64_t *p = mb; p < me; p++) {
        float *o = (float *)(acc + *p * n + c0);
        const __m512 vv = _mm512_set1_ps(v2[*p]), vs = _mm512_set1_ps(s[*p]);
        for (int q = 0; q < 4; q++)
            _mm512_mask_storeu_ps(o + 16 * q, km[q],
                                  _mm512_div_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(km[q], o + 16 * q),
                                                              _mm512_mul_ps(vv, a[q])), vs));
    }
}

/* The epilogue of a GEMM whose left operand is BHQ's T x, and T^-1 of its rows, in one
 * pass, in place: acc (rows, n) int32 -> float32 over the same bytes, with the values of
 * lowbit_epilogue_rows (no bias; sa, sb, m, sb_bstride as there) followed by
 * lowbit_bhq_sums_inverse (s, v, v2 = 2 v, the CSR index crow, members of n_groups
 * groups) — bit for bit. Each task is one group's band of 64 columns, as there: its rows'
 * sums are converted while they are summed, then inverted from cache; acc is read from
 * memory once and written once, where the two kernels read it twice and wrote it twice. */
void lowbit_bhq_epilogue_inverse(int32_t *acc, int64_t n, int64_t m, const float *sa, int sa_rows,
                                 const float *sb, int sb_cols, int64_t sb_bstride, const float *s, const float *v,
                                 const float *v2, const int64_t *crow, const int64_t *members, int64_t n_groups,
                                 int threads) {
    const int64_t bands = (n + 63) / 64;
#pragma omp parallel for num_threads(threads) schedule(guided)
    for (int64_t task = 0; task < n_groups * bands; task++) {
        const int64_t j = task / bands, c0 = (task % bands) * 64;
        if (n - c0 >= 64)  /* (a constant width: the masks fold away) */
            epilogue_inverse_band(acc, n, m, sa, sa_rows, sb, sb_cols, sb_bstride, s, v, v2, members + crow[j],
                                  members + crow[j + 1], c0, 64);
        else
            epilogue_inverse_band(acc, n, m, sa, sa_rows, sb, sb_cols, sb_bstride, s, v, v2, members + crow[j],
                                  members + crow[j + 1], c0, n - c0);
    }
}

void lowbit_bhq_quantize_rows(const void *x, int dtype, int64_t rows, int64_t cols, int64_t ld,
                              const float *s, const float *v2, const int64_t *group, const float *dots,
                              const float *d, int64_t dstride, uint32_t seed, int sr, float emax,
                              int8_t *codes, int threads) {
    const RowTransform t = {s, v2, dots, group};
    quantize_rows(x, dtype, rows, cols, ld, &t, d, dstride, seed, sr, emax, codes, threads);
}


/* Transpose 16 x 16 bytes: out[j] byte i = in[i] byte j. */
static inline void transpose16(const __m128i in[16], __m128i out[16]) {
    __m128i a[16], b[16];
    for (int i = 0; i < 8; i++) {
        a[i] = _mm_unpacklo_epi8(in[2 * i], in[2 * i + 1]);
        a[i + 8] = _mm_unpackhi_epi8(in[2 * i], in[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        b[i] = _mm_unpacklo_epi16(a[2 * i], a[2 * i + 1]);
        b[i + 4] = _mm_unpackhi_epi16(a[2 * i], a[2 * i + 1]);
        b[i + 8] = _mm_unpacklo_epi16(a[8 + 2 * i], a[8 + 2 * i + 1]);
        b[i + 12] = _mm_unpackhi_epi16(a[8 + 2 * i], a[8 + 2 * i + 1]);
    }
    for (int g = 0; g < 4; g++) {
        __m128i *s = b + 4 * g;
        a[4 * g + 0] = _mm_unpacklo_epi32(s[0], s[1]);
        a[4 * g + 1] = _mm_unpackhi_epi32(s[0], s[1]);
        a[4 * g + 2] = _mm_unpacklo_epi32(s[2], s[3]);
        a[4 * g + 3] = _mm_unpackhi_epi32(s[2], s[3]);
    }
    for (int g = 0; g < 4; g++) {
        __m128i *s = a + 4 * g;
        b[4 * g + 0] = _mm_unpacklo_epi64(s[0], s[2]);
        b[4 * g + 1] = _mm_unpackhi_epi64(s[0], s[2]);
        b[4 * g + 2] = _mm_unpacklo_epi64(s[1], s[3]);
        b[4 * g + 3] = _mm_unpackhi_epi64(s[1], s[3]);
    }
    for (int j = 0; j < 16; j++) out[j] = b[j];
}

/* Both quantizations of x (rows, cols; row stride ld) from one read of each tile:
 *   codes_a (rows, cols) row-major: x's rows, divisors da[r * da_stride], seed_a, sr_a
 *   (codes_a NULL: skipped, and da, seed_a, sr_a, emax_a unused);
 *   codes_w (cols, rows) row-major: xᵀ's rows (x's columns), divisors dw[c * dw_stride],
 *   element (c, r) of xᵀ having index c * rows + r, seed_w, sr_w.
 * A batch of such x: entry e at x + e * bstride, its divisors da + e * rows * da_stride and
 * dw + e * cols * dw_stride, its codes at element e·rows·cols of codes_a and of codes_w,
 * its element indices offset by (first + e)·rows·cols (mod 2³²): the codes of the batch's rows
 * (batch·rows, cols) and of each entry's transpose (batch·cols, rows), where the batch is
 * entries first, first + 1, … of a larger one (first = 0: the whole batch). */
void lowbit_quantize_pair(const void *x, int dtype, int64_t batch, int64_t bstride, int64_t rows, int64_t cols,
                          int64_t ld, const float *da, int64_t da_stride, uint32_t seed_a, int sr_a, float emax_a,
                          int8_t *codes_a,
                          const float *dw, int64_t dw_stride, uint32_t seed_w, int sr_w, float emax_w,
                          int8_t *codes_w, int64_t first, int threads) {
    const size_t es = dtype == F32 ? 4 : 2;  /* bytes per element */
    const __m512i lane = _mm512_loadu_si512(LANES);
    const __m512i vseed_a = _mm512_set1_epi32((int)seed_a), vseed_w = _mm512_set1_epi32((int)seed_w);
    const __m512 vemax_a = _mm512_set1_ps(emax_a), vemax_w = _mm512_set1_ps(emax_w);
    /* Tiles of TR rows x TC columns: within a tile, each row of codes_w gets TR contiguous
     * bytes, and the pages a tile touches (TR rows of x, codes_a; TC rows of codes_w) stay
     * within the TLB's reach (scanning whole rows of a large x wrote each 64-byte line of
     * codes_w on another page: 5x slower at 2048 x 4096). */
    enum { TR = 256, TC = 256 };
    const int64_t blocks = (rows + TR - 1) / TR;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t eb = 0; eb < batch * blocks; eb++) {
        /* entry e's elements are indices (first + e)·rows·cols … of the batch's codes (mod 2³²) */
        const int64_t e = eb / blocks, rb = eb % blocks;
        const uint32_t base = (uint32_t)((uint64_t)(first + e) * (uint64_t)rows * (uint64_t)cols);
        const void *xe = (const char *)x + e * bstride * es;
        const float *dae = codes_a ? da + e * rows * da_stride : da, *dwe = dw + e * cols * dw_stride;
        int8_t *cae = codes_a ? codes_a + e * rows * cols : NULL, *cwe = codes_w + e * rows * cols;
        __m128i wc[16], wt[16];
        const int64_t rend = rows < rb * TR + TR ? rows : rb * TR + TR;
        for (int64_t ct = 0; ct < cols; ct += TC) {
            const int64_t cend = cols < ct + TC ? cols : ct + TC;
            for (int64_t r0 = rb * TR; r0 < rend; r0 += 16) {
                const int64_t nr = rend - r0 < 16 ? rend - r0 : 16;
                const __mmask16 kr = tail_mask(nr);
                for (int64_t c = ct; c < cend; c += 16) {
                    const __mmask16 k = tail_mask(cols - c);
                    const int64_t nc = cols - c < 16 ? cols - c : 16;
                    const __m512 vdw = dw_stride ? _mm512_maskz_loadu_ps(k, dwe + c) : _mm512_set1_ps(dwe[0]);
                    /* xᵀ element (c + lane, r) has index (c + lane) * rows + r */
                    const __m512i colbase = _mm512_add_epi32(_mm512_mullo_epi32(
                        _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)c), lane),
                        _mm512_set1_epi32((int)(uint32_t)rows)), _mm512_set1_epi32((int)base));
                    for (int64_t i = 0; i < 16; i++) {
                        if (i >= nr) { wc[i] = _mm_setzero_si128(); continue; }
                        const int64_t r = r0 + i;
                        const __m512 v = load16(xe, r * ld + c, k, dtype);
                        if (cae) {
                            const __m512i ia = _mm512_add_epi32(
                                _mm512_set1_epi32((int)(uint32_t)((uint64_t)r * (uint64_t)cols + (uint64_t)c + base)), lane);
                            _mm_mask_storeu_epi8(cae + r * cols + c, k,
                                                 codes16(v, _mm512_set1_ps(dae[r * da_stride]), ia, vseed_a, sr_a, vemax_a));
                        }
                        const __m512i iw = _mm512_add_epi32(colbase, _mm512_set1_epi32((int)(uint32_t)r));
                        /* masked-off lanes divide 0 by 0: NaN -> code 0, never stored */
                        wc[i] = codes16(v, vdw, iw, vseed_w, sr_w, vemax_w);
                    }
                    transpose16(wc, wt);
                    for (int64_t j = 0; j < nc; j++)
                        _mm_mask_storeu_epi8(cwe + (c + j) * rows + r0, kr, wt[j]);
                }
            }
        }
    }
}

/* A convolution's output gradient x (n, c, l) (strides ldn, ldc, 1: l contiguous), the
 * operand of both its quantizations: the rows of ∇X's, x as (n, c·l), and the rows of
 * ∇W's, x's channels as (c, n·l), each row n segments of l elements.
 * lowbit_seg_absmax: m[i * c + j] = max |x[i, j, :]| (NaN where it holds a NaN). */
void lowbit_seg_absmax(const void *x, int dtype, int64_t n, int64_t c, int64_t l, int64_t ldn,
                       int64_t ldc, float *m, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t s = 0; s < n * c; s++) {
        const int64_t i = s / c, j = s % c, base = i * ldn + j * ldc;
        __m512 v = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int64_t e = 0; e < l; e += 16) {
            const __mmask16 k = tail_mask(l - e);
            const __m512 a = _mm512_abs_ps(load16(x, base + e, k, dtype));
            v = _mm512_max_ps(v, a);
            nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
        }
        m[s] = nan ? NAN : _mm512_reduce_max_ps(v);
    }
}

/* Both quantizations of x (n, c, l) from one read of each segment:
 *   codes_a (n, c·l) row-major: element (i, j·l + e), index i·c·l + j·l + e, divisor
 *   da[i * da_stride], seed_a, sr_a;
 *   codes_w (c, n·l) row-major: element (j, i·l + e), index j·n·l + i·l + e, divisor
 *   dw[j * dw_stride], seed_w, sr_w.
 * Indices are taken mod 2³², as the reference's int64 indices masked to 32 bits.
 * codes_a NULL: the codes_w alone (da is then read but not used). */
void lowbit_seg_quantize_pair(const void *x, int dtype, int64_t n, int64_t c, int64_t l, int64_t ldn,
                              int64_t ldc, const float *da, int64_t da_stride, uint32_t seed_a, int sr_a,
                              float emax_a, int8_t *codes_a,
                              const float *dw, int64_t dw_stride, uint32_t seed_w, int sr_w, float emax_w,
                              int8_t *codes_w, int threads) {
    const __m512i lane = _mm512_loadu_si512(LANES);
    const __m512i vseed_a = _mm512_set1_epi32((int)seed_a), vseed_w = _mm512_set1_epi32((int)seed_w);
    const __m512 vemax_a = _mm512_set1_ps(emax_a), vemax_w = _mm512_set1_ps(emax_w);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t s = 0; s < n * c; s++) {
        const int64_t i = s / c, j = s % c, base = i * ldn + j * ldc;
        const int64_t oa = i * c * l + j * l, ow = j * n * l + i * l;  /* row-major offsets */
        const __m512 vda = _mm512_set1_ps(da[i * da_stride]), vdw = _mm512_set1_ps(dw[j * dw_stride]);
        for (int64_t e = 0; e < l; e += 16) {
            const __mmask16 k = tail_mask(l - e);
            const __m512 v = load16(x, base + e, k, dtype);
            const __m512i ia = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)((uint64_t)(oa + e))), lane);
            const __m512i iw = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)((uint64_t)(ow + e))), lane);
            if (codes_a != NULL)
                _mm_mask_storeu_epi8(codes_a + oa + e, k, codes16(v, vda, ia, vseed_a, sr_a, vemax_a));
            _mm_mask_storeu_epi8(codes_w + ow + e, k, codes16(v, vdw, iw, vseed_w, sr_w, vemax_w));
        }
    }
}

/* The same two functions for a channels-last x (n, c, l): strides (ldn, 1, ldl), each
 * position's c channels contiguous. lowbit_seg_absmax_cl: the same m (max is exact, so
 * the order of reading does not matter). lowbit_seg_quantize_pair_cl: the same codes at
 * the same places, with the same element indices: 16 positions x 16 channels are loaded
 * (16 loads of 16 channels), turned by transpose16f into 16 channel rows of 16 positions,
 * and each row is then what lowbit_seg_quantize_pair computes for those 16 elements. */
static inline void transpose16f(__m512 r[16]);

void lowbit_seg_absmax_cl(const void *x, int dtype, int64_t n, int64_t c, int64_t l, int64_t ldn,
                          int64_t ldl, float *m, int threads) {
    const int64_t ct = (c + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t s = 0; s < n * ct; s++) {
        const int64_t i = s / ct, c0 = (s % ct) * 16;
        const __mmask16 kc = tail_mask(c - c0);
        __m512 v = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int64_t e = 0; e < l; e++) {
            const __m512 a = _mm512_abs_ps(load16(x, i * ldn + e * ldl + c0, kc, dtype));
            v = _mm512_max_ps(v, a);
            nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
        }
        _mm512_mask_storeu_ps(m + i * c + c0, kc, _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(NAN)));
    }
}

void lowbit_seg_quantize_pair_cl(const void *x, int dtype, int64_t n, int64_t c, int64_t l, int64_t ldn,
                                 int64_t ldl, const float *da, int64_t da_stride, uint32_t seed_a, int sr_a,
                                 float emax_a, int8_t *codes_a,
                                 const float *dw, int64_t dw_stride, uint32_t seed_w, int sr_w, float emax_w,
                                 int8_t *codes_w, int threads) {
    const __m512i lane = _mm512_loadu_si512(LANES);
    const __m512i vseed_a = _mm512_set1_epi32((int)seed_a), vseed_w = _mm512_set1_epi32((int)seed_w);
    const __m512 vemax_a = _mm512_set1_ps(emax_a), vemax_w = _mm512_set1_ps(emax_w);
    const int64_t pt = (l + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t s = 0; s < n * pt; s++) {
        const int64_t i = s / pt, e = (s % pt) * 16;
        const int64_t np = l - e < 16 ? l - e : 16;
        const __mmask16 kp = tail_mask(np);
        const __m512 vda = _mm512_set1_ps(da[i * da_stride]);
        __m512 r[16];
        for (int64_t c0 = 0; c0 < c; c0 += 16) {
            const __mmask16 kc = tail_mask(c - c0);
            const int64_t nc = c - c0 < 16 ? c - c0 : 16;
            for (int64_t t = 0; t < 16; t++)
                r[t] = t < np ? load16(x, i * ldn + (e + t) * ldl + c0, kc, dtype) : _mm512_setzero_ps();
            transpose16f(r);  /* r[j]: channel c0 + j at positions e .. e + 15 */
            for (int64_t j = 0; j < nc; j++) {
                const int64_t ch = c0 + j;
                const int64_t oa = i * c * l + ch * l + e, ow = ch * n * l + i * l + e;
                const __m512i ia = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)((uint64_t)oa)), lane);
                const __m512i iw = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)((uint64_t)ow)), lane);
                if (codes_a != NULL)
                    _mm_mask_storeu_epi8(codes_a + oa, kp, codes16(r[j], vda, ia, vseed_a, sr_a, vemax_a));
                _mm_mask_storeu_epi8(codes_w + ow, kp,
                                     codes16(r[j], _mm512_set1_ps(dw[ch * dw_stride]), iw, vseed_w, sr_w, vemax_w));
            }
        }
    }
}

/* ---- the convolution epilogue: channels-last accumulator -> NCHW product ----------------
 * out[n, c, p] = (float(acc[n, p, c]) * sa[n * sa_stride]) * sb[c * sb_stride] (+ bias[c]),
 * the reference's int8_epilogue (acc.to(float32) * a_scale * b_scale + bias, float32,
 * left to right), written transposed: acc (n, p, c) row-major (int32, or float32 holding
 * exact integers: oneDNN's convolution), out (n, c, p) row-major float32, or with
 * out_bf16 bfloat16: each float32 value rounded to nearest even as torch's cast
 * (c10::round_to_nearest_even; a NaN becomes 0x7FC0). */

/* 16 floats -> 16 bfloat16 bit patterns, round to nearest even (AVX-512F only). */
VEC __m256i bf16_rne(__m512 v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}

VEC void store_out(void *out, int out_bf16, int64_t at, __mmask16 k, __m512 v) {
    if (out_bf16) _mm256_mask_storeu_epi16((uint16_t *)out + at, k, bf16_rne(v));
    else _mm512_mask_storeu_ps((float *)out + at, k, v);
}


/* r[i] (16 rows of 16 floats) -> r[j] = column j. */
static inline void transpose16f(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {  /* r[4i + j], 128-bit lane k: column 4k + j of rows 4i..4i+3 */
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
    }
    for (int j = 0; j < 4; j++) t[j] = r[j], t[4 + j] = r[4 + j], t[8 + j] = r[8 + j], t[12 + j] = r[12 + j];
    for (int j = 0; j < 4; j++) {
        const __m512 ab_lo = _mm512_shuffle_f32x4(t[j], t[4 + j], 0x44), ab_hi = _mm512_shuffle_f32x4(t[j], t[4 + j], 0xEE);
        const __m512 cd_lo = _mm512_shuffle_f32x4(t[8 + j], t[12 + j], 0x44), cd_hi = _mm512_shuffle_f32x4(t[8 + j], t[12 + j], 0xEE);
        r[j] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0x88);
        r[4 + j] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0xDD);
        r[8 + j] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0x88);
        r[12 + j] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0xDD);
    }
}

void lowbit_epilogue_nchw(const void *acc, int acc_int, int64_t n, int64_t p, int64_t c, const float *sa,
                          int64_t sa_stride, const float *sb, int64_t sb_stride, const float *bias, void *out,
                          int out_bf16, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t i = 0; i < n; i++) {
        for (int64_t p0 = 0; p0 < p; p0 += 16) {
            const __m512 va = _mm512_set1_ps(sa[i * sa_stride]);
            const int64_t np = p - p0 < 16 ? p - p0 : 16;
            const __mmask16 kp = tail_mask(np);
            __m512 r[16];
            for (int64_t c0 = 0; c0 < c; c0 += 16) {
                const __mmask16 kc = tail_mask(c - c0);
                const int64_t nc = c - c0 < 16 ? c - c0 : 16;
                const __m512 vb = sb_stride ? _mm512_maskz_loadu_ps(kc, sb + c0) : _mm512_set1_ps(sb[0]);
                const __m512 vbias = bias ? _mm512_maskz_loadu_ps(kc, bias + c0) : _mm512_setzero_ps();
                for (int64_t j = 0; j < 16; j++) {
                    if (j >= np) { r[j] = _mm512_setzero_ps(); continue; }
                    const int64_t off = (i * p + p0 + j) * c + c0;
                    __m512 v = acc_int ? _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(kc, (const int32_t *)acc + off))
                                       : _mm512_maskz_loadu_ps(kc, (const float *)acc + off);
                    v = _mm512_mul_ps(_mm512_mul_ps(v, va), vb);
                    r[j] = bias ? _mm512_add_ps(v, vbias) : v;
                }
                transpose16f(r);
                for (int64_t j = 0; j < nc; j++)
                    store_out(out, out_bf16, (i * c + c0 + j) * p + p0, kp, r[j]);
            }
        }
    }
}

/* The same product written channels-last: out[n, p, c] (row-major, the accumulator's
 * own layout; a float32 out may be acc itself when acc is float32: each element is read
 * before it is written). */
void lowbit_epilogue_nhwc(const void *acc, int acc_int, int64_t n, int64_t p, int64_t c, const float *sa,
                          int64_t sa_stride, const float *sb, int64_t sb_stride, const float *bias, void *out,
                          int out_bf16, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t i = 0; i < n; i++) {
        for (int64_t q = 0; q < p; q++) {
            const __m512 va = _mm512_set1_ps(sa[i * sa_stride]);
            const int64_t row = (i * p + q) * c;
            for (int64_t c0 = 0; c0 < c; c0 += 16) {
                const __mmask16 kc = tail_mask(c - c0);
                const __m512 vb = sb_stride ? _mm512_maskz_loadu_ps(kc, sb + c0) : _mm512_set1_ps(sb[0]);
                __m512 v = acc_int ? _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(kc, (const int32_t *)acc + row + c0))
                                   : _mm512_maskz_loadu_ps(kc, (const float *)acc + row + c0);
                v = _mm512_mul_ps(_mm512_mul_ps(v, va), vb);
                if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(kc, bias + c0));
                store_out(out, out_bf16, row + c0, kc, v);
            }
        }
    }
}

/* ---- int8 codes NCHW -> channels-last, placed --------------------------------------------
 * dst[n, h, w, c] (bytes at dst + n*dn + h*dh + w*dw + c) = src[n, c, h, w] XOR flip, src
 * the contiguous (N, C, H, W) int8 codes: lowbit.kernels.im2col.place_codes without the
 * zeroing (the caller fills what the source does not cover). 16 positions x 16 channels
 * per tile: 16 loads of 16 bytes, a register transpose (4 rounds of unpacks), 16 stores.
 * flip = 0x80 writes code + 128 as uint8 (what oneDNN's u8 convolution reads). */
static inline void transpose16x16_u8(__m128i r[16]) {
    __m128i b[16], c[16], d[16];
    for (int k = 0; k < 8; k++) {
        b[2 * k] = _mm_unpacklo_epi8(r[2 * k], r[2 * k + 1]);
        b[2 * k + 1] = _mm_unpackhi_epi8(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 16; k += 4) {
        c[k] = _mm_unpacklo_epi16(b[k], b[k + 2]);
        c[k + 1] = _mm_unpackhi_epi16(b[k], b[k + 2]);
        c[k + 2] = _mm_unpacklo_epi16(b[k + 1], b[k + 3]);
        c[k + 3] = _mm_unpackhi_epi16(b[k + 1], b[k + 3]);
    }
    for (int k = 0; k < 16; k += 8) {
        for (int m = 0; m < 4; m++) {
            d[k + 2 * m] = _mm_unpacklo_epi32(c[k + m], c[k + m + 4]);
            d[k + 2 * m + 1] = _mm_unpackhi_epi32(c[k + m], c[k + m + 4]);
        }
    }
    for (int m = 0; m < 8; m++) {
        r[2 * m] = _mm_unpacklo_epi64(d[m], d[m + 8]);
        r[2 * m + 1] = _mm_unpackhi_epi64(d[m], d[m + 8]);
    }
}

void lowbit_place_nhwc(const uint8_t *src, int64_t n, int64_t c, int64_t h, int64_t w, uint8_t *dst,
                       int64_t dn, int64_t dh, int64_t dw, int flip, int threads) {
    const int64_t p = h * w;
    const __m128i vx = _mm_set1_epi8((char)flip);
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t i = 0; i < n; i++) {
        for (int64_t p0 = 0; p0 < p; p0 += 16) {
            const int64_t np = p - p0 < 16 ? p - p0 : 16;
            const __mmask16 kp = tail_mask(np);
            uint8_t *rows[16];
            int64_t hh = p0 / w, ww = p0 % w;  /* one division per tile, then steps */
            for (int64_t j = 0; j < np; j++) {
                rows[j] = dst + i * dn + hh * dh + ww * dw;
                if (++ww == w) { ww = 0; hh++; }
            }
            for (int64_t c0 = 0; c0 < c; c0 += 16) {
                const int64_t nc = c - c0 < 16 ? c - c0 : 16;
                const __mmask16 kc = tail_mask(nc);
                __m128i r[16];
                for (int64_t k = 0; k < 16; k++)
                    r[k] = k < nc ? _mm_xor_si128(_mm_maskz_loadu_epi8(kp, src + (i * c + c0 + k) * p + p0), vx)
                                  : _mm_setzero_si128();
                transpose16x16_u8(r);
                for (int64_t j = 0; j < np; j++)
                    _mm_mask_storeu_epi8(rows[j] + c0, kc, r[j]);
            }
        }
    }
}

/* ---- grid steps ---------------------------------------------------------------------------
 * step[i] = lowbit.formats.grid_step(amax[i], qmax) for float32 (its _grid_step_f32, bit for
 * bit: the float64 product a * (1/q_hi) rounded to float32, then the smallest of that float's
 * neighbours k = -1, 0 (else +1) whose float64 product with q_hi reaches a; NaN passed on),
 * and div[i] = step[i], or 1 where amax[i] == 0 (the quantizer's divisor). q_hi = qmax +
 * ulp(qmax)/2, inv = 1 / q_hi (both computed by the caller in float64). tensor: one step for
 * the maximum of all n (NaN if any is NaN, as torch.amax). */
static inline float grid_step1(float a32, double q_hi, double inv) {
    if (a32 != a32) return a32;
    const double a = (double)a32;
    const float r = (float)(a * inv);
    uint32_t bits;
    memcpy(&bits, &r, 4);
    float best, c;
    uint32_t u = bits + 1u;
    memcpy(&best, &u, 4);
    for (int k = 0; k >= -1; k--) {
        u = bits + (uint32_t)k;
        memcpy(&c, &u, 4);
        if ((double)c * q_hi >= a) best = c;
    }
    return best;
}

void lowbit_grid_steps(const float *amax, int64_t n, int tensor, double q_hi, double inv, float *step,
                       float *div) {
    if (tensor) {
        float m = -INFINITY;
        for (int64_t i = 0; i < n; i++) {
            if (amax[i] != amax[i]) { m = amax[i]; break; }
            if (amax[i] > m) m = amax[i];
        }
        step[0] = grid_step1(m, q_hi, inv);
        div[0] = m == 0.0f ? 1.0f : step[0];
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        step[i] = grid_step1(amax[i], q_hi, inv);
        div[i] = amax[i] == 0.0f ? 1.0f : step[i];
    }
}

/* dots[c0 .. c0 + width) (width <= 64) = the sum over the rows members[mb .. me)
 * (ascending) of w[r] * x[r, band] (each product rounded, added to a sum from +0:
 * lowbit_bhq_group_sums' order and arithmetic), in four registers, stored once. */
static inline void group_sums64(const void *x, int dtype, int64_t ld, const float *w, const int64_t *mb,
                                const int64_t *me, int64_t c0, int64_t width, float *dots) {
    const __mmask16 k0 = tail_mask(width), k1 = width > 16 ? tail_mask(width - 16) : 0,
                    k2 = width > 32 ? tail_mask(width - 32) : 0, k3 = width > 48 ? tail_mask(width - 48) : 0;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (const int64_t *m = mb; m < me; m++) {
        const int64_t o = *m * ld + c0;
        const __m512 wr = _mm512_set1_ps(w[*m]);
        a0 = _mm512_add_ps(a0, _mm512_mul_ps(load16(x, o, k0, dtype), wr));
        a1 = _mm512_add_ps(a1, _mm512_mul_ps(load16(x, o + 16, k1, dtype), wr));
        a2 = _mm512_add_ps(a2, _mm512_mul_ps(load16(x, o + 32, k2, dtype), wr));
        a3 = _mm512_add_ps(a3, _mm512_mul_ps(load16(x, o + 48, k3, dtype), wr));
    }
    _mm512_mask_storeu_ps(dots + c0, k0, a0);
    _mm512_mask_storeu_ps(dots + c0 + 16, k1, a1);
    _mm512_mask_storeu_ps(dots + c0 + 32, k2, a2);
    _mm512_mask_storeu_ps(dots + c0 + 48, k3, a3);
}

/* BHQ's pair, group by group: ∇X's codes of T x's rows and ∇W's column ranges of x, from
 * one read of x (each group's rows are read again from cache). Per group j (rows
 * members[crow[j] : crow[j + 1]], ascending): its sums dots = sum of w[r] * x[r, :]
 * (lowbit_bhq_group_sums' order and arithmetic, in registers 64 columns at a time:
 * group_sums64, into a row of scratch), then for each of its rows T x = x * s[r] - v2[r] *
 * dots (transform16's arithmetic, kept in a second row of scratch), its absmax
 * (row_absmax's), its step and divisor (lowbit_grid_steps' per-row ones: grid_step1), its
 * codes from the kept T x (lowbit_bhq_quantize_rows': element index r * cols + c, seed,
 * sr, emax) into codes (rows, cols) and its step into step[r]; and camax[c] = max |x[:, c]|
 * (NaN where the column holds one; lowbit_pair_absmax's; camax NULL: not wanted, BHQ's
 * rows alone) or, with entry_rows > 0 (rows a batch of entries of entry_rows rows:
 * attention's), camax[e * cols + c] = max |x[e * entry_rows : (e + 1) * entry_rows, c]|,
 * each entry's own (lowbit_pair_absmax's batch). scratch: threads * (2 + E) * cols floats,
 * E the entries (1 without). Bit for bit what bhq_group_sums,
 * bhq_absmax, the steps and bhq_quantize_rows, then pair_absmax's columns give. (Until
 * 2026-12-06 the sums were added in the scratch row, a load and a store per product, and
 * T x computed twice: 1.2x the time, docs/benchmarks.md "BHQ's sums in registers…".) */
void lowbit_bhq_group_quantize(const void *x, int dtype, int64_t rows, int64_t cols, int64_t ld, const float *s,
                               const float *w, const float *v2, const int64_t *crow, const int64_t *members,
                               int64_t n_groups, double q_hi, double inv, uint32_t seed, int sr, float emax,
                               int8_t *codes, float *step, float *camax, int64_t entry_rows, float *scratch,
                               int threads) {
    const __m512i lane = _mm512_loadu_si512(LANES), vseed = _mm512_set1_epi32((int)seed);
    const __m512 vemax = _mm512_set1_ps(emax);
    const int64_t ncm = (entry_rows > 0 ? rows / entry_rows : 1) * cols, per = 2 * cols + ncm;
#pragma omp parallel num_threads(threads)
    {
        const int tid = THREAD_NUM(), nt = NUM_THREADS();
        float *dots = scratch + (int64_t)tid * per, *tx = dots + cols, *cm0 = tx + cols;
        if (camax) memset(cm0, 0, (size_t)ncm * sizeof(float));
#pragma omp for schedule(guided)
        for (int64_t j = 0; j < n_groups; j++) {
            const int64_t *mb = members + crow[j], *me = members + crow[j + 1];
            for (int64_t c0 = 0; c0 < cols; c0 += 64) {
                if (cols - c0 >= 64)  /* (a constant width: the masks fold away) */
                    group_sums64(x, dtype, ld, w, mb, me, c0, 64, dots);
                else
                    group_sums64(x, dtype, ld, w, mb, me, c0, cols - c0, dots);
            }
            for (const int64_t *m = mb; m < me; m++) {
                const int64_t r = *m;
                float *cm = cm0 + (entry_rows > 0 ? r / entry_rows * cols : 0);  /* the row's entry's */
                const __m512 vs = _mm512_set1_ps(s[r]), vv = _mm512_set1_ps(v2[r]);
                __m512 mx = _mm512_setzero_ps();
                __mmask16 nan = 0;
                for (int64_t c = 0; c < cols; c += 16) {
                    const __mmask16 k = tail_mask(cols - c);
                    const __m512 xv = load16(x, r * ld + c, k, dtype);
                    const __m512 tv = householder16(xv, vs, vv, dots + c, k);
                    _mm512_mask_storeu_ps(tx + c, k, tv);
                    const __m512 t = _mm512_maskz_mov_ps(k, _mm512_abs_ps(tv));
                    mx = _mm512_max_ps(mx, t);
                    nan |= _mm512_cmp_ps_mask(t, t, _CMP_UNORD_Q);
                    if (camax) {                                                        /* x's column ranges */
                        const __m512 a = _mm512_abs_ps(xv);
                        column_max16(cm + c, a, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), k);
                    }
                }
                const float amax = nan ? NAN : _mm512_reduce_max_ps(mx);
                const float st = grid_step1(amax, q_hi, inv);
                step[r] = st;
                const __m512 vd = _mm512_set1_ps(amax == 0.0f ? 1.0f : st);
                const uint32_t base = (uint32_t)((uint64_t)r * (uint64_t)cols);
                for (int64_t c = 0; c < cols; c += 16) {
                    const __mmask16 k = tail_mask(cols - c);
                    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)(base + (uint32_t)c)), lane);
                    _mm_mask_storeu_epi8(codes + r * cols + c, k,
                                         codes16(_mm512_maskz_loadu_ps(k, tx + c), vd, idx, vseed, sr, vemax));
                }
            }
        }
        /* the implicit barrier of the loop above: every thread's column maxima are final */
        if (camax) merge_column_max(scratch + 2 * cols, per, nt, ncm * tid / nt, ncm * (tid + 1) / nt, camax);
    }
}

/* ---- row-major epilogue, in place ----------------------------------------------------------
 * acc (rows, n) int32 -> float32 over the same bytes: (float(acc) * sa) * sb (+ bias), each an
 * IEEE float32 operation in the reference's order (lowbit.kernels.reference.int8_epilogue
 * without offsets, then finish). sa: per row (sa_rows) or one value; sb: per column, of entry
 * r / m at sb + (r / m) * sb_bstride (sb_cols), or one value; bias: NULL or (n,) float32. */
void lowbit_epilogue_rows(int32_t *acc, int64_t rows, int64_t m, int64_t n, const float *sa, int sa_rows,
                          const float *sb, int sb_cols, int64_t sb_bstride, const float *bias, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const __m512 va = _mm512_set1_ps(sa[sa_rows ? r : 0]);
        const float *sbr = sb_cols ? sb + (r / m) * sb_bstride : NULL;
        const __m512 vb = _mm512_set1_ps(sb[0]);
        int32_t *row = acc + r * n;
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 k = tail_mask(n - j);
            __m512 v = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(k, row + j));
            v = _mm512_mul_ps(_mm512_mul_ps(v, va), sbr ? _mm512_maskz_loadu_ps(k, sbr + j) : vb);
            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias + j));
            _mm512_mask_storeu_ps((float *)row + j, k, v);
        }
    }
}

/* ---- the randomized block Hadamard transform (lowbit.quantizers.hadamard) --------------------
 * T x = H D x on blocks of b consecutive rows (b a power of two <= HAD_MAX_B; rows >= n are
 * zero): each row times m[r] = s_r * c (s_r = +-1, c = float32(1/sqrt(b)): an exact sign flip
 * of one IEEE product), then the butterflies for h = 1, 2, ..., b/2: rows j, j + h of each
 * 2h-row group -> (u_j + u_{j+h}, u_j - u_{j+h}), IEEE float32 additions in the order of the
 * reference (lowbit.quantizers.hadamard.fwht): bit for bit its values. The inverse
 * T^-1 y = D H y: y times c, the butterflies, then the sign. The reference transforms in
 * float64 when a block's largest magnitude (NaN if it holds a NaN) is above huge or in
 * (0, tiny); the functions return 1 then (their output is not the reference's), and the
 * caller runs the reference.
 *
 * Memory: a block's b rows sit at one power-of-two stride apart, so the 16-column tiles of
 * all b rows map to one L1 set and evict each other. Each block is therefore first read
 * eight rows at a time (eight sequential streams) into a per-thread buffer of 16-column
 * tiles (tile t, row i at buf[t * (b + 1) + i]: the padding spreads a row's tiles over the
 * sets), the butterflies run on each tile there, and the result leaves row by row again
 * (the codes, or the inverse's rows). The buffer (b x cols floats: 1 MB at 64 x 4096)
 * stays in L2. */
#define HAD_MAX_B 256
/* The inverse's tasks: a block's rows times at most HAD_CHUNK columns (the columns are
 * transformed each on its own), so a task's tile buffer stays in L2 at any width: (128,
 * 12544) 0.86 -> 0.48 ms. Whether a block is wide is then decided on the whole block first
 * (had_any_wide: a chunk alone may look wide where its block is not, a review); the
 * quantizer's rows need all their columns (their range) and take whole rows. */
#define HAD_CHUNK 1024

/* The butterflies of stages h = 1, 2, .., 2^(S-1) on the 2^S vectors v (registers): the
 * stages h0, 2 h0, .. of rows j + k h0 (k < 2^S) of a tile, since a stage's butterflies
 * each take the same two values whatever the order they run in (bit for bit fwht's). */
#define BFLY(v, p, q)                        \
    do {                                     \
        const __m512 a_ = v[p], c_ = v[q];   \
        v[p] = _mm512_add_ps(a_, c_);        \
        v[q] = _mm512_sub_ps(a_, c_);        \
    } while (0)
static inline __attribute__((always_inline)) void fwht_regs(__m512 *v, int s) {
    if (s >= 1) {  /* h = 1 */
        BFLY(v, 0, 1);
        if (s >= 2) { BFLY(v, 2, 3); }
        if (s >= 3) { BFLY(v, 4, 5); BFLY(v, 6, 7); }
    }
    if (s >= 2) {  /* h = 2 */
        BFLY(v, 0, 2); BFLY(v, 1, 3);
        if (s >= 3) { BFLY(v, 4, 6); BFLY(v, 5, 7); }
    }
    if (s >= 3) {  /* h = 4 */
        BFLY(v, 0, 4); BFLY(v, 1, 5); BFLY(v, 2, 6); BFLY(v, 3, 7);
    }
}

/* stages h0, 2 h0, .., h0 * 2^(s-1) on the tile u of b vectors: 2^s rows at a time in registers */
static inline __attribute__((always_inline)) void fwht_chunk(__m512 *u, int64_t b, int64_t h0, int s) {
    const int64_t span = h0 << s;
    for (int64_t base = 0; base < b; base += span)
        for (int64_t j = base; j < base + h0; j++) {
            __m512 v[8];
            for (int k = 0; k < 1 << s; k++) v[k] = u[j + k * h0];
            fwht_regs(v, s);
            for (int k = 0; k < 1 << s; k++) u[j + k * h0] = v[k];
        }
}

/* the butterflies' stages h = h0, .., b/2 on the tile u of b vectors (b, h0 powers of two),
 * three at a time (a pass over the tile for three stages instead of one each) */
static void fwht_rest(__m512 *u, int64_t b, int64_t h0) {
    while (h0 < b) {
        if (b >= h0 << 3) {
            fwht_chunk(u, b, h0, 3);
            h0 <<= 3;
        } else if (b >= h0 << 2) {
            fwht_chunk(u, b, h0, 2);
            h0 <<= 2;
        } else {
            fwht_chunk(u, b, h0, 1);
            h0 <<= 1;
        }
    }
}

/* Rows r0 + i0 .. r0 + i0 + 2^S - 1 of a block (had_block's arguments) into buf, with the
 * first S stages of the butterflies (h = 1 .. 2^(S-1)) done in registers tile by tile. */
static inline __attribute__((always_inline)) void had_rows(const void *x, int dtype, int64_t n, int64_t ld,
                                                           int64_t cols, int64_t r, int s, const float *mul,
                                                           float c, __m512 *buf, int64_t ts, float *cm0,
                                                           int64_t entry_rows, __m512 *mx, __mmask16 *nan) {
    const int64_t tiles = (cols + 15) / 16, g = 1 << s;
    __m512 f[8];
    float *cm[8];
    for (int k = 0; k < g; k++) {
        f[k] = _mm512_set1_ps(mul ? mul[r + k] : c);
        cm[k] = cm0 && r + k < n ? cm0 + (entry_rows > 0 ? (r + k) / entry_rows * cols : 0) : NULL;
    }
    /* the group's rows all real and of one entry: their column maxima joined in registers
     * first, one update of cm per tile (NaN kept: a lane NaN in any row is NaN) */
    float *joint = cm[0] && cm[g - 1] == cm[0] ? cm[0] : NULL;
    const __m512 qnan = _mm512_set1_ps(NAN);
    for (int64_t t = 0; t < tiles; t++) {
        const __mmask16 km = tail_mask(cols - 16 * t);
        __m512 v[8], ja = _mm512_setzero_ps();
        __mmask16 jn = 0;
        for (int k = 0; k < g; k++) {
            const __m512 u = r + k < n ? load16(x, (r + k) * ld + 16 * t, km, dtype) : _mm512_setzero_ps();
            const __m512 a = _mm512_abs_ps(u);
            const __mmask16 an = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
            *nan |= an;
            *mx = _mm512_max_ps(*mx, a);
            v[k] = _mm512_mul_ps(u, f[k]);
            if (joint) {
                ja = _mm512_max_ps(ja, a);
                jn |= an;
            } else if (cm[k]) {
                column_max16(cm[k] + 16 * t, a, an, km);
            }
        }
        if (joint) column_max16(joint + 16 * t, _mm512_mask_mov_ps(ja, jn, qnan), jn, km);
        fwht_regs(v, s);
        for (int k = 0; k < g; k++) buf[t * ts + k] = v[k];
    }
}

/* Whether a block whose elements' absolute values have maximum lanes mx (nan: lanes that saw a
 * NaN) is wide (module comment): its largest magnitude above huge or in (0, tiny); a block
 * with a NaN is not (its amax is NaN: no comparison holds). */
VEC int had_wide(__m512 mx, __mmask16 nan, float huge, float tiny) {
    if (nan) return 0;
    const float m = _mm512_reduce_max_ps(mx);
    return m > huge || (m > 0.0f && m < tiny);
}

/* Block b rows from row r0 of x (n rows of type dtype, row stride ld; rows >= n zero) into
 * buf, each element times mul[r] (mul NULL: times c), then the butterflies on every tile:
 * the first three stages on each 8 rows in registers as they are read (8 row streams), the
 * others three at a time per tile (fwht_rest; until 2026-12-06 one pass over the tile per
 * stage: 1.6x the time, docs/benchmarks.md "Hadamard's pair…").
 * cm0 (NULL: not wanted): x's column maxima as read, cm0[e * cols + c] = max(.., |x[r, c]|)
 * keeping NaN (column_max16), e = r / entry_rows (0 where entry_rows is 0), rows < n only.
 * Returns whether the block is wide (module comment). */
static int had_block(const void *x, int dtype, int64_t n, int64_t ld, int64_t cols, int64_t r0, int64_t b,
                     const float *mul, float c, float huge, float tiny, __m512 *buf, float *cm0,
                     int64_t entry_rows) {
    const int64_t tiles = (cols + 15) / 16, ts = b + 1;
    const int s = b >= 8 ? 3 : b == 4 ? 2 : b == 2 ? 1 : 0;
    __m512 mx = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t i0 = 0; i0 < b; i0 += (int64_t)1 << s) {
        if (s == 3)  /* (constant group sizes: the loops over the group unroll into registers) */
            had_rows(x, dtype, n, ld, cols, r0 + i0, 3, mul, c, buf + i0, ts, cm0, entry_rows, &mx, &nan);
        else if (s == 2)
            had_rows(x, dtype, n, ld, cols, r0 + i0, 2, mul, c, buf + i0, ts, cm0, entry_rows, &mx, &nan);
        else if (s == 1)
            had_rows(x, dtype, n, ld, cols, r0 + i0, 1, mul, c, buf + i0, ts, cm0, entry_rows, &mx, &nan);
        else
            had_rows(x, dtype, n, ld, cols, r0 + i0, 0, mul, c, buf + i0, ts, cm0, entry_rows, &mx, &nan);
    }
    if (b > 8)
        for (int64_t t = 0; t < tiles; t++) fwht_rest(buf + t * ts, b, 8);
    return had_wide(mx, nan, huge, tiny);
}

/* What a caller does with a transformed block (rows r0 .. r0 + b - 1, columns c0 .. c0 + cols - 1
 * of the operand, tiles in buf). */
typedef void (*HadEmit)(const void *ctx, int64_t r0, int64_t b, int64_t c0, int64_t cols, const __m512 *buf);

/* Every block of b rows of x (rows, a multiple of b) through had_block and emit, the blocks
 * spread over the threads, each thread with its own tile buffer; with chunk > 0 (and no
 * camax) each task is a block's rows times at most chunk columns, emit told the first
 * column c0 of its cols, and the wide flag returned is then a chunk's, not its block's
 * (lowbit_had_inverse decides on whole blocks first). camax (NULL: not wanted):
 * x's column maxima (had_block's cm0: ncm = (entry_rows > 0 ? n / entry_rows : 1) * cols of
 * them, NaN where a column holds one), each thread's kept in scratch (threads * ncm floats)
 * and merged after the last block. Returns had_block's wide flag over all blocks, or -1 if a
 * buffer could not be allocated. */
static int had_blocks(const void *x, int dtype, int64_t n, int64_t rows, int64_t cols, int64_t ld, int64_t b,
                      const float *mul, float c, float huge, float tiny, HadEmit emit, const void *ctx,
                      float *camax, int64_t entry_rows, float *scratch, int64_t chunk, int threads) {
    int wide = 0, oom = 0;
    const int64_t ncm = (entry_rows > 0 ? n / entry_rows : 1) * cols;
    const int64_t w = chunk > 0 && !camax && chunk < cols ? chunk : cols, nch = (cols + w - 1) / w;
    const size_t es = dtype == F32 ? 4 : 2;  /* bytes per element */
#pragma omp parallel num_threads(threads) reduction(| : wide, oom)
    {
        const int tid = THREAD_NUM(), nt = NUM_THREADS();
        float *cm = camax ? scratch + (int64_t)tid * ncm : NULL;
        if (cm) memset(cm, 0, (size_t)ncm * sizeof(float));
        __m512 *buf = (__m512 *)aligned_alloc(64, (size_t)((w + 15) / 16) * (size_t)(b + 1) * sizeof(__m512));
        if (!buf) oom = 1;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < rows / b * nch; task++) {
            if (!buf) continue;
            const int64_t r0 = task / nch * b, c0 = task % nch * w, cw = cols - c0 < w ? cols - c0 : w;
            wide |= had_block((const char *)x + (size_t)c0 * es, dtype, n, ld, cw, r0, b, mul, c, huge, tiny, buf, cm,
                              entry_rows);
            emit(ctx, r0, b, c0, cw, buf);
        }
        /* the implicit barrier of the loop above: every thread's column maxima are final */
        if (camax) merge_column_max(scratch, ncm, nt, ncm * tid / nt, ncm * (tid + 1) / nt, camax);
        free(buf);
    }
    return oom ? -1 : wide;
}

typedef struct {
    double q_hi, inv;
    uint32_t seed;
    int sr;
    float emax;
    float *step;
    int8_t *codes;
} HadCodes;

/* each row's step (grid_steps' arithmetic) and codes from the block's tiles */
static void had_emit_codes(const void *ctx, int64_t r0, int64_t b, int64_t c0, int64_t cols, const __m512 *buf) {
    (void)c0;  /* (whole rows: a row's range needs every column) */
    const HadCodes *q = (const HadCodes *)ctx;
    const __m512i lane = _mm512_loadu_si512(LANES), vseed = _mm512_set1_epi32((int)q->seed);
    const __m512 vemax = _mm512_set1_ps(q->emax);
    const int64_t tiles = (cols + 15) / 16, ts = b + 1;
    for (int64_t i = 0; i < b; i++) {
        const int64_t r = r0 + i;
        __m512 mx = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int64_t t = 0; t < tiles; t++) {
            const __m512 a = _mm512_maskz_mov_ps(tail_mask(cols - 16 * t), _mm512_abs_ps(buf[t * ts + i]));
            mx = _mm512_max_ps(mx, a);
            nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
        }
        const float amax = nan ? NAN : _mm512_reduce_max_ps(mx);
        q->step[r] = grid_step1(amax, q->q_hi, q->inv);
        const __m512 vd = _mm512_set1_ps(amax == 0.0f ? 1.0f : q->step[r]);
        const uint32_t base = (uint32_t)((uint64_t)r * (uint64_t)cols);
        for (int64_t t = 0; t < tiles; t++) {
            const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)(base + (uint32_t)(16 * t))), lane);
            _mm_mask_storeu_epi8(q->codes + r * cols + 16 * t, tail_mask(cols - 16 * t),
                                 codes16(buf[t * ts + i], vd, idx, vseed, q->sr, vemax));
        }
    }
}

/* codes (rows, cols) row-major of T x, x (n, cols) with row stride ld, rows a multiple of b,
 * and each row's step (grid_steps' arithmetic, q_hi and inv as there) into step (rows);
 * stochastic rounding (sr) with the element indices of the (rows, cols) shape. camax (NULL:
 * not wanted; then entry_rows and scratch unused): x's column maxima from the same read,
 * camax[c] = max |x[:, c]| (NaN where the column holds one; lowbit_pair_absmax's) or, with
 * entry_rows > 0 (n a batch of entries of entry_rows rows: attention's), each entry's,
 * camax[e * cols + c] = max |x[e * entry_rows : (e + 1) * entry_rows, c]|; scratch: threads *
 * that many floats. Returns 1 where a block is wide (the codes and steps are then not the
 * reference's; camax is), -1 if out of memory. */
int lowbit_had_quantize(const void *x, int dtype, int64_t n, int64_t rows, int64_t cols, int64_t ld, int64_t b,
                        const float *m, float huge, float tiny, double q_hi, double inv, uint32_t seed, int sr,
                        float emax, float *step, int8_t *codes, float *camax, int64_t entry_rows, float *scratch,
                        int threads) {
    const HadCodes q = {q_hi, inv, seed, sr, emax, step, codes};
    return had_blocks(x, dtype, n, rows, cols, ld, b, m, 0.0f, huge, tiny, had_emit_codes, &q, camax, entry_rows,
                      scratch, 0, threads);
}

typedef struct {
    const float *s;
    float *out;
    int64_t n_out, ldo;
} HadRowsOut;

/* the block's rows below n_out, each times its sign */
static void had_emit_rows(const void *ctx, int64_t r0, int64_t b, int64_t c0, int64_t cols, const __m512 *buf) {
    const HadRowsOut *o = (const HadRowsOut *)ctx;
    const int64_t tiles = (cols + 15) / 16, ts = b + 1;
    for (int64_t i = 0; i < b && r0 + i < o->n_out; i++) {
        const __m512 vs = _mm512_set1_ps(o->s[r0 + i]);
        float *row = o->out + (r0 + i) * o->ldo + c0;
        for (int64_t t = 0; t < tiles; t++)
            _mm512_mask_storeu_ps(row + 16 * t, tail_mask(cols - 16 * t), _mm512_mul_ps(buf[t * ts + i], vs));
    }
}

/* out (rows, cols), row stride ldo, = T x: x (n, cols) of type dtype with row stride ld, rows
 * a multiple of b (rows >= n zero), each row times m[r], the butterflies; ones (rows) all 1
 * (the rows' final factor: exact). Returns 1 where a block is wide, -1 if out of memory. */
int lowbit_had_forward(const void *x, int dtype, int64_t n, int64_t rows, int64_t cols, int64_t ld, int64_t b,
                       const float *m, const float *ones, float huge, float tiny, float *out, int64_t ldo,
                       int threads) {
    const HadRowsOut o = {ones, out, rows, ldo};
    return had_blocks(x, dtype, n, rows, cols, ld, b, m, 0.0f, huge, tiny, had_emit_rows, &o, NULL, 0, NULL,
                      0, threads);
}

/* Whether a block of b rows of y (rows, cols) float32, row stride ldy, is wide (had_wide), the
 * blocks spread over the threads: one read of y, nothing written. */
static int had_any_wide(const float *y, int64_t rows, int64_t cols, int64_t ldy, int64_t b, float huge,
                        float tiny, int threads) {
    int wide = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : wide)
    for (int64_t r0 = 0; r0 < rows; r0 += b) {
        __m512 mx = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int64_t r = r0; r < r0 + b; r++)
            for (int64_t c = 0; c < cols; c += 16) {
                const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(cols - c), y + r * ldy + c));
                nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
                mx = _mm512_max_ps(mx, a);
            }
        wide |= had_wide(mx, nan, huge, tiny);
    }
    return wide;
}

/* out[r, :] = (T^-1 y)[r, :] for r < n_out: y (rows, cols) float32 (rows a multiple of b, row
 * stride ldy), each row times c, the butterflies, then times s[r] (+-1); out (n_out, cols),
 * row stride ldo: another tensor's memory, or y's own (out == y, ldo == ldy: in place — a
 * task's rows are all read before they are written — after a first read that finds no
 * block wide, so that y is left as it was where one is; that read also decides for rows
 * wider than HAD_CHUNK, whose tasks are column chunks). Returns 1 where a block of y is
 * wide (out is then not the reference's; in place, nothing is written), -1 if out of
 * memory. (In place takes 0.6x the time of a separate output, whose lines are not in
 * cache: docs/benchmarks.md "Hadamard's pair…".) */
int lowbit_had_inverse(const float *y, int64_t rows, int64_t cols, int64_t ldy, int64_t b, float c,
                       const float *s, float huge, float tiny, float *out, int64_t n_out, int64_t ldo,
                       int threads) {
    const HadRowsOut o = {s, out, n_out, ldo};
    if (out != y && cols <= HAD_CHUNK)  /* whole rows: each task's wide flag is its block's */
        return had_blocks(y, F32, rows, rows, cols, ldy, b, NULL, c, huge, tiny, had_emit_rows, &o, NULL, 0, NULL,
                          0, threads);
    /* (a read more than the kernel itself needs: out of place on rows past a chunk ≈ +10%,
     * 0.58 -> 0.65 ms at 128 x 12544; in place it is what keeps y intact where a block is wide) */
    if (had_any_wide(y, rows, cols, ldy, b, huge, tiny, threads)) return 1;
    const int status = had_blocks(y, F32, rows, rows, cols, ldy, b, NULL, c, huge, tiny, had_emit_rows, &o, NULL, 0,
                                  NULL, HAD_CHUNK, threads);
    return status < 0 ? status : 0;  /* (no block is wide; a chunk's own flag is not its block's) */
}

/* ---- channels-last to NCHW rows ---------------------------------------------------------------
 * r[q] (16 rows of 16 floats) replaced by its transpose: r[q][k] <- r[k][q]. Unpacks pair rows'
 * elements, then their pairs, then 128-bit lanes twice. */
static inline void transpose16_ps(__m512 *r) {
    __m512 t[16];
    for (int q = 0; q < 16; q += 2) {
        t[q] = _mm512_unpacklo_ps(r[q], r[q + 1]);
        t[q + 1] = _mm512_unpackhi_ps(r[q], r[q + 1]);
    }
    for (int q = 0; q < 16; q += 4) {
        r[q] = _mm512_shuffle_ps(t[q], t[q + 2], 0x44);
        r[q + 1] = _mm512_shuffle_ps(t[q], t[q + 2], 0xEE);
        r[q + 2] = _mm512_shuffle_ps(t[q + 1], t[q + 3], 0x44);
        r[q + 3] = _mm512_shuffle_ps(t[q + 1], t[q + 3], 0xEE);
    }
    for (int q = 0; q < 4; q++) {
        t[q] = _mm512_shuffle_f32x4(r[q], r[q + 4], 0x88);
        t[q + 4] = _mm512_shuffle_f32x4(r[q], r[q + 4], 0xDD);
        t[q + 8] = _mm512_shuffle_f32x4(r[q + 8], r[q + 12], 0x88);
        t[q + 12] = _mm512_shuffle_f32x4(r[q + 8], r[q + 12], 0xDD);
    }
    for (int q = 0; q < 8; q++) {
        r[q] = _mm512_shuffle_f32x4(t[q], t[q + 8], 0x88);
        r[q + 8] = _mm512_shuffle_f32x4(t[q], t[q + 8], 0xDD);
    }
}

/* out (n, c * l) row-major, out[i, j * l + p] = x's element (i, j, p) of a (n, c, l) float32
 * operand with its channels innermost (at x[i * sn + p * c + j]: a channels-last ∇Y): each
 * sample's (l, c) matrix transposed in 16 x 16 tiles in registers — the copy a reshape of
 * channels-last memory into NCHW rows makes (torch's strided copy: 6x a plain copy's time). */
void lowbit_cl_rows(const float *x, int64_t n, int64_t c, int64_t l, int64_t sn, float *out, int threads) {
    const int64_t tc = (c + 15) / 16, tl = (l + 15) / 16, tasks = n * tl * tc;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t i = task / (tl * tc), rem = task % (tl * tc), p0 = rem / tc * 16, j0 = rem % tc * 16;
        const int64_t np = l - p0 < 16 ? l - p0 : 16, nj = c - j0 < 16 ? c - j0 : 16;
        const __mmask16 kj = tail_mask(nj), kp = tail_mask(np);
        const float *src = x + i * sn + p0 * c + j0;
        __m512 r[16];
        for (int64_t q = 0; q < 16; q++) r[q] = q < np ? _mm512_maskz_loadu_ps(kj, src + q * c) : _mm512_setzero_ps();
        transpose16_ps(r);
        float *dst = out + i * c * l + j0 * l + p0;
        for (int64_t q = 0; q < nj; q++) _mm512_mask_storeu_ps(dst + q * l, kp, r[q]);
    }
}

/* ---- dequantization: out = (float)code * scale (lowbit.kernels.encoded.dequantize's
 * arithmetic for int8 codes and float32 scales, no offset or block scales: the int8 -> float32
 * conversion is exact, then one IEEE multiply) ---------------------------------------------
 * codes and out dense, rows x cols in memory order; scale per row (per_row) or one. */
void lowbit_dequantize_rows(const int8_t *codes, int64_t rows, int64_t cols, const float *scale, int per_row,
                            float *out, int threads) {
    const int64_t per = rows > 0 ? (cols + 15) / 16 : 0, tasks = rows * per;
#pragma omp parallel for num_threads(threads) schedule(static) if (tasks > 1024)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t r = t / per, c = (t % per) * 16;
        const __mmask16 k = tail_mask(cols - c);
        const __m512 s = _mm512_set1_ps(scale[per_row ? r : 0]);
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, codes + r * cols + c)));
        _mm512_mask_storeu_ps(out + r * cols + c, k, _mm512_mul_ps(v, s));
    }
}
