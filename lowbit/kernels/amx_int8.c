/* int8 x int8 -> int32 GEMM on Intel AMX (AMX-TILE + AMX-INT8), for lowbit.kernels.amx.
 *
 * C (M, N) int32 = A (M, K) int8 @ B (K, N) int8, exact (two's-complement int32 sums:
 * the same wrap-free result as torch._int_mm while K * 128^2 < 2^31, which the caller
 * checks). A and B may have any strides (in elements = bytes); C is written with row
 * stride ldc (in int32 elements).
 *
 * Method (Intel SDM vol. 1 ch. 18 "Intel AMX"; TDPBSSD: signed x signed bytes, int32
 * accumulate): B is first packed into the VNNI layout TDPBSSD reads -- for each block of
 * 16 columns, rows of 64 bytes holding 4 consecutive k of each of the 16 columns -- with
 * K padded by zeros to a multiple of 64 and N to a multiple of 16. A is read in place
 * when it is row-major with K a multiple of 64 and M a multiple of 16 (tiles of 16 rows
 * x 64 bytes, row stride lda); otherwise it is first copied row-major, zero-padded. Each
 * 32 x 32 block of C is four accumulator tiles (2 x 2), summed over K in steps of 64
 * with two A tiles and two B tiles (fewer at a 16-row or 16-column edge). Blocks that
 * reach past M or N are stored to a local buffer and copied. Threads (OpenMP) split the
 * (256-column panel, 32-row block) pairs, or K when there are fewer pairs than threads;
 * each thread configures its own tiles (tile state is per thread) and releases them.
 *
 * Zero padding adds exact zeros, so the sums are those of the unpadded operands.
 */
#include <immintrin.h>
#ifdef _OPENMP  /* built without OpenMP where the compiler has none: one thread */
#include <omp.h>
#define THREAD_NUM() omp_get_thread_num()
#else
#define THREAD_NUM() 0
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define PANEL_BLOCKS 8 /* 32-column blocks per panel: 256 columns */

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Ask the kernel for the AMX tile-data state (Linux >= 5.16). 1 on success. */
int lowbit_amx_request(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

static void configure(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* Bp[nb][kk][j][r] = B[4 kk + r, 16 nb + j] (0 outside K x N); nb < Np/16, kk < Kp/4. */
static void pack_b(const int8_t *B, int64_t K, int64_t N, int64_t sk, int64_t sn,
                   int8_t *Bp, int64_t Kp, int64_t Np, int threads) {
    const int64_t KK = Kp / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nb = 0; nb < Np / 16; nb++) {
        int8_t *dst = Bp + nb * KK * 64;
        for (int64_t j = 0; j < 16; j++) {
            const int64_t n = nb * 16 + j;
            if (n >= N) {
                for (int64_t kk = 0; kk < KK; kk++) memset(dst + kk * 64 + j * 4, 0, 4);
                continue;
            }
            const int8_t *col = B + n * sn;
            int64_t kk = 0;
            if (sk == 1) { /* 4 consecutive k of one column are 4 consecutive bytes */
                for (; 4 * kk + 3 < K; kk++) memcpy(dst + kk * 64 + j * 4, col + 4 * kk, 4);
            }
            for (; kk < KK; kk++)
                for (int64_t r = 0; r < 4; r++) {
                    const int64_t k = 4 * kk + r;
                    dst[kk * 64 + j * 4 + r] = k < K ? col[k * sk] : 0;
                }
        }
    }
}

/* Row-major B (sn == 1): the same packing from 4 rows of 16 bytes at a time, interleaved
 * byte-wise then pair-wise (SSE2 unpack) into the 64-byte VNNI row; tails bytewise. */
static void pack_b_rows(const int8_t *B, int64_t K, int64_t N, int64_t sk,
                        int8_t *Bp, int64_t Kp, int64_t Np, int threads) {
    const int64_t KK = Kp / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nb = 0; nb < Np / 16; nb++) {
        int8_t *dst = Bp + nb * KK * 64;
        const int64_t n0 = nb * 16;
        const int64_t w = N - n0 >= 16 ? 16 : (N - n0 > 0 ? N - n0 : 0);
        for (int64_t kk = 0; kk < KK; kk++) {
            int8_t *d = dst + kk * 64;
            if (w == 16 && 4 * kk + 3 < K) {
                const int8_t *r = B + 4 * kk * sk + n0;
                const __m128i r0 = _mm_loadu_si128((const __m128i *)r);
                const __m128i r1 = _mm_loadu_si128((const __m128i *)(r + sk));
                const __m128i r2 = _mm_loadu_si128((const __m128i *)(r + 2 * sk));
                const __m128i r3 = _mm_loadu_si128((const __m128i *)(r + 3 * sk));
                const __m128i t01l = _mm_unpacklo_epi8(r0, r1), t01h = _mm_unpackhi_epi8(r0, r1);
                const __m128i t23l = _mm_unpacklo_epi8(r2, r3), t23h = _mm_unpackhi_epi8(r2, r3);
                _mm_storeu_si128((__m128i *)d, _mm_unpacklo_epi16(t01l, t23l));
                _mm_storeu_si128((__m128i *)(d + 16), _mm_unpackhi_epi16(t01l, t23l));
                _mm_storeu_si128((__m128i *)(d + 32), _mm_unpacklo_epi16(t01h, t23h));
                _mm_storeu_si128((__m128i *)(d + 48), _mm_unpackhi_epi16(t01h, t23h));
                continue;
            }
            memset(d, 0, 64);
            for (int64_t r = 0; r < 4; r++) {
                const int64_t k = 4 * kk + r;
                if (k >= K) continue;
                const int8_t *row = B + k * sk + n0;
                for (int64_t j = 0; j < w; j++) d[j * 4 + r] = row[j];
            }
        }
    }
}

/* dst[j * ds + i] = src[i * ss + j] for i, j < 16: a 16 x 16 byte transpose in four
 * rounds of SSE2 unpacks (bytes, pairs, quads, octets). */
static inline void transpose16(const int8_t *src, int64_t ss, int8_t *dst, int64_t ds) {
    __m128i r[16], l1[8], h1[8], q[4][4], o[2][8];
    for (int i = 0; i < 16; i++) r[i] = _mm_loadu_si128((const __m128i *)(src + i * ss));
    for (int g = 0; g < 8; g++) {
        l1[g] = _mm_unpacklo_epi8(r[2 * g], r[2 * g + 1]);
        h1[g] = _mm_unpackhi_epi8(r[2 * g], r[2 * g + 1]);
    }
    for (int t = 0; t < 4; t++) { /* rows 4t..4t+3; columns 0-3, 4-7, 8-11, 12-15 */
        q[t][0] = _mm_unpacklo_epi16(l1[2 * t], l1[2 * t + 1]);
        q[t][1] = _mm_unpackhi_epi16(l1[2 * t], l1[2 * t + 1]);
        q[t][2] = _mm_unpacklo_epi16(h1[2 * t], h1[2 * t + 1]);
        q[t][3] = _mm_unpackhi_epi16(h1[2 * t], h1[2 * t + 1]);
    }
    for (int e = 0; e < 2; e++) /* rows 8e..8e+7; column pairs */
        for (int c = 0; c < 4; c++) {
            o[e][2 * c] = _mm_unpacklo_epi32(q[2 * e][c], q[2 * e + 1][c]);
            o[e][2 * c + 1] = _mm_unpackhi_epi32(q[2 * e][c], q[2 * e + 1][c]);
        }
    for (int p = 0; p < 8; p++) {
        _mm_storeu_si128((__m128i *)(dst + (2 * p) * ds), _mm_unpacklo_epi64(o[0][p], o[1][p]));
        _mm_storeu_si128((__m128i *)(dst + (2 * p + 1) * ds), _mm_unpackhi_epi64(o[0][p], o[1][p]));
    }
}

/* Ap (Mp, Kp) row-major = A zero-padded. A column-major source (sm == 1: the transposed
 * view of a row-major (K, M) array) is transposed in 16 x 16 byte blocks; any other
 * strides are copied element by element. */
static void pack_a(const int8_t *A, int64_t M, int64_t K, int64_t sm, int64_t sk,
                   int8_t *Ap, int64_t Mp, int64_t Kp, int threads) {
    if (sk == 1) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t m = 0; m < Mp; m++) {
            int8_t *d = Ap + m * Kp;
            if (m >= M) {
                memset(d, 0, Kp);
                continue;
            }
            memcpy(d, A + m * sm, K);
            memset(d + K, 0, Kp - K);
        }
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m0 = 0; m0 < Mp; m0 += 64) { /* 64 x 64 blocks: whole cache lines read */
        const int64_t m1 = m0 + 64 < Mp ? m0 + 64 : Mp;
        for (int64_t m = m0; m < m1; m++)
            if (m >= M) memset(Ap + m * Kp, 0, Kp);
        for (int64_t k0 = 0; k0 < Kp; k0 += 64)
            for (int64_t kk = k0; kk < k0 + 64; kk += 16)
                for (int64_t mm = m0; mm < m1 && mm < M; mm += 16) {
                    if (sm == 1 && mm + 16 <= M && kk + 16 <= K) {
                        transpose16(A + kk * sk + mm, sk, Ap + mm * Kp + kk, Kp);
                        continue;
                    }
                    for (int64_t m = mm; m < mm + 16 && m < M; m++)
                        for (int64_t k = kk; k < kk + 16; k++)
                            Ap[m * Kp + k] = k < K ? A[m * sm + k * sk] : 0;
                }
    }
}

static void store_block(int t, int32_t *C, int64_t ldc, int64_t m0, int64_t n0, int64_t M,
                        int64_t N, int32_t *buf) {
    (void)t;
    const int64_t rows = M - m0 < 16 ? M - m0 : 16;
    const int64_t cols = N - n0 < 16 ? N - n0 : 16;
    for (int64_t i = 0; i < rows; i++) memcpy(C + (m0 + i) * ldc + n0, buf + i * 16, cols * 4);
}

#define STORE(T, DM, DN)                                                                   \
    do {                                                                                   \
        const int64_t mm = m0 + (DM), nn = n0 + (DN);                                      \
        if (mm + 16 <= M && nn + 16 <= N) {                                                \
            _tile_stored(T, C + mm * ldc + nn, ldc * 4);                                   \
        } else if (mm < M && nn < N) {                                                     \
            _tile_stored(T, buf, 64);                                                      \
            store_block(T, C, ldc, mm, nn, M, N, buf);                                     \
        }                                                                                  \
    } while (0)

/* One block of C: rows m0.. (16, or 32 if two_m), columns n0.. (16, or 32 if two_n),
 * summed over k in [k0, k1) (multiples of 64). a0: A's row m0, row stride lda; b0: the
 * packed 16-column block of n0, the next one kstride bytes on. */
static inline void run_block(const int8_t *a0, int64_t lda, const int8_t *b0, int64_t kstride,
                             int two_m, int two_n, int64_t k0, int64_t k1, int32_t *C,
                             int64_t ldc, int64_t m0, int64_t n0, int64_t M, int64_t N,
                             int32_t *buf) {
    const int8_t *a1 = a0 + 16 * lda, *b1 = b0 + kstride;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    if (two_m && two_n) {
        for (int64_t k = k0; k < k1; k += 64) {
            _tile_loadd(4, a0 + k, lda);
            _tile_loadd(5, a1 + k, lda);
            _tile_loadd(6, b0 + k * 16, 64);
            _tile_loadd(7, b1 + k * 16, 64);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(1, 4, 7);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
        }
    } else if (two_n) {
        for (int64_t k = k0; k < k1; k += 64) {
            _tile_loadd(4, a0 + k, lda);
            _tile_loadd(6, b0 + k * 16, 64);
            _tile_loadd(7, b1 + k * 16, 64);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(1, 4, 7);
        }
    } else if (two_m) {
        for (int64_t k = k0; k < k1; k += 64) {
            _tile_loadd(4, a0 + k, lda);
            _tile_loadd(5, a1 + k, lda);
            _tile_loadd(6, b0 + k * 16, 64);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(2, 5, 6);
        }
    } else {
        for (int64_t k = k0; k < k1; k += 64) {
            _tile_loadd(4, a0 + k, lda);
            _tile_loadd(6, b0 + k * 16, 64);
            _tile_dpbssd(0, 4, 6);
        }
    }
    STORE(0, 0, 0); /* tiles not computed lie outside M or N: STORE skips them */
    STORE(1, 0, 16);
    STORE(2, 16, 0);
    STORE(3, 16, 16);
}

/* All blocks of C (ldc) in the 32-row blocks [mb0, mb1) and panels [p0, p1), over k in
 * [k0, k1). */
static void run_blocks(const int8_t *a, int64_t lda, const int8_t *Bp, int64_t KK, int64_t Mp,
                       int64_t Np, int64_t p, int64_t mb, int64_t k0, int64_t k1, int32_t *C,
                       int64_t ldc, int64_t M, int64_t N, int32_t *buf) {
    const int64_t NB = (Np + 31) / 32, m0 = mb * 32;
    const int64_t nb_end = (p + 1) * PANEL_BLOCKS < NB ? (p + 1) * PANEL_BLOCKS : NB;
    for (int64_t nb = p * PANEL_BLOCKS; nb < nb_end; nb++) {
        const int64_t n0 = nb * 32;
        run_block(a + m0 * lda, lda, Bp + (2 * nb) * KK * 64, KK * 64, m0 + 16 < Mp, n0 + 16 < Np,
                  k0, k1, C, ldc, m0, n0, M, N, buf);
    }
}

/* Every block of C over the whole K, threads splitting the (panel, 32-row block) pairs. */
static void run_all(const int8_t *a, int64_t lda, const int8_t *Bp, int64_t Kp, int64_t Mp,
                    int64_t Np, int32_t *C, int64_t ldc, int64_t M, int64_t N, int threads) {
    const int64_t KK = Kp / 4, MB = (Mp + 31) / 32, NB = (Np + 31) / 32;
    const int64_t panels = (NB + PANEL_BLOCKS - 1) / PANEL_BLOCKS;
#pragma omp parallel num_threads(threads)
    {
        configure();
        int32_t buf[16 * 16];
#pragma omp for collapse(2) schedule(static)
        for (int64_t p = 0; p < panels; p++)
            for (int64_t mb = 0; mb < MB; mb++)
                run_blocks(a, lda, Bp, KK, Mp, Np, p, mb, 0, Kp, C, ldc, M, N, buf);
        _tile_release();
    }
}

/* Bp (Np*Kp bytes: K rounded up to 64, N to 16) = B packed into the VNNI layout (pack_b, or
 * pack_b_rows for a row-major B). */
void lowbit_amx_pack_b(const int8_t *B, int64_t sbk, int64_t sbn, int64_t K, int64_t N,
                       int8_t *Bp, int threads) {
    const int64_t Kp = (K + 63) / 64 * 64, Np = (N + 15) / 16 * 16;
    if (sbn == 1 && sbk != 1)
        pack_b_rows(B, K, N, sbk, Bp, Kp, Np, threads);
    else
        pack_b(B, K, N, sbk, sbn, Bp, Kp, Np, threads);
}

/* C = A @ B. Bp: workspace of Np*Kp bytes, Ap: of Mp*Kp bytes (Kp = K rounded up to 64,
 * Mp and Np = M and N rounded up to 16); Ap is used unless A is row-major with
 * K % 64 == 0 and M % 16 == 0. Threads split the (panel, 32-row block) pairs; where
 * there are fewer pairs than threads (a few rows and columns, a long K: a convolution's
 * weight gradient), they split K instead, each summing into its own int32 copy of C,
 * and the copies are added.
 * b_packed != 0: Bp already holds lowbit_amx_pack_b's packing of this B (K x N), which
 * is then not read (the row panels of one product share one packing). */
void lowbit_amx_int_mm(const int8_t *A, int64_t sam, int64_t sak, const int8_t *B,
                       int64_t sbk, int64_t sbn, int64_t M, int64_t K, int64_t N, int32_t *C,
                       int64_t ldc, int8_t *Bp, int8_t *Ap, int threads, int b_packed) {
    const int64_t Kp = (K + 63) / 64 * 64, Np = (N + 15) / 16 * 16, Mp = (M + 15) / 16 * 16;
    if (!b_packed)
        lowbit_amx_pack_b(B, sbk, sbn, K, N, Bp, threads);
    const int8_t *a = A;
    int64_t lda = sam;
    if (!(sak == 1 && K == Kp && M == Mp)) {
        pack_a(A, M, K, sam, sak, Ap, Mp, Kp, threads);
        a = Ap;
        lda = Kp;
    }
    const int64_t KK = Kp / 4, MB = (Mp + 31) / 32, NB = (Np + 31) / 32, KC = Kp / 64;
    const int64_t panels = (NB + PANEL_BLOCKS - 1) / PANEL_BLOCKS;
    const int64_t split = panels * MB < threads && KC > 1 ? (threads < KC ? threads : KC) : 1;
    if (split == 1) {
        run_all(a, lda, Bp, Kp, Mp, Np, C, ldc, M, N, threads);
        return;
    }
    int32_t *parts = (int32_t *)malloc((size_t)(split * M * N) * sizeof(int32_t));
    if (parts == NULL) { /* no memory for the split: the same sums, one block per thread */
        run_all(a, lda, Bp, Kp, Mp, Np, C, ldc, M, N, threads);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t s = 0; s < split; s++) {
        int32_t buf[16 * 16];
        configure();
        for (int64_t p = 0; p < panels; p++)
            for (int64_t mb = 0; mb < MB; mb++)
                run_blocks(a, lda, Bp, KK, Mp, Np, p, mb, KC * s / split * 64,
                           KC * (s + 1) / split * 64, parts + s * M * N, N, M, N, buf);
        _tile_release();
    }
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            int32_t sum = 0;
            for (int64_t s = 0; s < split; s++) sum += parts[s * M * N + i * N + j];
            C[i * ldc + j] = sum;
        }
    free(parts);
}

/* C[i] = A[i] @ B[i] for i < batch (a batch of small products: attention's heads), each
 * as lowbit_amx_int_mm computes it. Threads split the entries; each packs its entry's
 * operands into its own slice of Bp (Np*Kp bytes per thread) and Ap (Mp*Kp bytes per
 * thread) and runs its blocks alone. Strides in elements; sab, sbb, scb between entries. */
void lowbit_amx_int_bmm(int64_t batch, const int8_t *A, int64_t sab, int64_t sam, int64_t sak,
                        const int8_t *B, int64_t sbb, int64_t sbk, int64_t sbn, int64_t M,
                        int64_t K, int64_t N, int32_t *C, int64_t scb, int64_t ldc, int8_t *Bp,
                        int8_t *Ap, int threads) {
    const int64_t Kp = (K + 63) / 64 * 64, Np = (N + 15) / 16 * 16, Mp = (M + 15) / 16 * 16;
    const int64_t KK = Kp / 4, MB = (Mp + 31) / 32, NB = (Np + 31) / 32;
    const int64_t panels = (NB + PANEL_BLOCKS - 1) / PANEL_BLOCKS;
    const int direct = sak == 1 && K == Kp && M == Mp;
#pragma omp parallel num_threads(threads)
    {
        const int t = THREAD_NUM();
        int8_t *bp = Bp + (int64_t)t * Np * Kp, *ap = Ap + (int64_t)t * Mp * Kp;
        int32_t buf[16 * 16];
        configure();
#pragma omp for schedule(static)
        for (int64_t i = 0; i < batch; i++) {
            const int8_t *b = B + i * sbb;
            if (sbn == 1 && sbk != 1)
                pack_b_rows(b, K, N, sbk, bp, Kp, Np, 1);
            else
                pack_b(b, K, N, sbk, sbn, bp, Kp, Np, 1);
            const int8_t *a = A + i * sab;
            int64_t lda = sam;
            if (!direct) {
                pack_a(a, M, K, sam, sak, ap, Mp, Kp, 1);
                a = ap;
                lda = Kp;
            }
            for (int64_t p = 0; p < panels; p++)
                for (int64_t mb = 0; mb < MB; mb++)
                    run_blocks(a, lda, bp, KK, Mp, Np, p, mb, 0, Kp, C + i * scb, ldc, M, N, buf);
        }
        _tile_release();
    }
}
