// ATD x q8 dot products (the vec_dot kernels of atd.h) and their dispatch (format version 2).
//
//   sum_e w_e x_e = sum_blocks d_y * sum_i alpha_i * sum_e t_ie q_e,   t = code - 1
//
// B = 256 blocks meet one q8_K block (natural order: digit k of plane byte j pairs with q[52k + j];
// the bsums give sum q). B = 64 blocks meet one block_atd_q8_64 (a scale per 32), whose activations
// are stored in 16-byte groups by digit (atd.h), with the sum of each half. Decoding a base-3 byte b: in a
// 16-bit lane holding b << 8, mulhi(lane, 3) is the top digit and lane * 3 moves to the next one
// (docs/atd-format.md §8). Padding slots hold code 0, so whatever activation they meet adds 0.
//
// Paths: scalar reference (always), AVX2 (maddubs, or vpdpbusd with AVX-VNNI / AVX512-VL), AVX-512
// (F/BW/VL/VNNI), NEON. Every path computes the exact integer plane sums and then the same float
// combination (below), so all paths return the same bits and tests compare them with ==.
#include "atd.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

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
        exp = 113;  // subnormal: normalize
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
    return (uint16_t)(p[0] | p[1] << 8);
}

#define ATD_S256 ATD_PLANE_BYTES(QK_ATD)     // 52
#define ATD_S64  ATD_PLANE_BYTES(QK_ATD_64)  // 13
#define ATD_CHUNK 64                          // blocks whose integer sums are kept at once
#define ATD_ISUMS (2 * ATD_MAX_PLANES)        // per block: isum[h * ATD_MAX_PLANES + i], half h, plane i

// ---- scalar reference ------------------------------------------------------------------------------
//
// The float combination, shared by every path. A block meets H activation scales d_y[h] (H = 1 for
// q8_K, H = 2 for atd_q8_64: one per 32 weights):
//   isum_hi = sum_{e in h} c_ie*q_e - sum_{e in h} q_e        (int32, exact; c = t + 1)
//   acc_h   = sum_i (double)alpha_i * (double)isum_hi         (plane order 0..N-1; products exact)
//   part    = (double)d_y[0] * (double)(float)acc_0  [+ (double)d_y[1] * (double)(float)acc_1]
//   sum[b % 4] += part;  result = (float)((sum0 + sum1) + (sum2 + sum3))
// Every product is exact in double (11 x 16 bits, 24 x 24 bits), so FMA contraction cannot change
// a result, and the additions happen in the same order in every path; the SIMD paths combine 4
// blocks at once (one block per double lane, lane b % 4).

static inline double atd_dot_part(const uint8_t * blk, const float * dy, const int32_t * isum, int planes,
                                  int halves) {
    double part = 0.0;
    for (int h = 0; h < halves; ++h) {
        double acc = 0.0;
        for (int i = 0; i < planes; ++i) {
            acc += (double)atd_dot_h2f(atd_dot_load_u16(blk + 2 * i)) * (double)isum[h * ATD_MAX_PLANES + i];
        }
        part += (double)dy[h] * (double)(float)acc;
    }
    return part;
}

static inline float atd_dot_finish(const double * sum) {
    return (float)((sum[0] + sum[1]) + (sum[2] + sum[3]));
}

static void atd_isum_256_scalar(const uint8_t * blk, const block_q8_K * yb, int planes, int32_t * isum) {
    int32_t sumq = 0;
    for (int j = 0; j < QK_K / 16; ++j) {
        sumq += yb->bsums[j];
    }
    for (int i = 0; i < planes; ++i) {
        const uint8_t * qs = blk + 2 * planes + i * ATD_S256;
        int32_t         s  = 0;
        for (int j = 0; j < ATD_S256; ++j) {
            for (int k = 0, e = j; k < ATD_TRITS_PER_BYTE && e < QK_ATD; ++k, e += ATD_S256) {
                s += atd_byte_digit(qs[j], k) * yb->qs[e];
            }
        }
        isum[i] = s - sumq;  // sum (t+1) q - sum q = sum t q
    }
}

static void atd_isum_64_scalar(const uint8_t * blk, const block_atd_q8_64 * yb, int planes, int32_t * isum) {
    for (int i = 0; i < planes; ++i) {
        const uint8_t * qs = blk + 2 * planes + i * ATD_S64;
        int32_t         s[2] = { 0, 0 };
        for (int e = 0; e < QK_ATD_64; ++e) {
            const int g = atd_q8_64_group(e), j = atd_q8_64_lane(e);
            s[g >= 3] += atd_byte_digit(qs[j], e / ATD_S64) * yb->qs[g][j];
        }
        isum[i]                  = s[0] - yb->sum[0];
        isum[ATD_MAX_PLANES + i] = s[1] - yb->sum[1];
    }
}

// the activation scales of block b (1 for q8_K, 2 for atd_q8_64)
static inline int atd_dot_halves(int block) {
    return block == QK_ATD ? 1 : 2;
}
static inline const float * atd_dot_dy(const void * vy, int block, int b) {
    return block == QK_ATD ? &((const block_q8_K *)vy)[b].d : ((const block_atd_q8_64 *)vy)[b].d;
}

static inline void atd_isum_scalar(const uint8_t * blk, const void * vy, int block, int b, int planes,
                                   int32_t * isum) {
    if (block == QK_ATD) {
        atd_isum_256_scalar(blk, (const block_q8_K *)vy + b, planes, isum);
    } else {
        atd_isum_64_scalar(blk, (const block_atd_q8_64 *)vy + b, planes, isum);
    }
}

static void atd_vec_dot_scalar(int n, float * s, const void * vx, const void * vy, int planes, int block) {
    const uint8_t * x   = (const uint8_t *)vx;
    const size_t    bsz = ATD_TYPE_SIZE(planes, block);
    double          sum[4] = { 0.0, 0.0, 0.0, 0.0 };
    for (int b = 0; b < n / block; ++b) {
        int32_t isum[ATD_ISUMS];
        atd_isum_scalar(x + (size_t)b * bsz, vy, block, b, planes, isum);
        sum[b & 3] += atd_dot_part(x + (size_t)b * bsz, atd_dot_dy(vy, block, b), isum, planes, atd_dot_halves(block));
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
#endif
#endif
#define ATD_TARGET_AVX2
#define ATD_TARGET_AVXVNNI
#define ATD_TARGET_AVX512
#elif defined(ATD_X86) && (defined(__GNUC__) || defined(__clang__))
#define ATD_RUNTIME_DISPATCH 1
#define ATD_HAVE_AVX2    1
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define ATD_HAVE_AVXVNNI 1  // the avxvnni target needs gcc 11 / clang 12
#endif
#define ATD_HAVE_AVX512  1
#define ATD_TARGET_AVX2    __attribute__((target("avx2,fma,f16c")))
#define ATD_TARGET_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define ATD_TARGET_AVX512  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#else
#define ATD_RUNTIME_DISPATCH 0
#endif

#if defined(ATD_HAVE_AVX2)
#include <immintrin.h>

#if defined(__GNUC__) || defined(__clang__)
#define ATD_INLINE static inline __attribute__((always_inline))
#define ATD_UNROLL _Pragma("GCC unroll 8")
#else
#define ATD_INLINE static inline
#define ATD_UNROLL
#endif

// ---- shared AVX2 pieces: reductions and the float combination --------------------------------------

// 4 vectors of 8 int32 -> [sum a, sum b, sum c, sum d]
ATD_TARGET_AVX2 ATD_INLINE __m128i atd_hsum4_epi32(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab   = _mm256_hadd_epi32(a, b);
    const __m256i cd   = _mm256_hadd_epi32(c, d);
    const __m256i abcd = _mm256_hadd_epi32(ab, cd);
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

// 4 fp16 packed into a 64-bit integer (scalar loads: the vector ports are the bottleneck here)
static inline uint64_t atd_pack4_u16(const uint8_t * p, size_t stride) {
    return (uint64_t)atd_dot_load_u16(p) | (uint64_t)atd_dot_load_u16(p + stride) << 16 |
           (uint64_t)atd_dot_load_u16(p + 2 * stride) << 32 | (uint64_t)atd_dot_load_u16(p + 3 * stride) << 48;
}

// 4 blocks' int32 sums of 4 planes (block-major rows) -> plane-major vectors [b0 b1 b2 b3]
ATD_TARGET_AVX2 ATD_INLINE void atd_transpose4(const int32_t * row0, size_t stride, __m128i * r) {
    for (int g = 0; g < 4; ++g) r[g] = _mm_load_si128((const __m128i *)(row0 + g * stride));
    const __m128i t0 = _mm_unpacklo_epi32(r[0], r[1]), t1 = _mm_unpacklo_epi32(r[2], r[3]);
    const __m128i t2 = _mm_unpackhi_epi32(r[0], r[1]), t3 = _mm_unpackhi_epi32(r[2], r[3]);
    r[0] = _mm_unpacklo_epi64(t0, t1);
    r[1] = _mm_unpackhi_epi64(t0, t1);
    r[2] = _mm_unpacklo_epi64(t2, t3);
    r[3] = _mm_unpackhi_epi64(t2, t3);
}

// atd_dot_part for blocks b..b+3 (lane g = block b+g), added to sumv; isum: [4][ATD_ISUMS]
ATD_TARGET_AVX2 ATD_INLINE __m256d atd_combine4(__m256d sumv, const uint8_t * blk, size_t bsz, const __m128 * dy,
                                                const int32_t (*isum)[ATD_ISUMS], int planes, int halves) {
    __m256d a[ATD_MAX_PLANES];
    for (int i = 0; i < planes; ++i) {
        const __m128i h16 = _mm_set_epi64x(0, (long long)atd_pack4_u16(blk + 2 * i, bsz));
        a[i] = _mm256_cvtps_pd(_mm_cvtph_ps(h16));  // exact
    }
    __m256d part = _mm256_setzero_pd();
    for (int h = 0; h < halves; ++h) {
        __m128i r[4];
        atd_transpose4(isum[0] + h * ATD_MAX_PLANES, ATD_ISUMS, r);
        __m256d acc = _mm256_setzero_pd();
        for (int i = 0; i < planes; ++i) {
            acc = _mm256_add_pd(acc, _mm256_mul_pd(a[i], _mm256_cvtepi32_pd(r[i])));  // exact products
        }
        const __m256d accf = _mm256_cvtps_pd(_mm256_cvtpd_ps(acc));  // (double)(float)acc
        part = _mm256_add_pd(part, _mm256_mul_pd(_mm256_cvtps_pd(dy[h]), accf));
    }
    return _mm256_add_pd(sumv, part);
}

// the combination over nb blocks whose integer sums are in isum; sum[4] is updated in place
ATD_TARGET_AVX2 ATD_INLINE void atd_combine_blocks(double * sum, const uint8_t * x, size_t bsz, const void * vy,
                                                   int block, int b0, int nb,
                                                   const int32_t (*isum)[ATD_ISUMS], int planes) {
    // b0 % 4 == 0, so lane g of a group is block (b0 + b + g) % 4
    const int halves = atd_dot_halves(block);
    __m256d   sumv   = _mm256_loadu_pd(sum);
    int       b      = 0;
    for (; b + 4 <= nb; b += 4) {
        const int j = b0 + b;
        __m128    dy[2];
        for (int h = 0; h < halves; ++h) {
            dy[h] = _mm_setr_ps(atd_dot_dy(vy, block, j)[h], atd_dot_dy(vy, block, j + 1)[h],
                                atd_dot_dy(vy, block, j + 2)[h], atd_dot_dy(vy, block, j + 3)[h]);
        }
        sumv = atd_combine4(sumv, x + (size_t)j * bsz, bsz, dy, isum + b, planes, halves);
    }
    _mm256_storeu_pd(sum, sumv);
    for (; b < nb; ++b) {
        const int j = b0 + b;
        sum[j & 3] += atd_dot_part(x + (size_t)j * bsz, atd_dot_dy(vy, block, j), isum[b], planes, halves);
    }
}

// ---- AVX2 ------------------------------------------------------------------------------------------------
//
// B = 256: a plane's 52 bytes are two 32-byte loads, bytes 0..31 and 20..51 (the second with lanes
// 0..11 cleared, so nothing is read beyond the plane); digit k of them meets q[52k + 0..31] and
// q[52k + 20..51]. B = 64: the plane (13 bytes + 3 that meet zero activations) goes to both 128-bit
// lanes, which take digits (0, 1), (2, 2), (3, 4) against activation groups (0, 1), (2, 3), (4, 5) by
// multiplying the byte by 3^k per lane first; groups 0..2 are the first half, 3..5 the second.
// Three flavours of the unsigned x signed byte dot:
//   mad:  maddubs (pairs: |.| <= 2*2*128), summed in int16 (<= 10 terms), one madd to int32;
//   vnni: vpdpbusd straight into int32 (AVX-VNNI);  evex: the AVX512-VL encoding of vpdpbusd.

// codes of the current digit of 32 bytes held as even lanes (b << 8) and odd lanes (b & 0xff00)
ATD_TARGET_AVX2 ATD_INLINE __m256i atd_digit256(__m256i ev, __m256i od) {
    const __m256i hi = _mm256_set1_epi16((short)0xff00);
    const __m256i ce = _mm256_mulhi_epu16(ev, _mm256_set1_epi16(3));    // code in the low byte
    const __m256i co = _mm256_mulhi_epu16(od, _mm256_set1_epi16(768));  // 3b: code in the high byte
    return _mm256_or_si256(ce, _mm256_and_si256(co, hi));
}
ATD_TARGET_AVX2 ATD_INLINE __m256i atd_times3_epi16(__m256i v) {
    return _mm256_add_epi16(_mm256_add_epi16(v, v), v);
}

#define ATD_AVX2_DOT_mad_T             __m256i
#define ATD_AVX2_DOT_mad_ZERO()        _mm256_setzero_si256()
#define ATD_AVX2_DOT_mad_ADD(a, c, q)  _mm256_add_epi16((a), _mm256_maddubs_epi16((c), (q)))
#define ATD_AVX2_DOT_mad_I32(a)        _mm256_madd_epi16((a), _mm256_set1_epi16(1))
#define ATD_AVX2_DOT_vnni_T            __m256i
#define ATD_AVX2_DOT_vnni_ZERO()       _mm256_setzero_si256()
#define ATD_AVX2_DOT_vnni_ADD(a, c, q) _mm256_dpbusd_avx_epi32((a), (c), (q))
#define ATD_AVX2_DOT_vnni_I32(a)       (a)
#define ATD_AVX2_DOT_evex_T            __m256i
#define ATD_AVX2_DOT_evex_ZERO()       _mm256_setzero_si256()
#define ATD_AVX2_DOT_evex_ADD(a, c, q) _mm256_dpbusd_epi32((a), (c), (q))
#define ATD_AVX2_DOT_evex_I32(a)       (a)

#define ATD_DEFINE_AVX2_KERNELS(SFX, TARGET)                                                                 \
    /* integer plane sums of one 256-block: out[i], i < planes */                                           \
    TARGET ATD_INLINE void atd_isum256_avx2_##SFX(const uint8_t * blk, const block_q8_K * yb, const int planes, \
                                                  int32_t * out) {                                         \
        const __m256i hi   = _mm256_set1_epi16((short)0xff00);                                              \
        const __m256i tail = _mm256_setr_epi32(0, 0, 0, -1, -1, -1, -1, -1); /* lanes 12..31 */              \
        __m256i       qa[ATD_TRITS_PER_BYTE], qb[ATD_TRITS_PER_BYTE];                                       \
        ATD_UNROLL for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {                                            \
            qa[k] = _mm256_loadu_si256((const __m256i *)(yb->qs + ATD_S256 * k));                           \
            qb[k] = _mm256_loadu_si256((const __m256i *)(yb->qs + ATD_S256 * k + 20));                      \
        }                                                                                                   \
        /* -sum q as 8 int32 pair sums of the bsums: the start of every plane's sum */                      \
        const __m256i init = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)yb->bsums),              \
                                               _mm256_set1_epi16(-1));                                      \
        __m256i acc[ATD_MAX_PLANES];                                                                        \
        ATD_UNROLL for (int i = 0; i < ATD_MAX_PLANES; ++i) acc[i] = _mm256_setzero_si256();                \
        ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                       \
            const uint8_t * p  = blk + 2 * planes + i * ATD_S256;                                           \
            const __m256i   A  = _mm256_loadu_si256((const __m256i *)p);                                    \
            const __m256i   B  = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(p + 20)), tail);     \
            __m256i         ea = _mm256_slli_epi16(A, 8), oa = _mm256_and_si256(A, hi);                    \
            __m256i         eb = _mm256_slli_epi16(B, 8), ob = _mm256_and_si256(B, hi);                    \
            ATD_AVX2_DOT_##SFX##_T a = ATD_AVX2_DOT_##SFX##_ZERO();                                         \
            ATD_UNROLL for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {                                        \
                a = ATD_AVX2_DOT_##SFX##_ADD(a, atd_digit256(ea, oa), qa[k]);                               \
                a = ATD_AVX2_DOT_##SFX##_ADD(a, atd_digit256(eb, ob), qb[k]);                               \
                if (k + 1 < ATD_TRITS_PER_BYTE) {                                                           \
                    ea = atd_times3_epi16(ea); oa = atd_times3_epi16(oa);                                   \
                    eb = atd_times3_epi16(eb); ob = atd_times3_epi16(ob);                                   \
                }                                                                                           \
            }                                                                                               \
            acc[i] = _mm256_add_epi32(init, ATD_AVX2_DOT_##SFX##_I32(a));                                   \
        }                                                                                                   \
        _mm_storeu_si128((__m128i *)out, atd_hsum4_epi32(acc[0], acc[1], acc[2], acc[3]));                  \
    }                                                                                                       \
    /* integer plane sums of one 64-block, out[h * 4 + i]; the 16-byte plane loads may read 3 bytes     \
       past the block: callers pass a padded copy for the last block of a row */                          \
    TARGET ATD_INLINE void atd_isum64_avx2_##SFX(const uint8_t * blk, const block_atd_q8_64 * yb,           \
                                                 const int planes, int32_t * out) {                        \
        const __m256i hi  = _mm256_set1_epi16((short)0xff00);                                               \
        const __m256i lo  = _mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0);                                  \
        const __m256i m01 = _mm256_setr_epi16(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3);              \
        const __m256i m22 = _mm256_set1_epi16(9);                                                           \
        const __m256i m34 = _mm256_setr_epi16(27, 27, 27, 27, 27, 27, 27, 27, 81, 81, 81, 81, 81, 81, 81, 81); \
        const __m256i g01 = _mm256_loadu_si256((const __m256i *)yb->qs[0]);                                 \
        const __m256i g23 = _mm256_loadu_si256((const __m256i *)yb->qs[2]);                                 \
        const __m256i g45 = _mm256_loadu_si256((const __m256i *)yb->qs[4]);                                 \
        __m256i h0[ATD_MAX_PLANES], h1[ATD_MAX_PLANES];                                                     \
        ATD_UNROLL for (int i = 0; i < ATD_MAX_PLANES; ++i) h0[i] = h1[i] = _mm256_setzero_si256();         \
        ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                       \
            const __m256i V  = _mm256_broadcastsi128_si256(                                                 \
                _mm_loadu_si128((const __m128i *)(blk + 2 * planes + i * ATD_S64)));                        \
            const __m256i ev = _mm256_slli_epi16(V, 8), od = _mm256_and_si256(V, hi);                      \
            ATD_AVX2_DOT_##SFX##_T a = ATD_AVX2_DOT_##SFX##_ADD(ATD_AVX2_DOT_##SFX##_ZERO(),                \
                atd_digit256(_mm256_mullo_epi16(ev, m01), _mm256_mullo_epi16(od, m01)), g01);               \
            ATD_AVX2_DOT_##SFX##_T b = ATD_AVX2_DOT_##SFX##_ADD(ATD_AVX2_DOT_##SFX##_ZERO(),                \
                atd_digit256(_mm256_mullo_epi16(ev, m22), _mm256_mullo_epi16(od, m22)), g23);               \
            ATD_AVX2_DOT_##SFX##_T c = ATD_AVX2_DOT_##SFX##_ADD(ATD_AVX2_DOT_##SFX##_ZERO(),                \
                atd_digit256(_mm256_mullo_epi16(ev, m34), _mm256_mullo_epi16(od, m34)), g45);               \
            const __m256i mid = ATD_AVX2_DOT_##SFX##_I32(b); /* low lane: half 0, high lane: half 1 */      \
            h0[i] = _mm256_add_epi32(ATD_AVX2_DOT_##SFX##_I32(a), _mm256_and_si256(mid, lo));               \
            h1[i] = _mm256_add_epi32(ATD_AVX2_DOT_##SFX##_I32(c), _mm256_andnot_si256(lo, mid));            \
        }                                                                                                   \
        const __m128i s0 = atd_hsum4_epi32(h0[0], h0[1], h0[2], h0[3]);                                     \
        const __m128i s1 = atd_hsum4_epi32(h1[0], h1[1], h1[2], h1[3]);                                     \
        _mm_storeu_si128((__m128i *)out, _mm_sub_epi32(s0, _mm_set1_epi32(yb->sum[0])));                    \
        _mm_storeu_si128((__m128i *)(out + ATD_MAX_PLANES), _mm_sub_epi32(s1, _mm_set1_epi32(yb->sum[1]))); \
    }                                                                                                       \
    TARGET ATD_INLINE void atd_k256_avx2_##SFX(int n, float * s, const uint8_t * x, const block_q8_K * y,   \
                                               const int planes) {                                         \
        const int    nb  = n / QK_ATD;                                                                      \
        const size_t bsz = ATD_TYPE_SIZE(planes, QK_ATD);                                                   \
        double       sum[4] = { 0.0, 0.0, 0.0, 0.0 };                                                       \
        _Alignas(16) int32_t isum[ATD_CHUNK][ATD_ISUMS];                                               \
        for (int b0 = 0; b0 < nb; b0 += ATD_CHUNK) {                                                        \
            const int m = nb - b0 < ATD_CHUNK ? nb - b0 : ATD_CHUNK;                                        \
            for (int b = 0; b < m; ++b) {                                                                   \
                atd_isum256_avx2_##SFX(x + (size_t)(b0 + b) * bsz, y + b0 + b, planes, isum[b]);            \
            }                                                                                               \
            atd_combine_blocks(sum, x, bsz, y, QK_ATD, b0, m, (const int32_t (*)[ATD_ISUMS])isum, planes); \
        }                                                                                                   \
        *s = atd_dot_finish(sum);                                                                           \
    }                                                                                                       \
    TARGET ATD_INLINE void atd_k64_avx2_##SFX(int n, float * s, const uint8_t * x, const block_atd_q8_64 * y, \
                                              const int planes) {                                          \
        const int    nb  = n / QK_ATD_64;                                                                   \
        const size_t bsz = ATD_TYPE_SIZE(planes, QK_ATD_64);                                                \
        double       sum[4] = { 0.0, 0.0, 0.0, 0.0 };                                                       \
        _Alignas(16) int32_t isum[ATD_CHUNK][ATD_ISUMS];                                               \
        uint8_t      last[ATD_TYPE_SIZE(ATD_MAX_PLANES, QK_ATD_64) + 16] = { 0 };                           \
        memcpy(last, x + (size_t)(nb - 1) * bsz, bsz); /* the last block, padded for 16-byte loads */      \
        for (int b0 = 0; b0 < nb; b0 += ATD_CHUNK) {                                                        \
            const int m = nb - b0 < ATD_CHUNK ? nb - b0 : ATD_CHUNK;                                        \
            for (int b = 0; b < m; ++b) {                                                                   \
                const uint8_t * blk = b0 + b == nb - 1 ? last : x + (size_t)(b0 + b) * bsz;                 \
                atd_isum64_avx2_##SFX(blk, y + b0 + b, planes, isum[b]);                                    \
            }                                                                                               \
            atd_combine_blocks(sum, x, bsz, y, QK_ATD_64, b0, m, (const int32_t (*)[ATD_ISUMS])isum, planes); \
        }                                                                                                   \
        *s = atd_dot_finish(sum);                                                                           \
    }                                                                                                       \
    TARGET static void atd_vec_dot_avx2_##SFX(int n, float * s, const void * vx, const void * vy, int planes, \
                                              int block) {                                                 \
        const uint8_t * x = (const uint8_t *)vx;                                                            \
        if (n < block) { *s = 0.0f; return; }                                                               \
        if (block == QK_ATD) {                                                                              \
            const block_q8_K * y = (const block_q8_K *)vy;                                                  \
            switch (planes) {                                                                               \
                case 1: atd_k256_avx2_##SFX(n, s, x, y, 1); break;                                          \
                case 2: atd_k256_avx2_##SFX(n, s, x, y, 2); break;                                          \
                case 3: atd_k256_avx2_##SFX(n, s, x, y, 3); break;                                          \
                default: atd_k256_avx2_##SFX(n, s, x, y, 4); break;                                         \
            }                                                                                               \
        } else {                                                                                            \
            const block_atd_q8_64 * y = (const block_atd_q8_64 *)vy;                                        \
            switch (planes) {                                                                               \
                case 1: atd_k64_avx2_##SFX(n, s, x, y, 1); break;                                           \
                case 2: atd_k64_avx2_##SFX(n, s, x, y, 2); break;                                           \
                case 3: atd_k64_avx2_##SFX(n, s, x, y, 3); break;                                           \
                default: atd_k64_avx2_##SFX(n, s, x, y, 4); break;                                          \
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

// ---- AVX-512 (F/BW/VL/VNNI) ------------------------------------------------------------------------------
//
// B = 256: one masked zmm load takes a plane's 52 bytes (lanes 52..63 zero); digit k meets the 64
// activations at q + 52k (lanes 52..63 meet code 0). B = 64: four blocks share a zmm, block g in
// 128-bit lane g (its 13 plane bytes, 3 that meet zero activations), each digit against
// [group of block 0 | block 1 | block 2 | block 3] (digit 2 against two groups, one per half).
#if defined(ATD_HAVE_AVX512)

ATD_TARGET_AVX512 ATD_INLINE __m512i atd_digit512(__m512i ev, __m512i od) {
    // (code in the low byte) | (3b & 0xff00): vpternlog A | (B & C)
    return _mm512_ternarylogic_epi32(_mm512_mulhi_epu16(ev, _mm512_set1_epi16(3)),
                                     _mm512_mulhi_epu16(od, _mm512_set1_epi16(768)),
                                     _mm512_set1_epi16((short)0xff00), 0xF8);
}
ATD_TARGET_AVX512 ATD_INLINE __m512i atd_times3_epi16_512(__m512i v) {
    return _mm512_add_epi16(_mm512_add_epi16(v, v), v);
}

// integer plane sums of one 256-block
ATD_TARGET_AVX512 ATD_INLINE void atd_isum256_avx512(const uint8_t * blk, const block_q8_K * yb, const int planes,
                                                     int32_t * out) {
    const __m512i   hi    = _mm512_set1_epi16((short)0xff00);
    const __mmask64 plane = (1ull << ATD_S256) - 1;
    __m512i         q[ATD_TRITS_PER_BYTE];
    ATD_UNROLL for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
        // reads up to qs + 272: inside the block (bsums follow qs); lanes >= 52 meet code 0
        q[k] = _mm512_loadu_si512((const void *)(yb->qs + ATD_S256 * k));
    }
    const __m512i init = _mm512_zextsi256_si512(
        _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)yb->bsums), _mm256_set1_epi16(-1)));
    __m256i acc[ATD_MAX_PLANES];
    ATD_UNROLL for (int i = 0; i < ATD_MAX_PLANES; ++i) acc[i] = _mm256_setzero_si256();
    ATD_UNROLL for (int i = 0; i < planes; ++i) {
        const __m512i P  = _mm512_maskz_loadu_epi8(plane, blk + 2 * planes + i * ATD_S256);
        __m512i       ev = _mm512_slli_epi16(P, 8), od = _mm512_and_si512(P, hi);
        __m512i       a  = _mm512_dpbusd_epi32(init, atd_digit512(ev, od), q[0]);
        ATD_UNROLL for (int k = 1; k < ATD_TRITS_PER_BYTE; ++k) {
            ev = atd_times3_epi16_512(ev);
            od = atd_times3_epi16_512(od);
            a  = _mm512_dpbusd_epi32(a, atd_digit512(ev, od), q[k]);
        }
        acc[i] = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
    }
    _mm_storeu_si128((__m128i *)out, atd_hsum4_epi32(acc[0], acc[1], acc[2], acc[3]));
}

// the int32 sum of each 128-bit lane of a (one block per lane): [s0 s1 s2 s3]
ATD_TARGET_AVX512 ATD_INLINE __m128i atd_lane_sums(__m512i a) {
    a = _mm512_add_epi32(a, _mm512_shuffle_epi32(a, _MM_PERM_BADC));
    a = _mm512_add_epi32(a, _mm512_shuffle_epi32(a, _MM_PERM_CDAB));
    return _mm512_castsi512_si128(
        _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), a));
}

// plane-major [b0 b1 b2 b3] of 4 planes -> out[g][off + i]
ATD_TARGET_AVX512 ATD_INLINE void atd_store_transposed(const __m128i * r, int32_t (*out)[ATD_ISUMS], int off) {
    const __m128i t0 = _mm_unpacklo_epi32(r[0], r[1]), t1 = _mm_unpacklo_epi32(r[2], r[3]);
    const __m128i t2 = _mm_unpackhi_epi32(r[0], r[1]), t3 = _mm_unpackhi_epi32(r[2], r[3]);
    _mm_storeu_si128((__m128i *)(out[0] + off), _mm_unpacklo_epi64(t0, t1));
    _mm_storeu_si128((__m128i *)(out[1] + off), _mm_unpackhi_epi64(t0, t1));
    _mm_storeu_si128((__m128i *)(out[2] + off), _mm_unpacklo_epi64(t2, t3));
    _mm_storeu_si128((__m128i *)(out[3] + off), _mm_unpackhi_epi64(t2, t3));
}

// activation group g of 4 blocks, one per 128-bit lane
ATD_TARGET_AVX512 ATD_INLINE __m512i atd_groups4(const block_atd_q8_64 * yb, int g) {
    return _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(
               _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)yb[0].qs[g])),
               _mm_loadu_si128((const __m128i *)yb[1].qs[g]), 1),
               _mm_loadu_si128((const __m128i *)yb[2].qs[g]), 2),
               _mm_loadu_si128((const __m128i *)yb[3].qs[g]), 3);
}

// integer plane sums of four 64-blocks (block g = blk + g * bsz): out[g][h * 4 + i]
ATD_TARGET_AVX512 ATD_INLINE void atd_isum64x4_avx512(const uint8_t * blk, size_t bsz, const block_atd_q8_64 * yb,
                                                      const int planes, int32_t (*out)[ATD_ISUMS]) {
    const __m512i hi = _mm512_set1_epi16((short)0xff00);
    __m512i       q[ATD_Q8_64_GROUPS];
    ATD_UNROLL for (int g = 0; g < ATD_Q8_64_GROUPS; ++g) q[g] = atd_groups4(yb, g);
    __m128i r0[ATD_MAX_PLANES], r1[ATD_MAX_PLANES];
    ATD_UNROLL for (int i = 0; i < ATD_MAX_PLANES; ++i) r0[i] = r1[i] = _mm_setzero_si128();
    ATD_UNROLL for (int i = 0; i < planes; ++i) {
        const uint8_t * p = blk + 2 * planes + i * ATD_S64;
        const __m512i   P = _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(
                                _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p)),
                                _mm_loadu_si128((const __m128i *)(p + bsz)), 1),
                                _mm_loadu_si128((const __m128i *)(p + 2 * bsz)), 2),
                                _mm_loadu_si128((const __m128i *)(p + 3 * bsz)), 3);
        __m512i       ev = _mm512_slli_epi16(P, 8), od = _mm512_and_si512(P, hi);
        // digits 0, 1 and the first part of 2 meet half 0; the rest of 2, and 3, 4 meet half 1
        __m512i a0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), atd_digit512(ev, od), q[0]);
        ev = atd_times3_epi16_512(ev);
        od = atd_times3_epi16_512(od);
        a0 = _mm512_dpbusd_epi32(a0, atd_digit512(ev, od), q[1]);
        ev = atd_times3_epi16_512(ev);
        od = atd_times3_epi16_512(od);
        const __m512i c2 = atd_digit512(ev, od);
        a0 = _mm512_dpbusd_epi32(a0, c2, q[2]);
        __m512i a1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c2, q[3]);
        ev = atd_times3_epi16_512(ev);
        od = atd_times3_epi16_512(od);
        a1 = _mm512_dpbusd_epi32(a1, atd_digit512(ev, od), q[4]);
        ev = atd_times3_epi16_512(ev);
        od = atd_times3_epi16_512(od);
        a1 = _mm512_dpbusd_epi32(a1, atd_digit512(ev, od), q[5]);
        r0[i] = atd_lane_sums(a0);
        r1[i] = atd_lane_sums(a1);
    }
    const __m128i sum0 = _mm_setr_epi32(yb[0].sum[0], yb[1].sum[0], yb[2].sum[0], yb[3].sum[0]);
    const __m128i sum1 = _mm_setr_epi32(yb[0].sum[1], yb[1].sum[1], yb[2].sum[1], yb[3].sum[1]);
    ATD_UNROLL for (int i = 0; i < planes; ++i) {
        r0[i] = _mm_sub_epi32(r0[i], sum0);
        r1[i] = _mm_sub_epi32(r1[i], sum1);
    }
    atd_store_transposed(r0, out, 0);
    atd_store_transposed(r1, out, ATD_MAX_PLANES);
}

ATD_TARGET_AVX512 ATD_INLINE void atd_k256_avx512(int n, float * s, const uint8_t * x, const block_q8_K * y,
                                                  const int planes) {
    const int    nb  = n / QK_ATD;
    const size_t bsz = ATD_TYPE_SIZE(planes, QK_ATD);
    double       sum[4] = { 0.0, 0.0, 0.0, 0.0 };
    _Alignas(16) int32_t isum[ATD_CHUNK][ATD_ISUMS];
    for (int b0 = 0; b0 < nb; b0 += ATD_CHUNK) {
        const int m = nb - b0 < ATD_CHUNK ? nb - b0 : ATD_CHUNK;
        for (int b = 0; b < m; ++b) {
            atd_isum256_avx512(x + (size_t)(b0 + b) * bsz, y + b0 + b, planes, isum[b]);
        }
        atd_combine_blocks(sum, x, bsz, y, QK_ATD, b0, m, (const int32_t (*)[ATD_ISUMS])isum, planes);
    }
    *s = atd_dot_finish(sum);
}

ATD_TARGET_AVX512 ATD_INLINE void atd_k64_avx512(int n, float * s, const uint8_t * x, const block_atd_q8_64 * y,
                                                 const int planes) {
    const int    nb  = n / QK_ATD_64;
    const size_t bsz = ATD_TYPE_SIZE(planes, QK_ATD_64);
    double       sum[4] = { 0.0, 0.0, 0.0, 0.0 };
    _Alignas(16) int32_t isum[ATD_CHUNK][ATD_ISUMS];
    // the last group of 4 (with blocks past the row end as zero blocks and zero activations):
    // a padded copy, so the 16-byte plane loads never read past the row
    const int       full = (nb - 1) / 4 * 4;  // blocks in groups that end before the last block
    uint8_t         tailx[4 * ATD_TYPE_SIZE(ATD_MAX_PLANES, QK_ATD_64) + 16] = { 0 };
    block_atd_q8_64 taily[4];
    memset(taily, 0, sizeof taily);
    memcpy(tailx, x + (size_t)full * bsz, (size_t)(nb - full) * bsz);
    memcpy(taily, y + full, (size_t)(nb - full) * sizeof(block_atd_q8_64));
    for (int b0 = 0; b0 < nb; b0 += ATD_CHUNK) {
        const int m = nb - b0 < ATD_CHUNK ? nb - b0 : ATD_CHUNK;
        for (int b = 0; b < m; b += 4) {
            const int j = b0 + b;
            if (j < full) {
                atd_isum64x4_avx512(x + (size_t)j * bsz, bsz, y + j, planes, isum + b);
            } else {
                atd_isum64x4_avx512(tailx, bsz, taily, planes, isum + b);
            }
        }
        atd_combine_blocks(sum, x, bsz, y, QK_ATD_64, b0, m, (const int32_t (*)[ATD_ISUMS])isum, planes);
    }
    *s = atd_dot_finish(sum);
}

ATD_TARGET_AVX512 static void atd_vec_dot_avx512(int n, float * s, const void * vx, const void * vy, int planes,
                                                 int block) {
    const uint8_t * x = (const uint8_t *)vx;
    if (n < block) {
        *s = 0.0f;
        return;
    }
    if (block == QK_ATD) {
        const block_q8_K * y = (const block_q8_K *)vy;
        switch (planes) {
            case 1: atd_k256_avx512(n, s, x, y, 1); break;
            case 2: atd_k256_avx512(n, s, x, y, 2); break;
            case 3: atd_k256_avx512(n, s, x, y, 3); break;
            default: atd_k256_avx512(n, s, x, y, 4); break;
        }
    } else {
        const block_atd_q8_64 * y = (const block_atd_q8_64 *)vy;
        switch (planes) {
            case 1: atd_k64_avx512(n, s, x, y, 1); break;
            case 2: atd_k64_avx512(n, s, x, y, 2); break;
            case 3: atd_k64_avx512(n, s, x, y, 3); break;
            default: atd_k64_avx512(n, s, x, y, 4); break;
        }
    }
}
#endif  // ATD_HAVE_AVX512
#endif  // ATD_HAVE_AVX2

// ---- NEON ------------------------------------------------------------------------------------------------
//
// Integer plane sums with NEON (8-bit multiplies decode the digits: x_k = b * 3^k mod 256, code =
// (x_k * 3) >> 8; sdot when the CPU has it, else widening multiplies), then the scalar float
// combination, so results equal the scalar path bit for bit.
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

// the top digit of 16 bytes
static inline uint8x16_t atd_neon_digit(uint8x16_t x) {
    const uint8x8_t three = vdup_n_u8(3);
    return vcombine_u8(vshrn_n_u16(vmull_u8(vget_low_u8(x), three), 8),
                       vshrn_n_u16(vmull_u8(vget_high_u8(x), three), 8));
}

// sum over 16 plane bytes (x) of their 5 digits times the activations at q + S*k
static inline int32x4_t atd_neon_bytes(int32x4_t acc, uint8x16_t x, const int8_t * q, int S) {
    const uint8x16_t three = vdupq_n_u8(3);
    for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
        acc = atd_neon_dot(acc, atd_neon_digit(x), vld1q_s8(q + S * k));
        x   = vmulq_u8(x, three);
    }
    return acc;
}

static void atd_vec_dot_neon(int n, float * s, const void * vx, const void * vy, int planes, int block) {
    const uint8_t * x   = (const uint8_t *)vx;
    const size_t    bsz = ATD_TYPE_SIZE(planes, block);
    double          sum[4] = { 0.0, 0.0, 0.0, 0.0 };
    for (int b = 0; b < n / block; ++b) {
        const uint8_t * blk = x + (size_t)b * bsz;
        int32_t         isum[ATD_ISUMS];
        if (block == QK_ATD) {
            const block_q8_K * yb = (const block_q8_K *)vy + b;
            const int32_t sumq = vaddvq_s32(vaddq_s32(vpaddlq_s16(vld1q_s16(yb->bsums)),
                                                      vpaddlq_s16(vld1q_s16(yb->bsums + 8))));
            // bytes 0..15, 16..31, 32..47 and 36..51 (lanes 0..11 cleared); reads stay in the plane
            // and, for the activations, inside the q8_K block (qs + 260 at most)
            const uint8x16_t tail = vcombine_u8(vcreate_u8(0), vcreate_u8(0xffffffff00000000ull));
            for (int i = 0; i < planes; ++i) {
                const uint8_t * p   = blk + 2 * planes + i * ATD_S256;
                int32x4_t       acc = vdupq_n_s32(0);
                acc = atd_neon_bytes(acc, vld1q_u8(p), yb->qs, ATD_S256);
                acc = atd_neon_bytes(acc, vld1q_u8(p + 16), yb->qs + 16, ATD_S256);
                acc = atd_neon_bytes(acc, vld1q_u8(p + 32), yb->qs + 32, ATD_S256);
                acc = atd_neon_bytes(acc, vandq_u8(vld1q_u8(p + 36), tail), yb->qs + 36, ATD_S256);
                isum[i] = vaddvq_s32(acc) - sumq;
            }
        } else {
            const block_atd_q8_64 * yb = (const block_atd_q8_64 *)vy + b;
            const uint8x16_t        three = vdupq_n_u8(3);
            for (int i = 0; i < planes; ++i) {
                // 13 plane bytes in a zeroed 16-byte buffer: no read past the row
                uint8_t buf[16] = { 0 };
                memcpy(buf, blk + 2 * planes + i * ATD_S64, ATD_S64);
                uint8x16_t x  = vld1q_u8(buf);
                int32x4_t  a0 = atd_neon_dot(vdupq_n_s32(0), atd_neon_digit(x), vld1q_s8(yb->qs[0]));
                x  = vmulq_u8(x, three);
                a0 = atd_neon_dot(a0, atd_neon_digit(x), vld1q_s8(yb->qs[1]));
                x  = vmulq_u8(x, three);
                const uint8x16_t c2 = atd_neon_digit(x);  // digit 2 straddles the halves
                a0 = atd_neon_dot(a0, c2, vld1q_s8(yb->qs[2]));
                int32x4_t a1 = atd_neon_dot(vdupq_n_s32(0), c2, vld1q_s8(yb->qs[3]));
                x  = vmulq_u8(x, three);
                a1 = atd_neon_dot(a1, atd_neon_digit(x), vld1q_s8(yb->qs[4]));
                x  = vmulq_u8(x, three);
                a1 = atd_neon_dot(a1, atd_neon_digit(x), vld1q_s8(yb->qs[5]));
                isum[i]                  = vaddvq_s32(a0) - yb->sum[0];
                isum[ATD_MAX_PLANES + i] = vaddvq_s32(a1) - yb->sum[1];
            }
        }
        sum[b & 3] += atd_dot_part(blk, atd_dot_dy(vy, block, b), isum, planes, atd_dot_halves(block));
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
    }
    return v == 1;
}

static int atd_dot_best_variant_probe(int path) {
    if (path == ATD_PATH_AVX2) {
        return atd_dot_variant_ok(path, 2) ? 2 : atd_dot_variant_ok(path, 3) ? 3 : 1;
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
            atd_vec_dot_avx512(n, s, vx, vy, planes, block);
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
    atd_vec_dot_scalar(n, s, vx, vy, planes, block);
}

void atd_vec_dot(int n, float * s, const void * vx, const void * vy, int planes, int block) {
    atd_vec_dot_path(n, s, vx, vy, planes, block, atd_selected_path());
}

// ---- activation quantizers ---------------------------------------------------------------------------

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
ATD_DOT_WRAPPER(atd1_64, 1, QK_ATD_64, atd_q8_64)
ATD_DOT_WRAPPER(atd2_64, 2, QK_ATD_64, atd_q8_64)
ATD_DOT_WRAPPER(atd3_64, 3, QK_ATD_64, atd_q8_64)
ATD_DOT_WRAPPER(atd4_64, 4, QK_ATD_64, atd_q8_64)
#undef ATD_DOT_WRAPPER
