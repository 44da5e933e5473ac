"""A prototype int8 GEMM for AVX2 CPUs (no int8 dot product): is an integer kernel of
lowbit's own worth writing there, against the exact float32 route
(``lowbit.kernels.exact_f32``)?

The kernel below (not part of lowbit) packs both operands to int16 — ``B`` in panels of
16 columns, each 32-bit lane a pair of consecutive ``k`` — and sums with ``vpmaddwd``
(16 products a 256-bit instruction, pairwise added into int32) plus ``vpaddd``, on 6 × 16
tiles of C, OpenMP over the tiles: the classic AVX2 integer GEMM without saturation
(``vpmaddubsw``'s int16 sums of u8·s8 pairs saturate, so oneDNN and FBGEMM are inexact
there). Its sums are checked against int64 products. Sixteen multiply-adds per
``vpmaddwd`` against eight per float32 FMA promise up to 2× float32 where both issue at
the same rate; on the AMD EPYC (Zen 3) of docs/benchmarks.md ("The float32 route's long
sums") it ran at float32's speed, so lowbit keeps the float32 route there.

    python benchmarks/probes/avx2_madd_gemm.py [--threads 1]
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
from pathlib import Path

import torch
from _timing import median_ms

import lowbit.kernels.exact_f32  # noqa: F401  (registers lowbit::int8_mm_f32)

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#define MR 6
#define NR 16
/* pack B (K,N) int8 strides sb0,sb1 -> panels [N/16][K2][16 cols][2] int16 */
void packb(const int8_t *b, int64_t sb0, int64_t sb1, int64_t k, int64_t n, int16_t *pb) {
    int64_t k2 = (k + 1) / 2, np = (n + NR - 1) / NR;
    #pragma omp parallel for
    for (int64_t p = 0; p < np; p++) {
        int16_t *d = pb + p * k2 * NR * 2;
        for (int64_t q = 0; q < k2; q++)
            for (int j = 0; j < NR; j++) {
                int64_t c = p * NR + j;
                int16_t v0 = 0, v1 = 0;
                if (c < n) { v0 = b[2*q*sb0 + c*sb1]; if (2*q+1 < k) v1 = b[(2*q+1)*sb0 + c*sb1]; }
                d[(q * NR + j) * 2] = v0; d[(q * NR + j) * 2 + 1] = v1;
            }
    }
}
void packa(const int8_t *a, int64_t sa0, int64_t sa1, int64_t m, int64_t k, int32_t *pa) {
    int64_t k2 = (k + 1) / 2, mb = (m + MR - 1) / MR;
    #pragma omp parallel for
    for (int64_t p = 0; p < mb; p++) {
        int32_t *d = pa + p * k2 * MR;
        for (int64_t q = 0; q < k2; q++)
            for (int r = 0; r < MR; r++) {
                int64_t i = p * MR + r; int16_t v0 = 0, v1 = 0;
                if (i < m) { v0 = a[i*sa0 + 2*q*sa1]; if (2*q+1 < k) v1 = a[i*sa0 + (2*q+1)*sa1]; }
                d[q * MR + r] = (int32_t)((uint16_t)v0 | ((uint32_t)(uint16_t)v1 << 16));
            }
    }
}
static inline void micro(const int32_t *pa, const int16_t *pb, int64_t k2, int32_t *c, int64_t ldc, int mr, int nr) {
    __m256i acc[MR][2];
    for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t q = 0; q < k2; q++) {
        __m256i b0 = _mm256_load_si256((const __m256i *)(pb + q * 32));
        __m256i b1 = _mm256_load_si256((const __m256i *)(pb + q * 32 + 16));
        for (int r = 0; r < MR; r++) {
            __m256i av = _mm256_set1_epi32(pa[q * MR + r]);
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(av, b0));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(av, b1));
        }
    }
    int32_t tmp[MR][NR] __attribute__((aligned(32)));
    for (int r = 0; r < MR; r++) { _mm256_store_si256((__m256i*)tmp[r], acc[r][0]); _mm256_store_si256((__m256i*)(tmp[r]+8), acc[r][1]); }
    for (int r = 0; r < mr; r++) memcpy(c + r * ldc, tmp[r], nr * 4);
}
void gemm(const int32_t *pa, const int16_t *pb, int64_t m, int64_t k, int64_t n, int32_t *c, int64_t ldc) {
    int64_t k2 = (k + 1) / 2, mb = (m + MR - 1) / MR, np = (n + NR - 1) / NR;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int64_t p = 0; p < np; p++)
        for (int64_t i = 0; i < mb; i++) {
            int mr = (m - i * MR) < MR ? (int)(m - i * MR) : MR; int nr = (n - p * NR) < NR ? (int)(n - p * NR) : NR;
            micro(pa + i * k2 * MR, pb + p * k2 * NR * 2, k2, c + i * MR * ldc + p * NR, ldc, mr, nr);
        }
}
"""

SHAPES = [(512, 4096, 512), (2048, 1024, 1024), (16, 18480, 48), (32, 5376, 96), (6272, 144, 16), (539, 576, 64)]


def build(out_dir: Path) -> ctypes.CDLL:
    c = out_dir / "madd.c"
    c.write_text(SOURCE)
    so = out_dir / "madd.so"
    subprocess.run(["gcc", "-O3", "-mavx2", "-fopenmp", "-shared", "-fPIC", str(c), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.packb.argtypes = [p, i64, i64, i64, i64, p]
    lib.packa.argtypes = [p, i64, i64, i64, i64, p]
    lib.gemm.argtypes = [p, p, i64, i64, i64, p, i64]
    return lib


def madd_mm(lib: ctypes.CDLL, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) @ (K, N) int8 → int32 on the prototype, packing included."""
    m, k = a.shape
    n = b.shape[1]
    k2 = (k + 1) // 2
    pb = torch.empty((n + 15) // 16 * k2 * 32 + 16, dtype=torch.int16)
    pb = pb[(-pb.data_ptr()) % 32 // 2:]  # 32-byte aligned panels (aligned loads)
    pa = torch.empty((m + 5) // 6 * k2 * 6, dtype=torch.int32)
    lib.packb(b.data_ptr(), b.stride(0), b.stride(1), k, n, pb.data_ptr())
    lib.packa(a.data_ptr(), a.stride(0), a.stride(1), m, k, pa.data_ptr())
    c = torch.empty(m, n, dtype=torch.int32)
    lib.gemm(pa.data_ptr(), pb.data_ptr(), m, k, n, c.data_ptr(), n)
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        lib = build(Path(d))
        print(f"{args.threads} threads (OMP_NUM_THREADS sets the prototype's); ms, medians of 9; GOP/s")
        print("| M×K×N | prototype | exact float32 route | float32 mm of float operands |")
        print("|---|---|---|---|")
        for m, k, n in SHAPES:
            print(row(lib, m, k, n))


def row(lib: ctypes.CDLL, m: int, k: int, n: int) -> str:
    """One shape's table row: its sums checked, then the three medians."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=g)
    assert torch.equal(madd_mm(lib, a, b), (a.long() @ b.long()).int()), "prototype sums wrong"
    af, bf = a.float(), b.float()
    ops = 2 * m * k * n / 1e6
    tp = median_ms(lambda: madd_mm(lib, a, b))
    tr = median_ms(lambda: torch.ops.lowbit.int8_mm_f32(a, b))
    tf = median_ms(lambda: torch.mm(af, bf))
    return f"| {m}×{k}×{n} | {tp:.3f} ({ops / tp:.0f}) | {tr:.3f} ({ops / tr:.0f}) | {tf:.3f} ({ops / tf:.0f}) |"

if __name__ == "__main__":
    main()
