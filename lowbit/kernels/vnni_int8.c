/* lowbit's batched int8 x int8 -> int32 GEMM on AVX-512 VNNI (lowbit/kernels/vnni.py).

   VPDPBUSD multiplies unsigned by signed bytes, four at a time, into int32 lanes. The left
   operand's codes a are stored as a + 128 (u8, one XOR), so each lane sums (a + 128)·b; the
   product is that minus 128·colsum(b), colsum taken from the packed panel by VPDPBUSD with
   ones. VPDPBUSD, the shift and the subtraction all wrap modulo 2^32, so the result is the
   exact sum whenever that fits in int32 (K·128² < 2^31: checked by the caller), even where
   the offset sum itself passes int32's range.
   Right operand: panels of NR = 32 columns, four k's interleaved per int32 lane, zero past
   K and N. Register block: MR = 8 rows x 32 columns (16 accumulators). Batch entries are
   spread over the threads (one packing slice each). Full 64-byte-aligned blocks of a large
   result (stream != 0) are written with streaming stores: attention's score-sized
   products are written once and read later by another pass, and a plain store would first
   read every line it fills. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP  /* built without OpenMP where the compiler has none: one thread */
#include <omp.h>
#define THREAD_NUM() omp_get_thread_num()
#else
#define THREAD_NUM() 0
#endif

#define NR 32
#define MR 8

/* B (K x N, strides sbk, sbn) -> panels of NR columns, 4 k's interleaved: bp[nb][kq][NR][4]; zeros past K, N.
   cs[n] = sum_k B[k][n] (from the packed panel, by VPDPBUSD with ones) */
static void pack_b(const int8_t *b, int64_t K, int64_t N, int64_t sbk, int64_t sbn, int8_t *bp,
                   int32_t *cs, int64_t Kq, int64_t NB) {
    const __m128i z = _mm_setzero_si128();
    for (int64_t nb = 0; nb < NB; nb++) {
        int8_t *panel = bp + nb * Kq * NR * 4;
        const int64_t n0 = nb * NR, cols = N - n0 < NR ? N - n0 : NR;
        if (sbn == 1 && cols == NR) {
            for (int64_t q = 0; q < Kq; q++) {
                const int64_t k = 4 * q;
                for (int h = 0; h < 2; h++) {
                    const int8_t *src = b + n0 + 16 * h;
                    __m128i r0 = k < K ? _mm_loadu_si128((const __m128i *)(src + k * sbk)) : z;
                    __m128i r1 = k + 1 < K ? _mm_loadu_si128((const __m128i *)(src + (k + 1) * sbk)) : z;
                    __m128i r2 = k + 2 < K ? _mm_loadu_si128((const __m128i *)(src + (k + 2) * sbk)) : z;
                    __m128i r3 = k + 3 < K ? _mm_loadu_si128((const __m128i *)(src + (k + 3) * sbk)) : z;
                    __m128i t0 = _mm_unpacklo_epi8(r0, r1), t1 = _mm_unpackhi_epi8(r0, r1);
                    __m128i t2 = _mm_unpacklo_epi8(r2, r3), t3 = _mm_unpackhi_epi8(r2, r3);
                    __m128i *dst = (__m128i *)(panel + (q * NR + 16 * h) * 4);
                    _mm_storeu_si128(dst + 0, _mm_unpacklo_epi16(t0, t2));
                    _mm_storeu_si128(dst + 1, _mm_unpackhi_epi16(t0, t2));
                    _mm_storeu_si128(dst + 2, _mm_unpacklo_epi16(t1, t3));
                    _mm_storeu_si128(dst + 3, _mm_unpackhi_epi16(t1, t3));
                }
            }
        } else if (sbk == 1 && K % 4 == 0) {
            for (int64_t q = 0; q < Kq; q++) {
                int32_t *dst = (int32_t *)(panel + q * NR * 4);
                int64_t j = 0;
                for (; j < cols; j++) memcpy(dst + j, b + (n0 + j) * sbn + 4 * q, 4);
                for (; j < NR; j++) dst[j] = 0;
            }
        } else {
            for (int64_t q = 0; q < Kq; q++)
                for (int64_t j = 0; j < NR; j++)
                    for (int64_t t = 0; t < 4; t++) {
                        const int64_t k = 4 * q + t;
                        panel[(q * NR + j) * 4 + t] = (k < K && j < cols) ? b[k * sbk + (n0 + j) * sbn] : 0;
                    }
        }
        const __m512i ones = _mm512_set1_epi8(1);
        __m512i s0 = _mm512_setzero_si512(), s1 = s0;
        for (int64_t q = 0; q < Kq; q++) {
            s0 = _mm512_dpbusd_epi32(s0, ones, _mm512_loadu_si512(panel + q * 128));
            s1 = _mm512_dpbusd_epi32(s1, ones, _mm512_loadu_si512(panel + q * 128 + 64));
        }
        _mm512_storeu_si512(cs + nb * NR, s0);
        _mm512_storeu_si512(cs + nb * NR + 16, s1);
    }
}

/* A (M x K, strides sam, sak) -> u8 rows of Kq*4 bytes (a + 128), zeros past K and M */
static void pack_a(const int8_t *a, int64_t M, int64_t K, int64_t sam, int64_t sak, uint8_t *ap,
                   int64_t Mp, int64_t Kq) {
    const int64_t L = Kq * 4;
    for (int64_t m = 0; m < Mp; m++) {
        uint8_t *dst = ap + m * L;
        if (m >= M) { memset(dst, 0, (size_t)L); continue; }
        const int8_t *src = a + m * sam;
        if (sak == 1) {
            int64_t k = 0;
            const __m512i x80 = _mm512_set1_epi8((char)0x80);
            for (; k + 64 <= K; k += 64)
                _mm512_storeu_si512(dst + k, _mm512_xor_si512(_mm512_loadu_si512(src + k), x80));
            for (; k < K; k++) dst[k] = (uint8_t)(src[k] ^ 0x80);
        } else {
            for (int64_t k = 0; k < K; k++) dst[k] = (uint8_t)(src[k * sak] ^ 0x80);
        }
        for (int64_t k = K; k < L; k++) dst[k] = 0;
    }
}

static inline int32_t load4(const uint8_t *p) {  /* four bytes as one int32, no aliasing */
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline void block(const uint8_t *a, int64_t lda, const int8_t *bp, int64_t Kq,
                         const int32_t *cs, int32_t *c, int64_t ldc, int rows, int cols, int stream) {
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
            c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00,
            c70 = c00, c71 = c00;
    for (int64_t q = 0; q < Kq; q++) {
        const __m512i b0 = _mm512_loadu_si512(bp + q * 128), b1 = _mm512_loadu_si512(bp + q * 128 + 64);
        const uint8_t *ak = a + q * 4;
        __m512i x;
#define ROW(r, e0, e1) x = _mm512_set1_epi32(load4(ak + (r) * lda)); \
        e0 = _mm512_dpbusd_epi32(e0, x, b0); e1 = _mm512_dpbusd_epi32(e1, x, b1);
        ROW(0, c00, c01) ROW(1, c10, c11) ROW(2, c20, c21) ROW(3, c30, c31)
        ROW(4, c40, c41) ROW(5, c50, c51) ROW(6, c60, c61) ROW(7, c70, c71)
#undef ROW
    }
    const __m512i k0 = _mm512_slli_epi32(_mm512_loadu_si512(cs), 7),
                  k1 = _mm512_slli_epi32(_mm512_loadu_si512(cs + 16), 7);
    const __mmask16 m0 = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1);
    const __mmask16 m1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
    __m512i r0[8] = {c00, c10, c20, c30, c40, c50, c60, c70};
    __m512i r1[8] = {c01, c11, c21, c31, c41, c51, c61, c71};
    if (stream && cols == NR && ((uintptr_t)c & 63) == 0 && ((ldc * 4) & 63) == 0) {
        for (int r = 0; r < rows; r++) {  /* a full, aligned block: streaming stores (no read for ownership) */
            _mm512_stream_si512((__m512i *)(c + r * ldc), _mm512_sub_epi32(r0[r], k0));
            _mm512_stream_si512((__m512i *)(c + r * ldc + 16), _mm512_sub_epi32(r1[r], k1));
        }
        return;
    }
    for (int r = 0; r < rows; r++) {
        _mm512_mask_storeu_epi32(c + r * ldc, m0, _mm512_sub_epi32(r0[r], k0));
        _mm512_mask_storeu_epi32(c + r * ldc + 16, m1, _mm512_sub_epi32(r1[r], k1));
    }
}

static void one(const int8_t *a, int64_t sam, int64_t sak, const int8_t *b, int64_t sbk, int64_t sbn,
                int64_t M, int64_t K, int64_t N, int32_t *c, int64_t ldc, uint8_t *ap, int8_t *bp,
                int32_t *cs, int stream) {
    const int64_t Kq = (K + 3) / 4, NB = (N + NR - 1) / NR, Mp = (M + MR - 1) / MR * MR;
    pack_b(b, K, N, sbk, sbn, bp, cs, Kq, NB);
    pack_a(a, M, K, sam, sak, ap, Mp, Kq);
    const int64_t lda = Kq * 4;
    for (int64_t m = 0; m < M; m += MR)
        for (int64_t nb = 0; nb < NB; nb++) {
            const int cols = (int)(N - nb * NR < NR ? N - nb * NR : NR);
            block(ap + m * lda, lda, bp + nb * Kq * NR * 4, Kq, cs + nb * NR, c + m * ldc + nb * NR, ldc,
                  (int)(M - m < MR ? M - m : MR), cols, stream);
        }
}

void lowbit_vnni_int_bmm(int64_t batch, const int8_t *A, int64_t sab, int64_t sam, int64_t sak,
                         const int8_t *B, int64_t sbb, int64_t sbk, int64_t sbn, int64_t M, int64_t K,
                         int64_t N, int32_t *C, int64_t scb, int64_t ldc, uint8_t *Ap, int8_t *Bp,
                         int32_t *CS, int stream, int threads) {
    const int64_t Kq = (K + 3) / 4, NB = (N + NR - 1) / NR, Mp = (M + MR - 1) / MR * MR;
#pragma omp parallel num_threads(threads)
    {
        const int t = THREAD_NUM();
        uint8_t *ap = Ap + (int64_t)t * Mp * Kq * 4;
        int8_t *bp = Bp + (int64_t)t * NB * Kq * NR * 4;
        int32_t *cs = CS + (int64_t)t * NB * NR;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < batch; i++)
            one(A + i * sab, sam, sak, B + i * sbb, sbk, sbn, M, K, N, C + i * scb, ldc, ap, bp, cs, stream);
        _mm_sfence();
    }
}
