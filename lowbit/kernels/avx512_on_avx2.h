/* lowbit's AVX-512 quantizer (quant_avx512.c) on a CPU with AVX2 and F16C but no AVX-512:
 * included in place of <immintrin.h> where the build defines LOWBIT_AVX2_SHIM
 * (lowbit.kernels.avx512.build_flags). Each 512-bit type is a pair of 256-bit registers
 * (lo: lanes 0-7, hi: lanes 8-15) and each AVX-512 intrinsic the C file calls is defined
 * here on the halves, computing lane for lane what Intel's Intrinsics Guide gives for the
 * instruction (the same IEEE operations: add, mul, div, min/max with their NaN rule,
 * round, convert), so that the codes are the AVX-512 build's bit for bit. Masks stay
 * 16-bit integers (__mmask16); a mask's half becomes all-ones lanes by lb_lanes8 and a
 * comparison's lanes become bits by vmovmskps.
 *
 * Masked loads and stores touch only the selected lanes' memory, as AVX-512's do (the
 * kernel reads rows' tails this way; a load of all 64 bytes could fault at a page's end,
 * a store of them would overwrite the neighbouring data): vmaskmovps/vpmaskmovd for
 * 32-bit lanes, byte loops where the 8- and 16-bit lanes of a tail are not all selected.
 *
 * Only the intrinsics quant_avx512.c uses are here; a new one fails the AVX2 build (a
 * compile error: an incompatible type for a 512-bit operand, else "target specific option
 * mismatch"), which lowbit reports and falls back from.
 * SIMDe (simd-everywhere) emulates the same set generically; its 0.8.2 release was
 * measured slower than the compiled quantizer here (each 512-bit value through memory)
 * and wrong for this kernel in three places (masked stores wrote zeros into unselected
 * lanes, masked loads read all 64 bytes, roundscale read _MM_FROUND_NO_EXC as a scale). */
#ifndef LOWBIT_AVX512_ON_AVX2_H
#define LOWBIT_AVX512_ON_AVX2_H
#include <immintrin.h>
#include <stdint.h>

typedef struct { __m256 lo, hi; } lb_m512;
typedef struct { __m256i lo, hi; } lb_m512i;
typedef struct { __m256d lo, hi; } lb_m512d;
#define __m512 lb_m512
#define __m512i lb_m512i
#define __m512d lb_m512d
#define LB static inline __attribute__((always_inline))

/* -- masks ------------------------------------------------------------------------------ */
LB __m256i lb_bits8(unsigned k) {  /* lane i all-ones where bit i of k (0..7) is set */
  const __m256i b = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)k), b), b);
}
LB __m256 lb_lanes8(unsigned k) { return _mm256_castsi256_ps(lb_bits8(k)); }
#define LB_LO(k) lb_lanes8((unsigned)(k) & 0xFFu)
#define LB_HI(k) lb_lanes8((unsigned)(k) >> 8)
LB __mmask16 lb_bits_of(__m256 lo, __m256 hi) {
  return (__mmask16)((unsigned)_mm256_movemask_ps(lo) | (unsigned)_mm256_movemask_ps(hi) << 8);
}

/* -- float lanes ------------------------------------------------------------------------ */
LB lb_m512 lb_set1_ps(float a) { __m256 v = _mm256_set1_ps(a); return (lb_m512){v, v}; }
LB lb_m512 lb_setzero_ps(void) { __m256 v = _mm256_setzero_ps(); return (lb_m512){v, v}; }
#define LB_BIN_PS(name, op) \
  LB lb_m512 name(lb_m512 a, lb_m512 b) { return (lb_m512){op(a.lo, b.lo), op(a.hi, b.hi)}; }
LB_BIN_PS(lb_add_ps, _mm256_add_ps)
LB_BIN_PS(lb_sub_ps, _mm256_sub_ps)
LB_BIN_PS(lb_mul_ps, _mm256_mul_ps)
LB_BIN_PS(lb_div_ps, _mm256_div_ps)
LB_BIN_PS(lb_max_ps, _mm256_max_ps)  /* MAXPS: the second operand where either is NaN, as vmaxps zmm */
LB_BIN_PS(lb_min_ps, _mm256_min_ps)
LB lb_m512 lb_abs_ps(lb_m512 a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  return (lb_m512){_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
#define _mm512_set1_ps lb_set1_ps
#define _mm512_setzero_ps lb_setzero_ps
#define _mm512_add_ps lb_add_ps
#define _mm512_sub_ps lb_sub_ps
#define _mm512_mul_ps lb_mul_ps
#define _mm512_div_ps lb_div_ps
#define _mm512_max_ps lb_max_ps
#define _mm512_min_ps lb_min_ps
#define _mm512_abs_ps lb_abs_ps
/* vrndscaleps with no scale bits (imm < 16): bits 0-2 as roundps reads them (bit 2: by
 * MXCSR), exceptions suppressed (the C files pass floor and nearest-even) */
#define _mm512_roundscale_ps(a, imm) __extension__({                                    \
    _Static_assert(((imm) >> 4) == 0, "lowbit's AVX2 roundscale takes no scale bits");   \
    const lb_m512 r_a_ = (a);                                                            \
    (lb_m512){_mm256_round_ps(r_a_.lo, ((imm) & 7) | _MM_FROUND_NO_EXC),                 \
              _mm256_round_ps(r_a_.hi, ((imm) & 7) | _MM_FROUND_NO_EXC)}; })
/* a predicate of _mm256_cmp_ps (AVX: all 32) on both halves, as a 16-bit mask */
#define _mm512_cmp_ps_mask(a, b, imm) __extension__({                                   \
    const lb_m512 c_a_ = (a), c_b_ = (b);                                                \
    lb_bits_of(_mm256_cmp_ps(c_a_.lo, c_b_.lo, imm), _mm256_cmp_ps(c_a_.hi, c_b_.hi, imm)); })
LB lb_m512 lb_maskz_mov_ps(__mmask16 k, lb_m512 a) {
  return (lb_m512){_mm256_and_ps(a.lo, LB_LO(k)), _mm256_and_ps(a.hi, LB_HI(k))};
}
LB lb_m512 lb_mask_mov_ps(lb_m512 src, __mmask16 k, lb_m512 a) {
  return (lb_m512){_mm256_blendv_ps(src.lo, a.lo, LB_LO(k)), _mm256_blendv_ps(src.hi, a.hi, LB_HI(k))};
}
LB lb_m512 lb_mask_add_ps(lb_m512 src, __mmask16 k, lb_m512 a, lb_m512 b) {
  return lb_mask_mov_ps(src, k, lb_add_ps(a, b));
}
#define _mm512_maskz_mov_ps lb_maskz_mov_ps
#define _mm512_mask_mov_ps lb_mask_mov_ps
#define _mm512_mask_add_ps lb_mask_add_ps
/* the largest lane; the C file calls it only where no lane is NaN */
LB float lb_reduce_max_ps(lb_m512 a) {
  __m256 m = _mm256_max_ps(a.hi, a.lo);  /* GCC's order (avx512fintrin.h): the same bits for ±0 */
  __m128 h = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}
#define _mm512_reduce_max_ps lb_reduce_max_ps

/* -- integer lanes ---------------------------------------------------------------------- */
LB lb_m512i lb_set1_epi32(int a) { __m256i v = _mm256_set1_epi32(a); return (lb_m512i){v, v}; }
#define LB_BIN_EPI(name, op) \
  LB lb_m512i name(lb_m512i a, lb_m512i b) { return (lb_m512i){op(a.lo, b.lo), op(a.hi, b.hi)}; }
LB_BIN_EPI(lb_add_epi32, _mm256_add_epi32)
LB_BIN_EPI(lb_sub_epi32, _mm256_sub_epi32)
LB_BIN_EPI(lb_mullo_epi32, _mm256_mullo_epi32)
LB_BIN_EPI(lb_max_epi32, _mm256_max_epi32)
LB_BIN_EPI(lb_and_si512, _mm256_and_si256)
LB_BIN_EPI(lb_or_si512, _mm256_or_si256)
LB_BIN_EPI(lb_xor_si512, _mm256_xor_si256)
LB lb_m512i lb_srli_epi32(lb_m512i a, int n) { return (lb_m512i){_mm256_srli_epi32(a.lo, n), _mm256_srli_epi32(a.hi, n)}; }
LB lb_m512i lb_slli_epi32(lb_m512i a, int n) { return (lb_m512i){_mm256_slli_epi32(a.lo, n), _mm256_slli_epi32(a.hi, n)}; }
#define _mm512_set1_epi32 lb_set1_epi32
#define _mm512_add_epi32 lb_add_epi32
#define _mm512_sub_epi32 lb_sub_epi32
#define _mm512_mullo_epi32 lb_mullo_epi32
#define _mm512_max_epi32 lb_max_epi32
#define _mm512_and_si512 lb_and_si512
#define _mm512_or_si512 lb_or_si512
#define _mm512_xor_si512 lb_xor_si512
#define _mm512_srli_epi32 lb_srli_epi32
#define _mm512_slli_epi32 lb_slli_epi32
/* signed 32-bit comparisons; the predicates _MM_CMPINT_{EQ,LT,LE,FALSE,NE,NLT,NLE,TRUE} */
LB __m256i lb_cmp8_epi32(__m256i a, __m256i b, int imm) {
  const __m256i ones = _mm256_set1_epi32(-1);
  switch (imm & 7) {
    case 0: return _mm256_cmpeq_epi32(a, b);
    case 1: return _mm256_cmpgt_epi32(b, a);
    case 2: return _mm256_xor_si256(_mm256_cmpgt_epi32(a, b), ones);
    case 3: return _mm256_setzero_si256();
    case 4: return _mm256_xor_si256(_mm256_cmpeq_epi32(a, b), ones);
    case 5: return _mm256_xor_si256(_mm256_cmpgt_epi32(b, a), ones);
    case 6: return _mm256_cmpgt_epi32(a, b);
    default: return ones;
  }
}
#define _mm512_cmp_epi32_mask(a, b, imm) __extension__({                                   \
    const lb_m512i ci_a_ = (a), ci_b_ = (b);                                                \
    lb_bits_of(_mm256_castsi256_ps(lb_cmp8_epi32(ci_a_.lo, ci_b_.lo, imm)),                 \
               _mm256_castsi256_ps(lb_cmp8_epi32(ci_a_.hi, ci_b_.hi, imm))); })
LB lb_m512i lb_mask_mov_epi32(lb_m512i src, __mmask16 k, lb_m512i a) {
  return (lb_m512i){_mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(src.lo), _mm256_castsi256_ps(a.lo), LB_LO(k))),
                    _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(src.hi), _mm256_castsi256_ps(a.hi), LB_HI(k)))};
}
LB lb_m512i lb_mask_blend_epi32(__mmask16 k, lb_m512i a, lb_m512i b) { return lb_mask_mov_epi32(a, k, b); }
#define _mm512_mask_mov_epi32 lb_mask_mov_epi32
#define _mm512_mask_blend_epi32 lb_mask_blend_epi32

/* -- conversions and casts -------------------------------------------------------------- */
LB lb_m512 lb_cvtepi32_ps(lb_m512i a) { return (lb_m512){_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
LB lb_m512i lb_cvtps_epi32(lb_m512 a) { return (lb_m512i){_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
LB lb_m512i lb_cvtepi8_epi32(__m128i a) {
  return (lb_m512i){_mm256_cvtepi8_epi32(a), _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8))};
}
LB lb_m512i lb_cvtepu16_epi32(__m256i a) {
  return (lb_m512i){_mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1))};
}
LB lb_m512 lb_cvtph_ps(__m256i a) {
  return (lb_m512){_mm256_cvtph_ps(_mm256_castsi256_si128(a)), _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1))};
}
/* vpmovdw / vpmovdb (truncating): the lanes' low bits packed by unsigned-saturating packs
 * of values already within range (no saturation), lanes put back in order by vpermq */
LB __m256i lb_cvtepi32_epi16(lb_m512i a) {
  const __m256i m = _mm256_set1_epi32(0xFFFF);
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(_mm256_and_si256(a.lo, m), _mm256_and_si256(a.hi, m)), 0xD8);
}
LB __m128i lb_cvtepi32_epi8(lb_m512i a) {
  const __m256i m = _mm256_set1_epi32(0xFF);
  const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(_mm256_and_si256(a.lo, m), _mm256_and_si256(a.hi, m)), 0xD8);
  return _mm_packus_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
}
#define _mm512_cvtepi32_ps lb_cvtepi32_ps
#define _mm512_cvtps_epi32 lb_cvtps_epi32
#define _mm512_cvtepi8_epi32 lb_cvtepi8_epi32
#define _mm512_cvtepu16_epi32 lb_cvtepu16_epi32
#define _mm512_cvtph_ps lb_cvtph_ps
#define _mm512_cvtepi32_epi16 lb_cvtepi32_epi16
#define _mm512_cvtepi32_epi8 lb_cvtepi32_epi8
LB lb_m512i lb_castps_si512(lb_m512 a) { return (lb_m512i){_mm256_castps_si256(a.lo), _mm256_castps_si256(a.hi)}; }
LB lb_m512 lb_castsi512_ps(lb_m512i a) { return (lb_m512){_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)}; }
LB lb_m512d lb_castps_pd(lb_m512 a) { return (lb_m512d){_mm256_castps_pd(a.lo), _mm256_castps_pd(a.hi)}; }
LB lb_m512 lb_castpd_ps(lb_m512d a) { return (lb_m512){_mm256_castpd_ps(a.lo), _mm256_castpd_ps(a.hi)}; }
#define _mm512_castps_si512 lb_castps_si512
#define _mm512_castsi512_ps lb_castsi512_ps
#define _mm512_castps_pd lb_castps_pd
#define _mm512_castpd_ps lb_castpd_ps

/* -- shuffles (within 128-bit lanes as on zmm; shuffle_f32x4 picks whole 128-bit lanes) - */
LB lb_m512 lb_unpacklo_ps(lb_m512 a, lb_m512 b) { return (lb_m512){_mm256_unpacklo_ps(a.lo, b.lo), _mm256_unpacklo_ps(a.hi, b.hi)}; }
LB lb_m512 lb_unpackhi_ps(lb_m512 a, lb_m512 b) { return (lb_m512){_mm256_unpackhi_ps(a.lo, b.lo), _mm256_unpackhi_ps(a.hi, b.hi)}; }
LB lb_m512d lb_unpacklo_pd(lb_m512d a, lb_m512d b) { return (lb_m512d){_mm256_unpacklo_pd(a.lo, b.lo), _mm256_unpacklo_pd(a.hi, b.hi)}; }
LB lb_m512d lb_unpackhi_pd(lb_m512d a, lb_m512d b) { return (lb_m512d){_mm256_unpackhi_pd(a.lo, b.lo), _mm256_unpackhi_pd(a.hi, b.hi)}; }
#define _mm512_unpacklo_ps lb_unpacklo_ps
#define _mm512_unpackhi_ps lb_unpackhi_ps
#define _mm512_unpacklo_pd lb_unpacklo_pd
#define _mm512_unpackhi_pd lb_unpackhi_pd
#define _mm512_shuffle_ps(a, b, imm) __extension__({                                      \
    const lb_m512 s_a_ = (a), s_b_ = (b);                                                  \
    (lb_m512){_mm256_shuffle_ps(s_a_.lo, s_b_.lo, imm), _mm256_shuffle_ps(s_a_.hi, s_b_.hi, imm)}; })
/* result lanes 0, 1 = a's 128-bit lanes imm[1:0], imm[3:2]; lanes 2, 3 = b's imm[5:4],
 * imm[7:6] (vperm2f128's selector 0-3 names lo's and hi's lanes) */
#define _mm512_shuffle_f32x4(a, b, imm) __extension__({                                   \
    const lb_m512 f_a_ = (a), f_b_ = (b);                                                  \
    (lb_m512){_mm256_permute2f128_ps(f_a_.lo, f_a_.hi, ((imm) & 3) | (((imm) >> 2) & 3) << 4), \
              _mm256_permute2f128_ps(f_b_.lo, f_b_.hi, (((imm) >> 4) & 3) | (((imm) >> 6) & 3) << 4)}; })

/* -- memory ----------------------------------------------------------------------------- */
LB lb_m512i lb_loadu_si512(const void *p) {
  return (lb_m512i){_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)p + 1)};
}
LB lb_m512 lb_maskz_loadu_ps(__mmask16 k, const void *p) {
  return (lb_m512){_mm256_maskload_ps((const float *)p, lb_bits8(k & 0xFFu)),
                   _mm256_maskload_ps((const float *)p + 8, lb_bits8((unsigned)k >> 8))};
}
LB lb_m512i lb_maskz_loadu_epi32(__mmask16 k, const void *p) {
  return (lb_m512i){_mm256_maskload_epi32((const int *)p, lb_bits8(k & 0xFFu)),
                    _mm256_maskload_epi32((const int *)p + 8, lb_bits8((unsigned)k >> 8))};
}
LB void lb_mask_storeu_ps(void *p, __mmask16 k, lb_m512 a) {
  _mm256_maskstore_ps((float *)p, lb_bits8(k & 0xFFu), a.lo);
  _mm256_maskstore_ps((float *)p + 8, lb_bits8((unsigned)k >> 8), a.hi);
}
LB __m128i lb_maskz_loadu_epi8(__mmask16 k, const void *p) {
  if (k == 0xFFFFu) return _mm_loadu_si128((const __m128i *)p);
  int8_t b[16]; const int8_t *s = (const int8_t *)p;
  for (int i = 0; i < 16; i++) b[i] = (k >> i) & 1 ? s[i] : 0;
  return _mm_loadu_si128((const __m128i *)b);
}
LB void lb_mask_storeu_epi8(void *p, __mmask16 k, __m128i a) {
  if (k == 0xFFFFu) { _mm_storeu_si128((__m128i *)p, a); return; }
  int8_t b[16]; int8_t *d = (int8_t *)p;
  _mm_storeu_si128((__m128i *)b, a);
  for (int i = 0; i < 16; i++) if ((k >> i) & 1) d[i] = b[i];
}
LB __m256i lb_maskz_loadu_epi16(__mmask16 k, const void *p) {
  if (k == 0xFFFFu) return _mm256_loadu_si256((const __m256i *)p);
  int16_t b[16]; const int16_t *s = (const int16_t *)p;
  for (int i = 0; i < 16; i++) b[i] = (k >> i) & 1 ? s[i] : 0;
  return _mm256_loadu_si256((const __m256i *)b);
}
LB void lb_mask_storeu_epi16(void *p, __mmask16 k, __m256i a) {
  if (k == 0xFFFFu) { _mm256_storeu_si256((__m256i *)p, a); return; }
  int16_t b[16]; int16_t *d = (int16_t *)p;
  _mm256_storeu_si256((__m256i *)b, a);
  for (int i = 0; i < 16; i++) if ((k >> i) & 1) d[i] = b[i];
}
#define _mm512_loadu_si512 lb_loadu_si512
#define _mm512_maskz_loadu_ps lb_maskz_loadu_ps
#define _mm512_maskz_loadu_epi32 lb_maskz_loadu_epi32
#define _mm512_mask_storeu_ps lb_mask_storeu_ps
#define _mm_maskz_loadu_epi8 lb_maskz_loadu_epi8
#define _mm_mask_storeu_epi8 lb_mask_storeu_epi8
#define _mm256_maskz_loadu_epi16 lb_maskz_loadu_epi16
#define _mm256_mask_storeu_epi16 lb_mask_storeu_epi16
#endif
