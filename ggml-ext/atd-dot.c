// ATD x q8 dot products (the vec_dot kernels of atd.h) and their dispatch.
//
//   sum_e w_e x_e = sum_blocks d_y * sum_i alpha_i * sum_e t_ie q_e,   t = code - 1
//
// B = 256 blocks meet one q8_K block (bsums give sum q); B = 64 blocks meet two q8_0 blocks (one
// fp16 d_y per 32). Paths: scalar reference (always), AVX2 (maddubs, or vpdpbusd with AVX-VNNI),
// AVX-512 F/BW/VL/VNNI (+GFNI decode), NEON. All paths return the same bits (see the scalar
// reference for how), so tests compare them with exact equality.
#include "atd.h"

#include <stdint.h>
#include <string.h>
#include <math.h>

// ---- helpers -----------------------------------------------------------------------------------

// exact fp16 -> fp32 (bit manipulation; every fp16 value is representable in fp32)
static inline float atd_dot_h2f(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t       exp  = (h >> 10) & 0x1fu;
    uint32_t       man  = h & 0x3ffu;
    uint32_t       bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        // subnormal: normalize
        exp = 113;
        while ((man & 0x400u) == 0) {
            man <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t atd_dot_load_u16(const uint8_t * p) {
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline size_t atd_dot_block_bytes(int planes, int block) {
    return (size_t)planes * (sizeof(ggml_half) + (size_t)block / 4);
}

// ---- scalar reference ------------------------------------------------------------------------------
//
// The float combination is shared by every path so that all paths give the same bits:
//   isum_i = sum_e c_ie*q_e - sum_e q_e                        (int32, exact; c = t + 1)
//   acc    = sum_i (double)alpha_i * (double)isum_i           (plane order 0..N-1; products exact)
//   part   = (double)d_y * (double)(float)acc                  (exact product: 24 x 24 bits)
//   sum[b % 4] += part;  result = (float)((sum0 + sum1) + (sum2 + sum3))
// Every product is exact in double, so FMA contraction cannot change a result, and the additions
// happen in the same order in every path; the SIMD paths do this for 4 blocks at once (one block per
// double lane, lane b % 4). For B = 64 the block spans two q8_0 blocks, each with its own d_y, and
// the sums are short enough (|isum| <= 2^12) for exact float products, so acc is float (8 lanes):
//   acc0/acc1 = sum_i alpha_i * (float)isum_i over elements 0..31 / 32..63    (float, plane order)
//   part = (double)d_y0*(double)acc0 + (double)d_y1*(double)acc1              (exact products)

static inline float atd_dot_alpha(const uint8_t * blk, int i) {
    return atd_dot_h2f(atd_dot_load_u16(blk + 2 * i));
}

// block contribution from the integer plane sums (shared by the scalar, NEON and tail code)
static inline double atd_dot_part_256(const uint8_t * blk, float dy, const int32_t * isum, int planes) {
    double acc = 0.0;
    for (int i = 0; i < planes; ++i) {
        acc += (double)atd_dot_alpha(blk, i) * (double)isum[i];
    }
    return (double)dy * (double)(float)acc;
}

static inline double atd_dot_part_64(const uint8_t * blk, float dy0, float dy1, const int32_t * isum0,
                                     const int32_t * isum1, int planes) {
    // |isum| <= 32 * 128 = 2^12 and alpha has 11 significant bits, so each product is exact in float
    float acc0 = 0.0f, acc1 = 0.0f;
    for (int i = 0; i < planes; ++i) {
        const float a = atd_dot_alpha(blk, i);
        acc0 += a * (float)isum0[i];
        acc1 += a * (float)isum1[i];
    }
    const double p0 = (double)dy0 * (double)acc0;
    const double p1 = (double)dy1 * (double)acc1;
    return p0 + p1;
}

static inline double atd_dot_block_256_scalar(const uint8_t * blk, const block_q8_K * yb, int planes) {
    int32_t sumq = 0;
    for (int j = 0; j < QK_K / 16; ++j) {
        sumq += yb->bsums[j];
    }
    int32_t isum[ATD_MAX_PLANES];
    for (int i = 0; i < planes; ++i) {
        const uint8_t * qs = blk + 2 * planes + i * (QK_ATD / 4);
        int32_t         s  = 0;
        // shift k of byte j is element k*64 + j
        for (int k = 0; k < 4; ++k) {
            for (int j = 0; j < QK_ATD / 4; ++j) {
                s += ((qs[j] >> (2 * k)) & 3) * yb->qs[k * (QK_ATD / 4) + j];
            }
        }
        isum[i] = s - sumq;  // sum (t+1) q - sum q = sum t q
    }
    return atd_dot_part_256(blk, yb->d, isum, planes);
}

static inline double atd_dot_block_64_scalar(const uint8_t * blk, const block_q8_0 * y0, int planes) {
    const block_q8_0 * y1 = y0 + 1;
    int32_t            sumq0 = 0, sumq1 = 0;
    for (int j = 0; j < QK8_0; ++j) {
        sumq0 += y0->qs[j];
        sumq1 += y1->qs[j];
    }
    int32_t isum0[ATD_MAX_PLANES], isum1[ATD_MAX_PLANES];
    for (int i = 0; i < planes; ++i) {
        const uint8_t * qs = blk + 2 * planes + i * (QK_ATD_64 / 4);
        int32_t         s0 = 0, s1 = 0;
        // shifts 0,2: elements 0..31 (first q8_0 block); shifts 4,6: elements 32..63
        for (int k = 0; k < 2; ++k) {
            for (int j = 0; j < QK_ATD_64 / 4; ++j) {
                s0 += ((qs[j] >> (2 * k)) & 3) * y0->qs[k * 16 + j];
                s1 += ((qs[j] >> (2 * k + 4)) & 3) * y1->qs[k * 16 + j];
            }
        }
        isum0[i] = s0 - sumq0;
        isum1[i] = s1 - sumq1;
    }
    return atd_dot_part_64(blk, atd_dot_h2f(y0->d), atd_dot_h2f(y1->d), isum0, isum1, planes);
}

static inline float atd_dot_finish(const double * sum) {
    return (float)((sum[0] + sum[1]) + (sum[2] + sum[3]));
}

static void atd_vec_dot_256_scalar(int n, float * s, const uint8_t * x, const block_q8_K * y, int planes) {
    const int    nb  = n / QK_ATD;
    const size_t bsz = atd_dot_block_bytes(planes, QK_ATD);
    double       sum[4] = { 0.0, 0.0, 0.0, 0.0 };
    for (int b = 0; b < nb; ++b) {
        sum[b & 3] += atd_dot_block_256_scalar(x + (size_t)b * bsz, y + b, planes);
    }
    *s = atd_dot_finish(sum);
}

static void atd_vec_dot_64_scalar(int n, float * s, const uint8_t * x, const block_q8_0 * y, int planes) {
    const int    nb  = n / QK_ATD_64;
    const size_t bsz = atd_dot_block_bytes(planes, QK_ATD_64);
    double       sum[4] = { 0.0, 0.0, 0.0, 0.0 };
    for (int b = 0; b < nb; ++b) {
        sum[b & 3] += atd_dot_block_64_scalar(x + (size_t)b * bsz, y + 2 * b, planes);
    }
    *s = atd_dot_finish(sum);
}

// ---- x86: which SIMD paths exist in this build ---------------------------------------------------------
//
// Standalone (cffi) builds compile every x86 path with per-function target attributes and pick one
// at run time (__builtin_cpu_supports). Inside ggml (ATD_IN_GGML) the paths follow the compiler's
// -m flags (__AVX2__, __AVX512VNNI__, ...), like the rest of ggml-cpu, and no attributes are used.

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#define ATD_X86 1
#endif

#if defined(ATD_X86) && defined(ATD_IN_GGML)
#define ATD_RUNTIME_DISPATCH 0
#if defined(_MSC_VER) && defined(__AVX2__)
// MSVC has no -mfma/-mf16c macros; every AVX2 CPU has both (ggml-cpu-impl.h does the same)
#ifndef __FMA__
#define __FMA__
#endif
#ifndef __F16C__
#define __F16C__
#endif
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ATD_HAVE_AVX2 1
#if defined(__AVXVNNI__)
#define ATD_HAVE_AVXVNNI 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define ATD_HAVE_AVX512 1
#if defined(__GFNI__)
#define ATD_HAVE_GFNI 1
#endif
#endif
#endif
#define ATD_TARGET_AVX2
#define ATD_TARGET_AVXVNNI
#define ATD_TARGET_AVX512
#define ATD_TARGET_AVX512_GFNI
#elif defined(ATD_X86) && (defined(__GNUC__) || defined(__clang__))
#define ATD_RUNTIME_DISPATCH 1
#define ATD_HAVE_AVX2    1
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define ATD_HAVE_AVXVNNI 1  // the avxvnni target needs gcc 11 / clang 12
#endif
#define ATD_HAVE_AVX512  1
#define ATD_HAVE_GFNI    1
#define ATD_TARGET_AVX2    __attribute__((target("avx2,fma,f16c")))
#define ATD_TARGET_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define ATD_TARGET_AVX512  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define ATD_TARGET_AVX512_GFNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,gfni")))
#else
#define ATD_RUNTIME_DISPATCH 0
#endif

#if defined(ATD_HAVE_AVX2)
#include <immintrin.h>

#if defined(__GNUC__) || defined(__clang__)
#define ATD_INLINE static inline __attribute__((always_inline))
#define ATD_UNROLL _Pragma("GCC unroll 4")
#else
#define ATD_INLINE static inline
#define ATD_UNROLL
#endif

// ---- shared AVX2 helpers: reductions and the float combination --------------------------------------

// 4 vectors of 8 int32 -> [sum a, sum b, sum c, sum d]
ATD_TARGET_AVX2 ATD_INLINE __m128i atd_hsum4_epi32(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab   = _mm256_hadd_epi32(a, b);      // a01 a23 b01 b23 | a45 a67 b45 b67
    const __m256i cd   = _mm256_hadd_epi32(c, d);
    const __m256i abcd = _mm256_hadd_epi32(ab, cd);    // a0-3 b0-3 c0-3 d0-3 | a4-7 ...
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

// B = 64 partial sums v = [lo lo hi hi | lo lo hi hi] of a, b, c, d ->
// [alo ahi blo bhi | clo chi dlo dhi]
ATD_TARGET_AVX2 ATD_INLINE __m256i atd_hsum4x2_epi32(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab = _mm256_hadd_epi32(a, b);        // alo ahi blo bhi | (other partials)
    const __m256i cd = _mm256_hadd_epi32(c, d);
    return _mm256_add_epi32(_mm256_permute2x128_si256(ab, cd, 0x20), _mm256_permute2x128_si256(ab, cd, 0x31));
}

// 4x4 transpose of int32 (rows -> columns)
ATD_TARGET_AVX2 ATD_INLINE void atd_transpose4_epi32(__m128i * r) {
    const __m128i t0 = _mm_unpacklo_epi32(r[0], r[1]), t1 = _mm_unpacklo_epi32(r[2], r[3]);
    const __m128i t2 = _mm_unpackhi_epi32(r[0], r[1]), t3 = _mm_unpackhi_epi32(r[2], r[3]);
    r[0] = _mm_unpacklo_epi64(t0, t1);
    r[1] = _mm_unpackhi_epi64(t0, t1);
    r[2] = _mm_unpacklo_epi64(t2, t3);
    r[3] = _mm_unpackhi_epi64(t2, t3);
}

// 4x4 transpose of int32 pairs (64-bit units) in ymm
ATD_TARGET_AVX2 ATD_INLINE void atd_transpose4_epi64(__m256i * r) {
    const __m256i t0 = _mm256_unpacklo_epi64(r[0], r[1]), t1 = _mm256_unpackhi_epi64(r[0], r[1]);
    const __m256i t2 = _mm256_unpacklo_epi64(r[2], r[3]), t3 = _mm256_unpackhi_epi64(r[2], r[3]);
    r[0] = _mm256_permute2x128_si256(t0, t2, 0x20);
    r[1] = _mm256_permute2x128_si256(t1, t3, 0x20);
    r[2] = _mm256_permute2x128_si256(t0, t2, 0x31);
    r[3] = _mm256_permute2x128_si256(t1, t3, 0x31);
}

// 4 fp16 packed into a 64-bit integer (built with scalar loads and shifts: the vector ports are the
// bottleneck here, the integer ALUs idle)
static inline uint64_t atd_pack4_u16(const uint8_t * p, size_t stride) {
    return (uint64_t)atd_dot_load_u16(p) | (uint64_t)atd_dot_load_u16(p + stride) << 16 |
           (uint64_t)atd_dot_load_u16(p + 2 * stride) << 32 | (uint64_t)atd_dot_load_u16(p + 3 * stride) << 48;
}

// scale d[i] of 4 consecutive blocks as 4 fp16 in the low 64 bits
ATD_TARGET_AVX2 ATD_INLINE __m128i atd_alpha4_h(const uint8_t * blk, size_t bsz, int i) {
    return _mm_set_epi64x(0, (long long)atd_pack4_u16(blk + 2 * i, bsz));
}

// atd_dot_part_256 for 4 blocks (lane g = block b+g), added to sumv
ATD_TARGET_AVX2 ATD_INLINE __m256d atd_combine4_256(__m256d sumv, const uint8_t * blk, size_t bsz,
                                                    const block_q8_K * y, const __m128i * isum, int planes) {
    __m256d acc = _mm256_setzero_pd();
    for (int i = 0; i < planes; ++i) {
        const __m256d a = _mm256_cvtps_pd(_mm_cvtph_ps(atd_alpha4_h(blk, bsz, i)));  // exact conversions
        acc = _mm256_add_pd(acc, _mm256_mul_pd(a, _mm256_cvtepi32_pd(isum[i])));    // exact products
    }
    const __m256d accf = _mm256_cvtps_pd(_mm256_cvtpd_ps(acc));  // (double)(float)acc
    const __m256d dy   = _mm256_cvtps_pd(_mm_setr_ps(y[0].d, y[1].d, y[2].d, y[3].d));
    return _mm256_add_pd(sumv, _mm256_mul_pd(dy, accf));
}

// atd_dot_part_64 for 4 blocks; isum[i] = [b0lo b0hi b1lo b1hi b2lo b2hi b3lo b3hi]
ATD_TARGET_AVX2 ATD_INLINE __m256d atd_combine4_64(__m256d sumv, const uint8_t * blk, size_t bsz,
                                                   const block_q8_0 * y, const __m256i * isum, int planes) {
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < planes; ++i) {
        const __m128i h = atd_alpha4_h(blk, bsz, i);
        const __m256  a = _mm256_cvtph_ps(_mm_unpacklo_epi16(h, h));  // a0 a0 a1 a1 a2 a2 a3 a3
        acc = _mm256_add_ps(acc, _mm256_mul_ps(a, _mm256_cvtepi32_ps(isum[i])));  // exact: |isum| <= 4096
    }
    const uint8_t * yd = (const uint8_t *)&y[0].d;
    const __m128i   hd = _mm_set_epi64x((long long)atd_pack4_u16(yd + 4 * sizeof(block_q8_0), sizeof(block_q8_0)),
                                        (long long)atd_pack4_u16(yd, sizeof(block_q8_0)));
    const __m256  dy  = _mm256_cvtph_ps(hd);
    const __m256d p01 = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(dy)),
                                      _mm256_cvtps_pd(_mm256_castps256_ps128(acc)));
    const __m256d p23 = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(dy, 1)),
                                      _mm256_cvtps_pd(_mm256_extractf128_ps(acc, 1)));
    // lo + hi of each block; hadd gives b0 b2 b1 b3
    return _mm256_add_pd(sumv, _mm256_permute4x64_pd(_mm256_hadd_pd(p01, p23), 0xD8));
}

// ---- AVX2 --------------------------------------------------------------------------------------------
//
// B = 256: a plane is two 32-byte loads; (c >> 2k) & 3 gives the natural-order codes of elements
// 64k + 0..31 and 64k + 32..63. B = 64: the 16 plane bytes go to both 128-bit lanes, shifted by
// 0/2 (elements 0..31) and 4/6 (32..63). Activations are loaded once per block, used by all planes.
// Two flavours of the unsigned x signed byte dot:
//   mad:  maddubs (pairs: |.| <= 2*2*128, fits int16), summed in int16, one madd to int32;
//   vnni: vpdpbusd straight into int32 (AVX-VNNI, or the AVX512-VL encoding on AVX-512 CPUs).

// 8 pairs (codes, q) of 32 bytes, minus the q8_K bsums -> 8 int32 partial sums (their total is
// sum t*q; bsums is raw int16 here: subtracted in int16, |.| <= 4064 + 2048)
ATD_TARGET_AVX2 ATD_INLINE __m256i atd_bsums256_mad(const int16_t * bsums) {
    return _mm256_loadu_si256((const __m256i *)bsums);
}
ATD_TARGET_AVX2 ATD_INLINE __m256i atd_dot256_mad(__m256i bsums, const __m256i * c, const __m256i * q) {
    const __m256i s01 = _mm256_add_epi16(_mm256_maddubs_epi16(c[0], q[0]), _mm256_maddubs_epi16(c[1], q[1]));
    const __m256i s23 = _mm256_add_epi16(_mm256_maddubs_epi16(c[2], q[2]), _mm256_maddubs_epi16(c[3], q[3]));
    const __m256i s45 = _mm256_add_epi16(_mm256_maddubs_epi16(c[4], q[4]), _mm256_maddubs_epi16(c[5], q[5]));
    const __m256i s67 = _mm256_add_epi16(_mm256_maddubs_epi16(c[6], q[6]), _mm256_maddubs_epi16(c[7], q[7]));
    const __m256i s   = _mm256_add_epi16(_mm256_add_epi16(s01, s23), _mm256_add_epi16(s45, s67));  // |.| <= 4064
    return _mm256_madd_epi16(_mm256_sub_epi16(s, bsums), _mm256_set1_epi16(1));
}
// (codes, q) of elements 0..31 and 32..63 -> [lo lo hi hi | lo lo hi hi] (+ init)
ATD_TARGET_AVX2 ATD_INLINE __m256i atd_dot64_mad(__m256i init, __m256i clo, __m256i qlo, __m256i chi, __m256i qhi) {
    const __m256i s = _mm256_hadd_epi16(_mm256_maddubs_epi16(clo, qlo), _mm256_maddubs_epi16(chi, qhi));
    return _mm256_add_epi32(init, _mm256_madd_epi16(s, _mm256_set1_epi16(1)));
}

#define ATD_DEFINE_DOT_VNNI(SFX, TARGET, DPBUSD)                                                             \
    /* -sum q as 8 int32 pair sums of the bsums: the start of every plane's sum */                         \
    TARGET ATD_INLINE __m256i atd_bsums256_##SFX(const int16_t * bsums) {                                  \
        return _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)bsums), _mm256_set1_epi16(-1));       \
    }                                                                                                       \
    TARGET ATD_INLINE __m256i atd_dot256_##SFX(__m256i init, const __m256i * c, const __m256i * q) {        \
        /* two chains halve the dependency latency */                                                       \
        __m256i a0 = DPBUSD(init, c[0], q[0]);                                                              \
        __m256i a1 = DPBUSD(_mm256_setzero_si256(), c[1], q[1]);                                            \
        a0 = DPBUSD(a0, c[2], q[2]);                                                                        \
        a1 = DPBUSD(a1, c[3], q[3]);                                                                        \
        a0 = DPBUSD(a0, c[4], q[4]);                                                                        \
        a1 = DPBUSD(a1, c[5], q[5]);                                                                        \
        a0 = DPBUSD(a0, c[6], q[6]);                                                                        \
        a1 = DPBUSD(a1, c[7], q[7]);                                                                        \
        return _mm256_add_epi32(a0, a1);                                                                    \
    }                                                                                                       \
    TARGET ATD_INLINE __m256i atd_dot64_##SFX(__m256i init, __m256i clo, __m256i qlo, __m256i chi,         \
                                              __m256i qhi) {                                               \
        return _mm256_add_epi32(init, _mm256_hadd_epi32(DPBUSD(_mm256_setzero_si256(), clo, qlo),           \
                                                        DPBUSD(_mm256_setzero_si256(), chi, qhi)));         \
    }

#if defined(ATD_HAVE_AVXVNNI)
ATD_DEFINE_DOT_VNNI(vnni, ATD_TARGET_AVXVNNI, _mm256_dpbusd_avx_epi32)
#endif
#if defined(ATD_HAVE_AVX512)
ATD_DEFINE_DOT_VNNI(evex, ATD_TARGET_AVX512, _mm256_dpbusd_epi32)
#endif

// The block loop of the SIMD kernels: integer sums of 4 blocks at a time (ISUM4, one lane per
// block), float combination (COMBINE4) software-pipelined one group behind so that its latency
// overlaps the next group's integer work, and the last nb % 4 blocks with the scalar block code
// (which computes the same bits). Expects nb, bsz, x, y, planes, s in scope.
#define ATD_BLOCK_LOOP(ISUM_T, ISUM4, COMBINE4, BLOCK_SCALAR, YB)                                             \
    __m256d sumv = _mm256_setzero_pd();                                                                       \
    int     b    = 0;                                                                                         \
    if (nb >= 4) {                                                                                            \
        ISUM_T cur[ATD_MAX_PLANES];                                                                           \
        ISUM4(x, bsz, y, planes, cur);                                                                        \
        for (b = 4; b + 4 <= nb; b += 4) {                                                                    \
            ISUM_T next[ATD_MAX_PLANES];                                                                      \
            ISUM4(x + (size_t)b * bsz, bsz, y + (YB) * b, planes, next);                                      \
            sumv = COMBINE4(sumv, x + (size_t)(b - 4) * bsz, bsz, y + (YB) * (b - 4), cur, planes);           \
            ATD_UNROLL for (int i = 0; i < planes; ++i) cur[i] = next[i];                                     \
        }                                                                                                     \
        sumv = COMBINE4(sumv, x + (size_t)(b - 4) * bsz, bsz, y + (YB) * (b - 4), cur, planes);               \
    }                                                                                                         \
    double sum[4];                                                                                            \
    _mm256_storeu_pd(sum, sumv);                                                                              \
    for (; b < nb; ++b) {                                                                                     \
        sum[b & 3] += BLOCK_SCALAR(x + (size_t)b * bsz, y + (YB) * b, planes);                                \
    }                                                                                                         \
    *s = atd_dot_finish(sum);

// The AVX2 kernels, once per dot flavour. planes <= 2: reduce each plane over the 4 blocks;
// planes >= 3 (16 ymm registers would spill): reduce each block over its planes, then transpose.
#define ATD_DEFINE_AVX2_KERNELS(SFX, TARGET)                                                                 \
    /* integer plane sums of 4 blocks: isum[i] = [b0 b1 b2 b3] */                                          \
    TARGET ATD_INLINE void atd_isum4_256_##SFX(const uint8_t * x, size_t bsz, const block_q8_K * y,         \
                                               const int planes, __m128i * isum) {                         \
        const __m256i m3 = _mm256_set1_epi8(3);                                                             \
        __m256i       acc[4][ATD_MAX_PLANES];                                                               \
        ATD_UNROLL for (int g = 0; g < 4; ++g) {                                                            \
            const block_q8_K * yb  = y + g;                                                                 \
            const uint8_t *    blk = x + (size_t)g * bsz;                                                   \
            __m256i            q[8];                                                                        \
            for (int k = 0; k < 8; ++k) q[k] = _mm256_loadu_si256((const __m256i *)(yb->qs + 32 * k));       \
            /* sum q from the bsums, subtracted from every plane's sum: code c = t + 1 */                   \
            const __m256i init = atd_bsums256_##SFX(yb->bsums);                                             \
            ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                   \
                const uint8_t * qs = blk + 2 * planes + i * (QK_ATD / 4);                                   \
                const __m256i   c0 = _mm256_loadu_si256((const __m256i *)qs);                               \
                const __m256i   c1 = _mm256_loadu_si256((const __m256i *)(qs + 32));                        \
                __m256i         c[8];                                                                       \
                c[0]      = _mm256_and_si256(c0, m3);                                                       \
                c[1]      = _mm256_and_si256(c1, m3);                                                       \
                c[2]      = _mm256_and_si256(_mm256_srli_epi16(c0, 2), m3);                                 \
                c[3]      = _mm256_and_si256(_mm256_srli_epi16(c1, 2), m3);                                 \
                c[4]      = _mm256_and_si256(_mm256_srli_epi16(c0, 4), m3);                                 \
                c[5]      = _mm256_and_si256(_mm256_srli_epi16(c1, 4), m3);                                 \
                c[6]      = _mm256_and_si256(_mm256_srli_epi16(c0, 6), m3);                                 \
                c[7]      = _mm256_and_si256(_mm256_srli_epi16(c1, 6), m3);                                 \
                acc[g][i] = atd_dot256_##SFX(init, c, q);                                                   \
            }                                                                                               \
            if (planes >= 3) {                                                                              \
                const __m256i z = _mm256_setzero_si256();                                                   \
                isum[g] = atd_hsum4_epi32(acc[g][0], acc[g][1], acc[g][2], planes == 4 ? acc[g][3] : z);     \
            }                                                                                               \
        }                                                                                                   \
        if (planes >= 3) {                                                                                  \
            atd_transpose4_epi32(isum);                                                                     \
        } else {                                                                                            \
            ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                   \
                isum[i] = atd_hsum4_epi32(acc[0][i], acc[1][i], acc[2][i], acc[3][i]);                      \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
    /* integer plane sums of 4 blocks: isum[i] = [b0lo b0hi b1lo b1hi | b2lo b2hi b3lo b3hi] */            \
    TARGET ATD_INLINE void atd_isum4_64_##SFX(const uint8_t * x, size_t bsz, const block_q8_0 * y,          \
                                              const int planes, __m256i * isum) {                          \
        const __m256i m3  = _mm256_set1_epi8(3);                                                            \
        const __m256i one = _mm256_set1_epi8(1);                                                            \
        /* 32-bit lane shifts: low 128 bits 0 (or 4), high 128 bits 2 (or 6) */                             \
        const __m256i shlo = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);                                     \
        const __m256i shhi = _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6);                                     \
        __m256i       acc[4][ATD_MAX_PLANES];                                                               \
        ATD_UNROLL for (int g = 0; g < 4; ++g) {                                                            \
            const block_q8_0 * y0  = y + 2 * g;                                                             \
            const uint8_t *    blk = x + (size_t)g * bsz;                                                   \
            const __m256i      qlo = _mm256_loadu_si256((const __m256i *)y0[0].qs);                         \
            const __m256i      qhi = _mm256_loadu_si256((const __m256i *)y0[1].qs);                         \
            /* -sum q: a plane of codes 1, negated */                                                       \
            const __m256i init = _mm256_sub_epi32(_mm256_setzero_si256(),                                   \
                                                  atd_dot64_##SFX(_mm256_setzero_si256(), one, qlo, one, qhi)); \
            ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                   \
                const __m256i c = _mm256_broadcastsi128_si256(                                              \
                    _mm_loadu_si128((const __m128i *)(blk + 2 * planes + i * (QK_ATD_64 / 4))));            \
                const __m256i clo = _mm256_and_si256(_mm256_srlv_epi32(c, shlo), m3); /* el. 0..31 */       \
                const __m256i chi = _mm256_and_si256(_mm256_srlv_epi32(c, shhi), m3); /* el. 32..63 */      \
                acc[g][i]         = atd_dot64_##SFX(init, clo, qlo, chi, qhi);                              \
            }                                                                                               \
            if (planes >= 3) {                                                                              \
                const __m256i z = _mm256_setzero_si256();                                                   \
                isum[g] = atd_hsum4x2_epi32(acc[g][0], acc[g][1], acc[g][2], planes == 4 ? acc[g][3] : z);   \
            }                                                                                               \
        }                                                                                                   \
        if (planes >= 3) {                                                                                  \
            atd_transpose4_epi64(isum);                                                                     \
        } else {                                                                                            \
            ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                   \
                isum[i] = atd_hsum4x2_epi32(acc[0][i], acc[1][i], acc[2][i], acc[3][i]);                    \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
    TARGET ATD_INLINE void atd_k256_##SFX(int n, float * s, const uint8_t * x, const block_q8_K * y,        \
                                          const int planes) {                                              \
        const int    nb  = n / QK_ATD;                                                                      \
        const size_t bsz = atd_dot_block_bytes(planes, QK_ATD);                                             \
        ATD_BLOCK_LOOP(__m128i, atd_isum4_256_##SFX, atd_combine4_256, atd_dot_block_256_scalar, 1)          \
    }                                                                                                       \
    TARGET ATD_INLINE void atd_k64_##SFX(int n, float * s, const uint8_t * x, const block_q8_0 * y,         \
                                         const int planes) {                                               \
        const int    nb  = n / QK_ATD_64;                                                                   \
        const size_t bsz = atd_dot_block_bytes(planes, QK_ATD_64);                                          \
        ATD_BLOCK_LOOP(__m256i, atd_isum4_64_##SFX, atd_combine4_64, atd_dot_block_64_scalar, 2)             \
    }                                                                                                       \
    TARGET static void atd_vec_dot_avx2_##SFX(int n, float * s, const void * vx, const void * vy, int planes, \
                                              int block) {                                                 \
        const uint8_t * x = (const uint8_t *)vx;                                                            \
        if (block == QK_ATD) {                                                                              \
            const block_q8_K * y = (const block_q8_K *)vy;                                                  \
            switch (planes) {                                                                               \
                case 1: atd_k256_##SFX(n, s, x, y, 1); break;                                               \
                case 2: atd_k256_##SFX(n, s, x, y, 2); break;                                               \
                case 3: atd_k256_##SFX(n, s, x, y, 3); break;                                               \
                default: atd_k256_##SFX(n, s, x, y, 4); break;                                              \
            }                                                                                               \
        } else {                                                                                            \
            const block_q8_0 * y = (const block_q8_0 *)vy;                                                  \
            switch (planes) {                                                                               \
                case 1: atd_k64_##SFX(n, s, x, y, 1); break;                                                \
                case 2: atd_k64_##SFX(n, s, x, y, 2); break;                                                \
                case 3: atd_k64_##SFX(n, s, x, y, 3); break;                                                \
                default: atd_k64_##SFX(n, s, x, y, 4); break;                                               \
            }                                                                                               \
        }                                                                                                   \
    }

ATD_DEFINE_AVX2_KERNELS(mad, ATD_TARGET_AVX2)
#if defined(ATD_HAVE_AVXVNNI)
ATD_DEFINE_AVX2_KERNELS(vnni, ATD_TARGET_AVXVNNI)
#endif
#if defined(ATD_HAVE_AVX512)
ATD_DEFINE_AVX2_KERNELS(evex, ATD_TARGET_AVX512)
#endif

// ---- AVX-512 (F/BW/VL/VNNI, optionally GFNI) ----------------------------------------------------------------
//
// B = 256: one zmm holds a plane's 64 bytes; the codes of shift k are elements 64k..64k+63, which meet
// one zmm of natural-order activations in vpdpbusd. B = 64: the 16 plane bytes are broadcast to the four
// 128-bit lanes and lane j takes shift 2j: 64 natural-order codes against [q8_0 2b | q8_0 2b+1].
// Decoding a shift is srl + and, or one gf2p8affineqb (a bit-select matrix) where GFNI exists.
#if defined(ATD_HAVE_AVX512)

// 4 zmm of int32 -> [sum a, sum b, sum c, sum d]
ATD_TARGET_AVX512 ATD_INLINE __m128i atd_hsum4_epi32_512(__m512i a, __m512i b, __m512i c, __m512i d) {
    // 128-bit chunks: a0+a2 a1+a3 b0+b2 b1+b3
    const __m512i ab = _mm512_add_epi32(_mm512_shuffle_i64x2(a, b, 0x44), _mm512_shuffle_i64x2(a, b, 0xEE));
    const __m512i cd = _mm512_add_epi32(_mm512_shuffle_i64x2(c, d, 0x44), _mm512_shuffle_i64x2(c, d, 0xEE));
    // chunks: a b c d (4 partial sums each)
    __m512i t = _mm512_add_epi32(_mm512_shuffle_i64x2(ab, cd, 0x88), _mm512_shuffle_i64x2(ab, cd, 0xDD));
    t = _mm512_add_epi32(t, _mm512_shuffle_epi32(t, _MM_PERM_BADC));
    t = _mm512_add_epi32(t, _mm512_shuffle_epi32(t, _MM_PERM_CDAB));  // every lane of chunk j: its sum
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castsi512_si128(_mm512_permutexvar_epi32(idx, t));
}

// 4 zmm [lo: 8 lanes | hi: 8 lanes] -> [alo ahi blo bhi clo chi dlo dhi]
ATD_TARGET_AVX512 ATD_INLINE __m256i atd_hsum4x2_epi32_512(__m512i a, __m512i b, __m512i c, __m512i d) {
    // chunks: alo ahi blo bhi (4 partial sums each)
    const __m512i x = _mm512_add_epi32(_mm512_shuffle_i64x2(a, b, 0x88), _mm512_shuffle_i64x2(a, b, 0xDD));
    const __m512i y = _mm512_add_epi32(_mm512_shuffle_i64x2(c, d, 0x88), _mm512_shuffle_i64x2(c, d, 0xDD));
    __m512i       w = _mm512_add_epi32(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y));
    w = _mm512_add_epi32(w, _mm512_shuffle_epi32(w, _MM_PERM_BADC));  // chunk j: [sum x_j, sum y_j, ..]
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castsi512_si256(_mm512_permutexvar_epi32(idx, w));
}

// atd_combine4_64 with 512-bit doubles: fewer conversions and no 128-bit lane juggling
ATD_TARGET_AVX512 ATD_INLINE __m256d atd_combine4_64_512(__m256d sumv, const uint8_t * blk, size_t bsz,
                                                         const block_q8_0 * y, const __m256i * isum, int planes) {
    __m256 acc = _mm256_setzero_ps();  // b0lo b0hi b1lo b1hi b2lo b2hi b3lo b3hi
    for (int i = 0; i < planes; ++i) {
        const __m128i h = atd_alpha4_h(blk, bsz, i);
        const __m256  a = _mm256_cvtph_ps(_mm_unpacklo_epi16(h, h));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(a, _mm256_cvtepi32_ps(isum[i])));  // exact: |isum| <= 4096
    }
    const uint8_t * yd = (const uint8_t *)&y[0].d;
    const __m128i   hd = _mm_set_epi64x((long long)atd_pack4_u16(yd + 4 * sizeof(block_q8_0), sizeof(block_q8_0)),
                                        (long long)atd_pack4_u16(yd, sizeof(block_q8_0)));
    const __m512d p = _mm512_mul_pd(_mm512_cvtps_pd(_mm256_cvtph_ps(hd)), _mm512_cvtps_pd(acc));  // exact
    const __m512d q = _mm512_add_pd(p, _mm512_permute_pd(p, 0x55));  // lo + hi in both lanes of a block
    const __m512i idx = _mm512_setr_epi64(0, 2, 4, 6, 0, 0, 0, 0);
    return _mm256_add_pd(sumv, _mm512_castpd512_pd256(_mm512_permutexvar_pd(idx, q)));
}

// 2-bit field k of every byte, as 0..3
ATD_TARGET_AVX512 ATD_INLINE __m512i atd_codes512_sh(__m512i c, int k) {
    const __m512i m3 = _mm512_set1_epi8(3);
    switch (k) {
        case 0: return _mm512_and_si512(c, m3);
        case 1: return _mm512_and_si512(_mm512_srli_epi16(c, 2), m3);
        case 2: return _mm512_and_si512(_mm512_srli_epi16(c, 4), m3);
        default: return _mm512_and_si512(_mm512_srli_epi16(c, 6), m3);
    }
}
// B = 64: 128-bit lane j gets field j
ATD_TARGET_AVX512 ATD_INLINE __m512i atd_codes512x4_sh(__m512i c) {
    return _mm512_and_si512(_mm512_srlv_epi64(c, _mm512_setr_epi64(0, 0, 2, 2, 4, 4, 6, 6)), _mm512_set1_epi8(3));
}

#if defined(ATD_HAVE_GFNI)
// gf2p8affineqb: result bit r of each byte = parity(matrix byte (7 - r) & input byte), so bits 2k and
// 2k+1 go to bits 0 and 1 with matrix bytes 7 and 6 = 1 << 2k and 1 << (2k+1)
#define ATD_GF_SEL(k) ((int64_t)((1ull << (56 + 2 * (k))) | (1ull << (48 + 2 * (k) + 1))))
ATD_TARGET_AVX512_GFNI ATD_INLINE __m512i atd_codes512_gf(__m512i c, int k) {
    if (k == 0) {
        return _mm512_and_si512(c, _mm512_set1_epi8(3));
    }
    return _mm512_gf2p8affine_epi64_epi8(c, _mm512_set1_epi64(ATD_GF_SEL(k)), 0);
}
ATD_TARGET_AVX512_GFNI ATD_INLINE __m512i atd_codes512x4_gf(__m512i c) {
    const __m512i sel = _mm512_setr_epi64(ATD_GF_SEL(0), ATD_GF_SEL(0), ATD_GF_SEL(1), ATD_GF_SEL(1), ATD_GF_SEL(2),
                                          ATD_GF_SEL(2), ATD_GF_SEL(3), ATD_GF_SEL(3));
    return _mm512_gf2p8affine_epi64_epi8(c, sel, 0);
}
#endif

#define ATD_DEFINE_AVX512_KERNELS(SFX, TARGET)                                                               \
    /* integer plane sums of blocks b..b+3: isum[i] = [b0 b1 b2 b3] */                                    \
    TARGET ATD_INLINE void atd_isum4_256_avx512_##SFX(const uint8_t * x, size_t bsz, const block_q8_K * y, \
                                                      const int planes, __m128i * isum) {                  \
        __m512i acc[4][ATD_MAX_PLANES];                                                                     \
        ATD_UNROLL for (int g = 0; g < 4; ++g) {                                                            \
            const block_q8_K * yb  = y + g;                                                                 \
            const uint8_t *    blk = x + (size_t)g * bsz;                                                   \
            /* activations loaded once, reused by every plane */                                            \
            const __m512i q0 = _mm512_loadu_si512((const void *)(yb->qs + 0));                              \
            const __m512i q1 = _mm512_loadu_si512((const void *)(yb->qs + 64));                             \
            const __m512i q2 = _mm512_loadu_si512((const void *)(yb->qs + 128));                            \
            const __m512i q3 = _mm512_loadu_si512((const void *)(yb->qs + 192));                            \
            /* -sum q (from bsums) starts every plane's sum: code c = t + 1 */                              \
            const __m512i init = _mm512_zextsi256_si512(                                                    \
                _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)yb->bsums), _mm256_set1_epi16(-1)));  \
            ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                   \
                const __m512i c  = _mm512_loadu_si512((const void *)(blk + 2 * planes + i * (QK_ATD / 4))); \
                __m512i       a0 = _mm512_dpbusd_epi32(init, atd_codes512_##SFX(c, 0), q0);                 \
                a0               = _mm512_dpbusd_epi32(a0, atd_codes512_##SFX(c, 1), q1);                   \
                a0               = _mm512_dpbusd_epi32(a0, atd_codes512_##SFX(c, 2), q2);                   \
                acc[g][i]        = _mm512_dpbusd_epi32(a0, atd_codes512_##SFX(c, 3), q3);                   \
            }                                                                                               \
        }                                                                                                   \
        ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                       \
            isum[i] = atd_hsum4_epi32_512(acc[0][i], acc[1][i], acc[2][i], acc[3][i]);                      \
        }                                                                                                   \
    }                                                                                                       \
    TARGET ATD_INLINE void atd_k256_avx512_##SFX(int n, float * s, const uint8_t * x, const block_q8_K * y, \
                                                 const int planes) {                                       \
        const int    nb  = n / QK_ATD;                                                                      \
        const size_t bsz = atd_dot_block_bytes(planes, QK_ATD);                                             \
        ATD_BLOCK_LOOP(__m128i, atd_isum4_256_avx512_##SFX, atd_combine4_256, atd_dot_block_256_scalar, 1)   \
    }                                                                                                       \
    /* integer plane sums of blocks b..b+3: isum[i] = [b0lo b0hi b1lo ... b3hi] */                        \
    TARGET ATD_INLINE void atd_isum4_64_avx512_##SFX(const uint8_t * x, size_t bsz, const block_q8_0 * y,  \
                                                     const int planes, __m256i * isum) {                   \
        __m512i acc[4][ATD_MAX_PLANES];                                                                     \
        ATD_UNROLL for (int g = 0; g < 4; ++g) {                                                            \
            const block_q8_0 * y0  = y + 2 * g;                                                             \
            const uint8_t *    blk = x + (size_t)g * bsz;                                                   \
            const __m512i      q   = _mm512_inserti64x4(                                                    \
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)y0[0].qs)),                      \
                _mm256_loadu_si256((const __m256i *)y0[1].qs), 1);                                          \
            /* -sum q per 32: a plane of codes 1, negated */                                                \
            const __m512i init = _mm512_sub_epi32(                                                          \
                _mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), q)); \
            ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                   \
                const __m512i c = _mm512_broadcast_i32x4(                                                   \
                    _mm_loadu_si128((const __m128i *)(blk + 2 * planes + i * (QK_ATD_64 / 4))));            \
                acc[g][i] = _mm512_dpbusd_epi32(init, atd_codes512x4_##SFX(c), q);                          \
            }                                                                                               \
        }                                                                                                   \
        ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                       \
            isum[i] = atd_hsum4x2_epi32_512(acc[0][i], acc[1][i], acc[2][i], acc[3][i]);                    \
        }                                                                                                   \
    }                                                                                                       \
    TARGET ATD_INLINE void atd_k64_avx512_##SFX(int n, float * s, const uint8_t * x, const block_q8_0 * y,  \
                                                const int planes) {                                        \
        const int    nb  = n / QK_ATD_64;                                                                   \
        const size_t bsz = atd_dot_block_bytes(planes, QK_ATD_64);                                          \
        ATD_BLOCK_LOOP(__m256i, atd_isum4_64_avx512_##SFX, atd_combine4_64_512, atd_dot_block_64_scalar, 2)  \
    }                                                                                                       \
    TARGET static void atd_vec_dot_avx512_##SFX(int n, float * s, const void * vx, const void * vy,         \
                                                int planes, int block) {                                   \
        const uint8_t * x = (const uint8_t *)vx;                                                            \
        if (block == QK_ATD) {                                                                              \
            const block_q8_K * y = (const block_q8_K *)vy;                                                  \
            switch (planes) {                                                                               \
                case 1: atd_k256_avx512_##SFX(n, s, x, y, 1); break;                                        \
                case 2: atd_k256_avx512_##SFX(n, s, x, y, 2); break;                                        \
                case 3: atd_k256_avx512_##SFX(n, s, x, y, 3); break;                                        \
                default: atd_k256_avx512_##SFX(n, s, x, y, 4); break;                                       \
            }                                                                                               \
        } else {                                                                                            \
            const block_q8_0 * y = (const block_q8_0 *)vy;                                                  \
            switch (planes) {                                                                               \
                case 1: atd_k64_avx512_##SFX(n, s, x, y, 1); break;                                         \
                case 2: atd_k64_avx512_##SFX(n, s, x, y, 2); break;                                         \
                case 3: atd_k64_avx512_##SFX(n, s, x, y, 3); break;                                         \
                default: atd_k64_avx512_##SFX(n, s, x, y, 4); break;                                        \
            }                                                                                               \
        }                                                                                                   \
    }

ATD_DEFINE_AVX512_KERNELS(sh, ATD_TARGET_AVX512)
#if defined(ATD_HAVE_GFNI)
ATD_DEFINE_AVX512_KERNELS(gf, ATD_TARGET_AVX512_GFNI)
#endif
#endif  // ATD_HAVE_AVX512
#endif  // ATD_HAVE_AVX2

// ---- NEON ------------------------------------------------------------------------------------------------
//
// Per block: the integer plane sums with NEON (sdot when the CPU has it, else widening multiplies),
// then the scalar float combination, so results equal the scalar path bit for bit.
#if defined(__ARM_NEON) && !defined(ATD_X86)
#include <arm_neon.h>
#define ATD_HAVE_NEON 1

static inline int32x4_t atd_neon_dot(int32x4_t acc, uint8x16_t codes, int8x16_t q) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, vreinterpretq_s8_u8(codes), q);  // codes 0..2 are valid int8
#else
    const int8x16_t c = vreinterpretq_s8_u8(codes);
    int16x8_t       p = vmull_s8(vget_low_s8(c), vget_low_s8(q));
    p                 = vmlal_s8(p, vget_high_s8(c), vget_high_s8(q));  // |.| <= 2 * 2 * 128
    return vpadalq_s16(acc, p);
#endif
}

static void atd_vec_dot_neon(int n, float * s, const void * vx, const void * vy, int planes, int block) {
    const uint8_t *  x  = (const uint8_t *)vx;
    const uint8x16_t m3 = vdupq_n_u8(3);
    double           sum[4] = { 0.0, 0.0, 0.0, 0.0 };
    if (block == QK_ATD) {
        const block_q8_K * y   = (const block_q8_K *)vy;
        const int          nb  = n / QK_ATD;
        const size_t       bsz = atd_dot_block_bytes(planes, QK_ATD);
        for (int b = 0; b < nb; ++b) {
            const uint8_t * blk = x + (size_t)b * bsz;
            int8x16_t       q[16];  // element 16m + e; shift k covers q[4k .. 4k+3]
            for (int m = 0; m < 16; ++m) q[m] = vld1q_s8(y[b].qs + 16 * m);
            const int32_t sumq = vaddvq_s32(vaddq_s32(vpaddlq_s16(vld1q_s16(y[b].bsums)),
                                                      vpaddlq_s16(vld1q_s16(y[b].bsums + 8))));
            int32_t isum[ATD_MAX_PLANES];
            for (int i = 0; i < planes; ++i) {
                const uint8_t * qs  = blk + 2 * planes + i * (QK_ATD / 4);
                int32x4_t       acc = vdupq_n_s32(0);
                for (int m = 0; m < 4; ++m) {
                    const uint8x16_t v = vld1q_u8(qs + 16 * m);
                    acc = atd_neon_dot(acc, vandq_u8(v, m3), q[m]);
                    acc = atd_neon_dot(acc, vandq_u8(vshrq_n_u8(v, 2), m3), q[4 + m]);
                    acc = atd_neon_dot(acc, vandq_u8(vshrq_n_u8(v, 4), m3), q[8 + m]);
                    acc = atd_neon_dot(acc, vshrq_n_u8(v, 6), q[12 + m]);  // top bits need no mask
                }
                isum[i] = vaddvq_s32(acc) - sumq;
            }
            sum[b & 3] += atd_dot_part_256(blk, y[b].d, isum, planes);
        }
    } else {
        const block_q8_0 * y   = (const block_q8_0 *)vy;
        const int          nb  = n / QK_ATD_64;
        const size_t       bsz = atd_dot_block_bytes(planes, QK_ATD_64);
        for (int b = 0; b < nb; ++b) {
            const uint8_t *    blk = x + (size_t)b * bsz;
            const block_q8_0 * y0  = y + 2 * b;
            const int8x16_t    q0 = vld1q_s8(y0[0].qs), q1 = vld1q_s8(y0[0].qs + 16);
            const int8x16_t    q2 = vld1q_s8(y0[1].qs), q3 = vld1q_s8(y0[1].qs + 16);
            const int32_t      sumq0 = vaddlvq_s8(q0) + vaddlvq_s8(q1);
            const int32_t      sumq1 = vaddlvq_s8(q2) + vaddlvq_s8(q3);
            int32_t            isum0[ATD_MAX_PLANES], isum1[ATD_MAX_PLANES];
            for (int i = 0; i < planes; ++i) {
                const uint8x16_t v  = vld1q_u8(blk + 2 * planes + i * (QK_ATD_64 / 4));
                int32x4_t        a0 = atd_neon_dot(vdupq_n_s32(0), vandq_u8(v, m3), q0);
                a0 = atd_neon_dot(a0, vandq_u8(vshrq_n_u8(v, 2), m3), q1);
                int32x4_t a1 = atd_neon_dot(vdupq_n_s32(0), vandq_u8(vshrq_n_u8(v, 4), m3), q2);
                a1 = atd_neon_dot(a1, vshrq_n_u8(v, 6), q3);
                isum0[i] = vaddvq_s32(a0) - sumq0;
                isum1[i] = vaddvq_s32(a1) - sumq1;
            }
            sum[b & 3] += atd_dot_part_64(blk, atd_dot_h2f(y0[0].d), atd_dot_h2f(y0[1].d), isum0, isum1, planes);
        }
    }
    *s = atd_dot_finish(sum);
}
#endif  // NEON

// Dispatch state is probed lazily and may be touched by several ggml threads at once: relaxed
// atomics where the compiler has them (every thread computes and stores the same values).
#if defined(__GNUC__) || defined(__clang__)
#define ATD_LOAD(v)     __atomic_load_n(&(v), __ATOMIC_RELAXED)
#define ATD_STORE(v, x) __atomic_store_n(&(v), (x), __ATOMIC_RELAXED)
#else
#define ATD_LOAD(v)     (v)
#define ATD_STORE(v, x) ((v) = (x))
#endif

// ---- dispatch ----------------------------------------------------------------------------------------
//
// Variants inside a path (tests force them with atd_dot_set_variant):
//   AVX2:    1 maddubs, 2 AVX-VNNI, 3 AVX512-VL vpdpbusd on ymm (a stand-in for 2 on AVX-512 CPUs)
//   AVX-512: 1 shift+and decode, 2 GFNI decode
// 0 = the best the CPU has.
static int atd_dot_variant[ATD_PATH_NEON + 1];

#if defined(ATD_HAVE_AVX2)
static int atd_dot_cpu_has(const char * feature) {
#if ATD_RUNTIME_DISPATCH
    __builtin_cpu_init();
    // __builtin_cpu_supports needs string literals
    if (strcmp(feature, "avx2") == 0) {
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }
    if (strcmp(feature, "avx512") == 0) {
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    }
    if (strcmp(feature, "avxvnni") == 0) {
        return __builtin_cpu_supports("avxvnni");
    }
    if (strcmp(feature, "gfni") == 0) {
        return __builtin_cpu_supports("gfni");
    }
    return 0;
#else
    (void)feature;
    return 1;  // compile-time selection: compiled means runnable
#endif
}
#endif

static int atd_dot_path_probe(int path) {
    switch (path) {
        case ATD_PATH_SCALAR:
            return 1;
#if defined(ATD_HAVE_AVX2)
        case ATD_PATH_AVX2:
            return atd_dot_cpu_has("avx2");
#endif
#if defined(ATD_HAVE_AVX512)
        case ATD_PATH_AVX512:
            return atd_dot_cpu_has("avx2") && atd_dot_cpu_has("avx512");
#endif
#if defined(ATD_HAVE_NEON)
        case ATD_PATH_NEON:
            return 1;
#endif
        default:
            return 0;
    }
}

static signed char atd_dot_avail[ATD_PATH_NEON + 1] = { -1, -1, -1, -1, -1 };

int atd_path_available(int path) {
    if (path < ATD_PATH_SCALAR || path > ATD_PATH_NEON) {
        return 0;
    }
    int v = ATD_LOAD(atd_dot_avail[path]);
    if (v < 0) {
        v = atd_dot_path_probe(path);
        ATD_STORE(atd_dot_avail[path], (signed char)v);
    }
    return v;
}

static int atd_dot_variant_ok(int path, int v) {
    if (!atd_path_available(path)) {
        return 0;
    }
    if (path == ATD_PATH_AVX2) {
#if defined(ATD_HAVE_AVXVNNI)
        if (v == 2) return atd_dot_cpu_has("avxvnni");
#endif
#if defined(ATD_HAVE_AVX512)
        if (v == 3) return atd_path_available(ATD_PATH_AVX512);
#endif
        return v == 1;
    }
    if (path == ATD_PATH_AVX512) {
#if defined(ATD_HAVE_GFNI)
        if (v == 2) return atd_dot_cpu_has("gfni");
#endif
        return v == 1;
    }
    return v == 1;
}

static int atd_dot_best_variant_probe(int path) {
    if (path == ATD_PATH_AVX2 || path == ATD_PATH_AVX512) {
        return atd_dot_variant_ok(path, 2) ? 2 : 1;
    }
    return 1;
}

static signed char atd_dot_best_var[ATD_PATH_NEON + 1];  // 0: not probed yet

static int atd_dot_best_variant(int path) {
    int v = ATD_LOAD(atd_dot_best_var[path]);
    if (v == 0) {
        v = atd_dot_best_variant_probe(path);
        ATD_STORE(atd_dot_best_var[path], (signed char)v);
    }
    return v;
}

// internal test hook (declared by ggml-ext/tests/atd_dot_test.c, not in atd.h): 1 if runnable
int atd_dot_set_variant(int path, int variant);
int atd_dot_set_variant(int path, int variant) {
    if (path < ATD_PATH_SCALAR || path > ATD_PATH_NEON || (variant != 0 && !atd_dot_variant_ok(path, variant))) {
        return 0;
    }
    ATD_STORE(atd_dot_variant[path], variant);
    return 1;
}

static int atd_dot_best_path(void) {
    static const int order[] = { ATD_PATH_AVX512, ATD_PATH_AVX2, ATD_PATH_NEON };
    for (size_t k = 0; k < sizeof order / sizeof order[0]; ++k) {
        if (atd_path_available(order[k])) {
            return order[k];
        }
    }
    return ATD_PATH_SCALAR;
}

static int atd_dot_best   = -1;  // cached atd_dot_best_path()
static int atd_dot_forced = ATD_PATH_AUTO;

int atd_selected_path(void) {
    const int forced = ATD_LOAD(atd_dot_forced);
    if (forced != ATD_PATH_AUTO) {
        return forced;
    }
    int best = ATD_LOAD(atd_dot_best);
    if (best < 0) {
        best = atd_dot_best_path();
        ATD_STORE(atd_dot_best, best);
    }
    return best;
}

void atd_set_path(int path) {
    // an unavailable path means AUTO, so atd_vec_dot never runs code the CPU lacks
    ATD_STORE(atd_dot_forced, (path != ATD_PATH_AUTO && atd_path_available(path)) ? path : ATD_PATH_AUTO);
}

void atd_vec_dot_path(int n, float * s, const void * vx, const void * vy, int planes, int block, int path) {
    if (path == ATD_PATH_AUTO || !atd_path_available(path)) {
        path = atd_selected_path();
    }
    const int forced_v = ATD_LOAD(atd_dot_variant[path]);
    const int v        = forced_v ? forced_v : atd_dot_best_variant(path);
    (void)v;
    switch (path) {
#if defined(ATD_HAVE_AVX512)
        case ATD_PATH_AVX512:
#if defined(ATD_HAVE_GFNI)
            if (v == 2) {
                atd_vec_dot_avx512_gf(n, s, vx, vy, planes, block);
                return;
            }
#endif
            atd_vec_dot_avx512_sh(n, s, vx, vy, planes, block);
            return;
#endif
#if defined(ATD_HAVE_AVX2)
        case ATD_PATH_AVX2:
#if defined(ATD_HAVE_AVXVNNI)
            if (v == 2) {
                atd_vec_dot_avx2_vnni(n, s, vx, vy, planes, block);
                return;
            }
#endif
#if defined(ATD_HAVE_AVX512)
            if (v == 3) {
                atd_vec_dot_avx2_evex(n, s, vx, vy, planes, block);
                return;
            }
#endif
            atd_vec_dot_avx2_mad(n, s, vx, vy, planes, block);
            return;
#endif
#if defined(ATD_HAVE_NEON)
        case ATD_PATH_NEON:
            atd_vec_dot_neon(n, s, vx, vy, planes, block);
            return;
#endif
        default:
            break;
    }
    if (block == QK_ATD) {
        atd_vec_dot_256_scalar(n, s, (const uint8_t *)vx, (const block_q8_K *)vy, planes);
    } else {
        atd_vec_dot_64_scalar(n, s, (const uint8_t *)vx, (const block_q8_0 *)vy, planes);
    }
}

void atd_vec_dot(int n, float * s, const void * vx, const void * vy, int planes, int block) {
    atd_vec_dot_path(n, s, vx, vy, planes, block, atd_selected_path());
}

// ---- reference activation quantizers ---------------------------------------------------------------

// q8_K: per 256 values, d = -max/127 where max is the signed value of largest magnitude (as ggml),
// q = nearest int of x/d clamped to 127, bsums = sums of 16.
void atd_quantize_row_q8_K_ref(const float * x, block_q8_K * y, int64_t k) {
    const int64_t nb = k / QK_K;
    for (int64_t b = 0; b < nb; ++b) {
        const float * xb   = x + b * QK_K;
        float         amax = 0.0f, vmax = 0.0f;
        for (int j = 0; j < QK_K; ++j) {
            const float a = fabsf(xb[j]);
            if (a > amax) {
                amax = a;
                vmax = xb[j];
            }
        }
        if (amax == 0.0f) {
            memset(&y[b], 0, sizeof(y[b]));
            continue;
        }
        const float iscale = -127.0f / vmax;
        for (int j = 0; j < QK_K; ++j) {
            int v = (int)nearbyintf(iscale * xb[j]);
            y[b].qs[j] = (int8_t)(v > 127 ? 127 : (v < -128 ? -128 : v));
        }
        for (int g = 0; g < QK_K / 16; ++g) {
            int sum = 0;
            for (int j = 0; j < 16; ++j) {
                sum += y[b].qs[g * 16 + j];
            }
            y[b].bsums[g] = (int16_t)sum;
        }
        y[b].d = 1.0f / iscale;
    }
}

// exact-enough fp32 -> fp16 (round to nearest even), local so this file has no link dependency
static uint16_t atd_dot_f2h(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    const uint32_t sign = (bits >> 16) & 0x8000u;
    const uint32_t absb = bits & 0x7fffffffu;
    if (absb >= 0x7f800000u) {  // inf / nan
        return (uint16_t)(sign | 0x7c00u | (absb > 0x7f800000u ? 0x200u : 0));
    }
    if (absb >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
        return (uint16_t)(sign | 0x7c00u);
    }
    if (absb < 0x38800000u) {  // below the smallest normal half: subnormal or zero
        // value = absb as float; half subnormal unit = 2^-24
        float    a;
        memcpy(&a, &absb, sizeof a);
        const float m = nearbyintf(a * 16777216.0f);  // exact scaling by 2^24, RNE
        return (uint16_t)(sign | (uint32_t)m);
    }
    // normal: keep 10 mantissa bits, RNE on the 13 dropped bits
    uint32_t       h    = ((absb >> 13) - (112u << 10));
    const uint32_t rest = absb & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) {
        h++;
    }
    return (uint16_t)(sign | h);
}

// q8_0: per 32 values, d = amax/127, q = nearest int of x/d (as ggml's reference)
void atd_quantize_row_q8_0_ref(const float * x, block_q8_0 * y, int64_t k) {
    const int64_t nb = k / QK8_0;
    for (int64_t b = 0; b < nb; ++b) {
        const float * xb   = x + b * QK8_0;
        float         amax = 0.0f;
        for (int j = 0; j < QK8_0; ++j) {
            const float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        const float d  = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = atd_dot_f2h(d);
        for (int j = 0; j < QK8_0; ++j) {
            y[b].qs[j] = (int8_t)nearbyintf(xb[j] * id);
        }
    }
}

// ---- ggml-style wrappers -------------------------------------------------------------------------

#define ATD_DOT_WRAPPER(name, N, B, vtype)                                                               \
    void ggml_vec_dot_##name##_##vtype(int n, float * s, size_t bs, const void * vx, size_t bx,         \
                                       const void * vy, size_t by, int nrc) {                          \
        (void)bs; (void)bx; (void)by; (void)nrc;                                                        \
        atd_vec_dot(n, s, vx, vy, N, B);                                                                \
    }
ATD_DOT_WRAPPER(atd1, 1, QK_ATD, q8_K)
ATD_DOT_WRAPPER(atd2, 2, QK_ATD, q8_K)
ATD_DOT_WRAPPER(atd3, 3, QK_ATD, q8_K)
ATD_DOT_WRAPPER(atd4, 4, QK_ATD, q8_K)
ATD_DOT_WRAPPER(atd1_64, 1, QK_ATD_64, q8_0)
ATD_DOT_WRAPPER(atd2_64, 2, QK_ATD_64, q8_0)
ATD_DOT_WRAPPER(atd3_64, 3, QK_ATD_64, q8_0)
ATD_DOT_WRAPPER(atd4_64, 4, QK_ATD_64, q8_0)
#undef ATD_DOT_WRAPPER

