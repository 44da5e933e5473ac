/* Attention's row softmax fused with the scores' epilogue, and its backward, AVX-512.
 *
 * lowbit_attention_softmax: for each row r = (entry b, query i) of B*L rows of S scores,
 *
 *   x_j = float(acc[r, j]) * sa[r] * sb[b, j]   (int32 acc; (acc*sa)*sb as the epilogue)
 *       = in[r, j]                              (float32 input: no steps)
 *   x_j = x_j + mask[b, i, j]                   (where a mask is given)
 *   P_j = exp(x_j - max_j x_j) * (1 / sum_j exp(x_j - max_j x_j))
 *
 * written over the input (float32 over the int32 of the same size: each 16-lane vector is
 * read before it is written). `masked`: a row whose x are all -inf gets zeros (what
 * lowbit.attention.masked_softmax gives), else NaN as torch.softmax. A NaN anywhere in a
 * row makes the whole row NaN, as torch.softmax. exp is a Cephes-style polynomial on a
 * Cody-Waite reduction (within 2 ulp of the correctly rounded value for x <= 0; exp of
 * x < -104 is 0 as in float32): the values equal torch.softmax's to float rounding, not
 * bit for bit (its exp and its summation order differ).
 *
 * lowbit_attention_softmax_grad: dS_j = P_j * (g_j - sum_k g_k P_k), g_j the epilogue of
 * acc as above (or the float input), written over P (torch._softmax_backward_data's
 * formula, to float rounding).
 *
 * Built without -ffast-math and with -ffp-contract=off; the fused multiply-adds are the
 * explicit ones of exp16.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

/* exp(x) for 16 lanes: x = n ln2 + r, |r| <= ln2/2, exp(r) by Cephes' degree-5 minimax
 * polynomial, times 2^n by scalef (overflow to inf, gradual underflow to 0). -inf and
 * x < -104 give 0; NaN stays NaN (an unordered compare is false: not zeroed). */
static inline __m512 exp16(__m512 x) {
    /* lanes below -104 (a masked score: -inf) are computed as exp(0) and then zeroed:
     * clamping them to -104 instead would make scalef produce denormals, which cost a
     * microcode assist per vector (measured: 8x slower on a causal mask) */
    const __mmask16 zero = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.0f), _CMP_LT_OQ);
    x = _mm512_mask_blend_ps(zero, x, _mm512_setzero_ps());
    x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_scalef_ps((__mmask16)~zero, y, n);
}

/* the 16 scores of row r at column j0 (k: the lanes in the row) */
static inline __m512 load_scores(const void *in, int in_int, int64_t off, __mmask16 k, __m512 va,
                                 const float *sb, __m512 vb, int64_t j0) {
    if (!in_int) return _mm512_maskz_loadu_ps(k, (const float *)in + off);
    const __m512 v = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(k, (const int32_t *)in + off));
    return _mm512_mul_ps(_mm512_mul_ps(v, va), sb ? _mm512_maskz_loadu_ps(k, sb + j0) : vb);
}

/* sa: per row (sa_stride 1) or one value (0); sb: per (entry, column) at sb + b*sb_bstride
 * when sb_cols, else one value sb[0]; mask: NULL, or row i of entry b at
 * mask + moff[b] + i*mrow (moff NULL: offset 0), contiguous along j. */
void lowbit_attention_softmax(void *in, int in_int, int64_t batch, int64_t l, int64_t s, const float *sa,
                              int64_t sa_stride, const float *sb, int sb_cols, int64_t sb_bstride,
                              const float *mask, const int64_t *moff, int64_t mrow, int masked, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < batch * l; r++) {
        const int64_t b = r / l, i = r % l;
        float *out = (float *)in + r * s;
        const __m512 va = in_int ? _mm512_set1_ps(sa[r * sa_stride]) : _mm512_setzero_ps();
        const float *sbr = (in_int && sb_cols) ? sb + b * sb_bstride : NULL;
        const __m512 vb1 = (in_int && !sb_cols) ? _mm512_set1_ps(sb[0]) : _mm512_setzero_ps();
        const float *mr = mask ? mask + (moff ? moff[b] : 0) + i * mrow : NULL;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        __mmask16 nan = 0;
        for (int64_t j = 0; j < s; j += 16) {
            const __mmask16 k = tail_mask(s - j);
            __m512 x = load_scores(in, in_int, r * s + j, k, va, sbr, vb1, j);
            if (mr) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(k, mr + j));
            nan |= _mm512_mask_cmp_ps_mask(k, x, x, _CMP_UNORD_Q);
            vmax = _mm512_mask_max_ps(vmax, k, vmax, x);
            _mm512_mask_storeu_ps(out + j, k, x);
        }
        float m = nan ? NAN : _mm512_reduce_max_ps(vmax);
        if (masked && m == -INFINITY) {  /* every key masked: zeros */
            for (int64_t j = 0; j < s; j += 16) _mm512_mask_storeu_ps(out + j, tail_mask(s - j), _mm512_setzero_ps());
            continue;
        }
        const __m512 vm = _mm512_set1_ps(m);
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t j = 0; j < s; j += 16) {
            const __mmask16 k = tail_mask(s - j);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, out + j), vm));
            vsum = _mm512_mask_add_ps(vsum, k, vsum, e);
            _mm512_mask_storeu_ps(out + j, k, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
        for (int64_t j = 0; j < s; j += 16) {
            const __mmask16 k = tail_mask(s - j);
            _mm512_mask_storeu_ps(out + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, out + j), inv));
        }
    }
}

void lowbit_attention_softmax_grad(const void *in, int in_int, int64_t batch, int64_t l, int64_t s,
                                   const float *sa, int64_t sa_stride, const float *sb, int sb_cols,
                                   int64_t sb_bstride, float *p, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < batch * l; r++) {
        const int64_t b = r / l;
        float *pr = p + r * s;
        const __m512 va = in_int ? _mm512_set1_ps(sa[r * sa_stride]) : _mm512_setzero_ps();
        const float *sbr = (in_int && sb_cols) ? sb + b * sb_bstride : NULL;
        const __m512 vb1 = (in_int && !sb_cols) ? _mm512_set1_ps(sb[0]) : _mm512_setzero_ps();
        __m512 vdot = _mm512_setzero_ps();
        for (int64_t j = 0; j < s; j += 16) {
            const __mmask16 k = tail_mask(s - j);
            const __m512 g = load_scores(in, in_int, r * s + j, k, va, sbr, vb1, j);
            vdot = _mm512_mask_add_ps(vdot, k, vdot, _mm512_mul_ps(g, _mm512_maskz_loadu_ps(k, pr + j)));
        }
        const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(vdot));
        for (int64_t j = 0; j < s; j += 16) {
            const __mmask16 k = tail_mask(s - j);
            const __m512 g = load_scores(in, in_int, r * s + j, k, va, sbr, vb1, j);
            _mm512_mask_storeu_ps(pr + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, pr + j), _mm512_sub_ps(g, dot)));
        }
    }
}
