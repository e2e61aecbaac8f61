// ATD x q8 dot products (the vec_dot kernels of atd.h) and their dispatch (format version 2).
//
//   sum_e w_e x_e = sum_blocks sum_g d_y[g] * sum_i alpha_i * sum_{e in g} t_ie q_e,   t = code - 1   (g: scale groups)
//
// B = 256 blocks meet one q8_K block (natural order: digit k of plane byte j pairs with q[52k + j];
// the bsums give sum q). B = 64 blocks meet one block_atd_q8_64, stored by digit (qs[k][j] meets digit
// k of plane byte j) with four scale groups: the 4-byte columns of that layout (atd.h), so the int32
// lanes of one vpdpbusd accumulator per plane are the four groups' sums. Padding slots hold code 0, so
// whatever activation they meet adds 0.
//
// Paths: scalar reference (always), AVX2 (maddubs, or vpdpbusd with AVX-VNNI / AVX512-VL), AVX-512
// (F/BW/VL/VNNI, with VBMI and VBMI + GFNI variants), NEON. Every path computes the exact integer plane
// sums and then the same float combination (below), so all paths return the same bits and tests compare
// them with ==.
// The batched kernels (more than one activation row) are in atd-mm.c.
#include "atd.h"
#include "atd-simd.h"

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

// K(args..., N) for the run-time plane count: the SIMD kernels are compiled once per N = 1..4, so their
// plane loops have constant trip counts
#define ATD_DISPATCH_PLANES(planes, K, ...)                                                          \
    do {                                                                                             \
        switch (planes) {                                                                            \
            case 1: K(__VA_ARGS__, 1); break;                                                        \
            case 2: K(__VA_ARGS__, 2); break;                                                        \
            case 3: K(__VA_ARGS__, 3); break;                                                        \
            default: K(__VA_ARGS__, 4); break;                                                       \
        }                                                                                            \
    } while (0)

#define ATD_S256  ATD_PLANE_BYTES(QK_ATD)     // 52
#define ATD_S64   ATD_PLANE_BYTES(QK_ATD_64)  // 13
#define ATD_LANES 16                          // block b's float part goes to lane b % 16

// ---- the float combination (shared by every path) ---------------------------------------------------
//
// B = 256 (one activation scale d_y per block):
//   isum_i  = sum_e c_ie*q_e - sum_e q_e      (int32, exact; c = t + 1)
//   a       = fma(alpha_{N-1}, isum_{N-1}, ... fma(alpha_0, isum_0, 0))   (float, plane order)
//   lane    = fma(d_y, a, lane),  lane = acc[b % 16]
//   result  = the 16 lanes added pairwise: (i, i+8), then (i, i+4), (i, i+2), (0, 1)
// B = 64 (four activation scales d_y[g] per block, one per group g):
//   isum_gi = the same over the elements of group g
//   a_g     = fma(alpha_{N-1}, isum_{g,N-1}, ... fma(alpha_0, isum_{g,0}, 0))
//   lane    = fma(d_y[g], a_g, acc[b % 4][g])
//   v_g     = (acc[0][g] + acc[2][g]) + (acc[1][g] + acc[3][g]),  result = (v_0 + v_1) + (v_2 + v_3)
// Every multiply-add is an explicit fused one (fmaf here, vfmadd / vfmaq in SIMD), so contraction
// flags cannot change a bit, and the order is fixed: the SIMD paths hold 16 (4 x 4) lanes and combine
// several blocks at once, block b in lane b % 16 (b % 4), exactly as these loops do one at a time.

static inline float atd_dot_reduce16(float * a) {
    for (int w = ATD_LANES / 2; w >= 1; w /= 2) {
        for (int i = 0; i < w; ++i) {
            a[i] = a[i] + a[i + w];
        }
    }
    return a[0];
}

#define ATD_LANES64 4  // B = 64: block b goes to lane b % 4, four groups each
static inline float atd_dot_reduce64(float (*acc)[ATD_Q8_64_GROUPS]) {
    float v[ATD_Q8_64_GROUPS];
    for (int g = 0; g < ATD_Q8_64_GROUPS; ++g) v[g] = (acc[0][g] + acc[2][g]) + (acc[1][g] + acc[3][g]);
    return (v[0] + v[1]) + (v[2] + v[3]);
}

// sum of the q of a q8_K block (from its bsums)
static int32_t atd_q8_K_sum(const block_q8_K * yb) {
    int32_t sumq = 0;
    for (int j = 0; j < QK_K / 16; ++j) {
        sumq += yb->bsums[j];
    }
    return sumq;
}

static void atd_isum_256_scalar(const uint8_t * blk, const block_q8_K * yb, int planes, int32_t * isum) {
    const int32_t sumq = atd_q8_K_sum(yb);
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

static void atd_isum_64_scalar(const uint8_t * blk, const block_atd_q8_64 * yb, int planes,
                               int32_t (*isum)[ATD_Q8_64_GROUPS]) {
    for (int i = 0; i < planes; ++i) {
        const uint8_t * qs = blk + 2 * planes + i * ATD_S64;
        for (int g = 0; g < ATD_Q8_64_GROUPS; ++g) isum[i][g] = -yb->sum[g];
        for (int e = 0; e < QK_ATD_64; ++e) {
            const int k = atd_q8_64_digit(e), j = atd_q8_64_lane(e);
            isum[i][atd_q8_64_group(e)] += atd_byte_digit(qs[j], k) * yb->qs[k][j];
        }
    }
}

// r2 layout (atd.h): bits 2k, 2k+1 of byte j are the code of element 64k + j
static void atd_isum_r2_scalar(const uint8_t * blk, const block_q8_K * yb, int planes, int32_t * isum) {
    const int32_t sumq = atd_q8_K_sum(yb);
    for (int i = 0; i < planes; ++i) {
        const uint8_t * qs = blk + 2 * planes + i * ATD_R2_PLANE_BYTES(QK_ATD);
        int32_t         s  = 0;
        for (int e = 0; e < QK_ATD; ++e) {
            s += ((qs[e % ATD_R2_PLANE_BYTES(QK_ATD)] >> (2 * (e / ATD_R2_PLANE_BYTES(QK_ATD)))) & 3) * yb->qs[e];
        }
        isum[i] = s - sumq;
    }
}

// the 256 family's float combination over blocks bsz bytes apart whose plane sums isum_of gives
static float atd_dot256_scalar(int n, const uint8_t * x, size_t bsz, const block_q8_K * y, int planes,
                               void (*isum_of)(const uint8_t *, const block_q8_K *, int, int32_t *)) {
    float acc[ATD_LANES] = { 0.0f };
    for (int b = 0; b < n / QK_ATD; ++b) {
        const uint8_t * blk = x + (size_t)b * bsz;
        int32_t         isum[ATD_MAX_PLANES];
        isum_of(blk, y + b, planes, isum);
        float a = 0.0f;
        for (int i = 0; i < planes; ++i) {
            a = fmaf(atd_dot_h2f(atd_dot_load_u16(blk + 2 * i)), (float)isum[i], a);
        }
        acc[b % ATD_LANES] = fmaf(y[b].d, a, acc[b % ATD_LANES]);
    }
    return atd_dot_reduce16(acc);
}

static void atd_vec_dot_r2_scalar(int n, float * s, const uint8_t * x, size_t step, const block_q8_K * y, int planes) {
    *s = atd_dot256_scalar(n, x, step, y, planes, atd_isum_r2_scalar);
}

// r2, 64 family: one row against block_atd_q8_64r2 activations, the definition atd.h gives (the SIMD gemvs
// keep a float lane per scale group c: bytes 4c .. 4c + 3 of a plane, in each of its four fields)
static float atd_dot_r2_64_scalar(int n, atd_row_view v, const block_atd_q8_64r2 * y, int planes) {
    float acc[4] = { 0.0f, 0.0f, 0.0f, 0.0f };
    for (int b = 0; b < n / QK_ATD_64; ++b) {
        const uint8_t * blk = v.blk + (size_t)b * v.step;
        for (int i = 0; i < planes; ++i) {
            const float     a = atd_dot_h2f(atd_dot_load_u16(blk + 2 * i));
            const uint8_t * p = blk + v.poff + i * v.pstep;
            for (int c = 0; c < ATD_Q8_64R2_GROUPS; ++c) {
                int32_t s = -y[b].sum[c];  // sum (t+1) q - sum q = sum t q
                for (int k = 0; k < 4; ++k) {
                    for (int m = 0; m < 4; ++m) s += ((p[4 * c + m] >> (2 * k)) & 3) * y[b].qs[16 * k + 4 * c + m];
                }
                acc[c] = fmaf((float)s, a * y[b].d[c], acc[c]);
            }
        }
    }
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

static void atd_vec_dot_scalar(int n, float * s, const void * vx, const void * vy, int planes, int block) {
    const uint8_t * x   = (const uint8_t *)vx;
    const size_t    bsz = ATD_TYPE_SIZE(planes, block);
    if (block == QK_ATD) {
        *s = atd_dot256_scalar(n, x, bsz, (const block_q8_K *)vy, planes, atd_isum_256_scalar);
        return;
    }
    const block_atd_q8_64 * y = (const block_atd_q8_64 *)vy;
    float                   acc[ATD_LANES64][ATD_Q8_64_GROUPS] = { { 0.0f } };
    for (int b = 0; b < n / block; ++b) {
        const uint8_t * blk = x + (size_t)b * bsz;
        int32_t         isum[ATD_MAX_PLANES][ATD_Q8_64_GROUPS];
        atd_isum_64_scalar(blk, y + b, planes, isum);
        for (int g = 0; g < ATD_Q8_64_GROUPS; ++g) {
            float a = 0.0f;
            for (int i = 0; i < planes; ++i) {
                a = fmaf(atd_dot_h2f(atd_dot_load_u16(blk + 2 * i)), (float)isum[i][g], a);
            }
            acc[b % ATD_LANES64][g] = fmaf(y[b].d[g], a, acc[b % ATD_LANES64][g]);
        }
    }
    *s = atd_dot_reduce64(acc);
}

#if defined(ATD_HAVE_AVX2)

// ---- shared x86 pieces: reductions and the float combination of 4 blocks ------------------------------
//
// The x86 paths take 4 blocks per step: the integer sums of each (half, plane) of the 4 blocks in one
// int32x4, the 4 blocks' plane scales and activation scales as float32x4, and accumulate lanes
// 4q..4q+3 of the 16 (q = (b0 % 16) / 4) in S[q], exactly as the scalar loop does.

// Weight rows stream from memory once per token: prefetch a fixed distance ahead (into the next rows,
// which the next calls read; a prefetch never faults). The masked and unaligned plane loads alone leave
// the hardware prefetchers behind.
#ifndef ATD_PREFETCH_DIST
#define ATD_PREFETCH_DIST 2048
#endif
#define ATD_PREFETCH_AT(p, bsz)                                                                      \
    do {                                                                                             \
        for (size_t o_ = 0; o_ < (bsz); o_ += 64) {                                                  \
            _mm_prefetch((const char *)(p) + o_, _MM_HINT_T0);                                       \
        }                                                                                            \
    } while (0)
#define ATD_PREFETCH_BLOCK(p, bsz) ATD_PREFETCH_AT((const char *)(p) + ATD_PREFETCH_DIST, bsz)
// The gemv kernels walk four rows side by side: 2048 bytes ahead would mostly land in those same rows
// (a 4096-wide ATD2 row is 1728 bytes), so they fetch the same block ATD_GEMV_PF_ROWS rows later
// (measured on 4096-wide rows from DRAM, one thread: 2048 bytes 16.4 GB/s for ATD2 and 6.4 for ATD3,
// 8 rows 22.6 and 22.0).
#ifndef ATD_GEMV_PF_ROWS
#define ATD_GEMV_PF_ROWS 8
#endif
#define ATD_GEMV_PREFETCH(br, bx, bsz) ATD_PREFETCH_AT((const char *)(br) + ATD_GEMV_PF_ROWS * (bx), bsz)

// 4 vectors of 8 int32 -> [sum a, sum b, sum c, sum d]
ATD_TARGET_AVX2 ATD_INLINE __m128i atd_hsum4_epi32(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab   = _mm256_hadd_epi32(a, b);
    const __m256i cd   = _mm256_hadd_epi32(c, d);
    const __m256i abcd = _mm256_hadd_epi32(ab, cd);
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

// the plane scales of 4 blocks (block j at blk + j * bsz, j < m; planes 0..3): alpha[i] = [b0 b1 b2 b3]
ATD_TARGET_AVX2 ATD_INLINE void atd_alpha4(const uint8_t * blk, size_t bsz, int m, __m128 * alpha) {
    // 8 bytes per block (inside any block), in registers: no store-to-load forwarding on this path
    __m128i w[4];
    for (int j = 0; j < 4; ++j) {
        w[j] = j < m ? _mm_loadl_epi64((const __m128i *)(blk + (size_t)j * bsz)) : _mm_setzero_si128();
    }
    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi64(w[0], w[1])),
                                        _mm_unpacklo_epi64(w[2], w[3]), 1);
    // per 128-bit lane: b0p0 b1p0 b0p1 b1p1 b0p2 b1p2 b0p3 b1p3, then pairs of blocks side by side
    v = _mm256_shuffle_epi8(v, _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
                                                0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15));
    v = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    const __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(v));       // planes 0, 1
    const __m256 hi = _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1));  // planes 2, 3
    alpha[0] = _mm256_castps256_ps128(lo);
    alpha[1] = _mm256_extractf128_ps(lo, 1);
    alpha[2] = _mm256_castps256_ps128(hi);
    alpha[3] = _mm256_extractf128_ps(hi, 1);
}

// the activation scales of 4 blocks of q8_K; missing blocks 0
ATD_TARGET_AVX2 ATD_INLINE __m128 atd_dy4_256(const block_q8_K * y, int m) {
    return _mm_setr_ps(y[0].d, m > 1 ? y[1].d : 0.0f, m > 2 ? y[2].d : 0.0f, m > 3 ? y[3].d : 0.0f);
}

// lanes 4q..4q+3 of the 16: S = fma(dy, sum_i fma(alpha_i, isum_i, .), S)
ATD_TARGET_AVX2 ATD_INLINE __m128 atd_combine4(__m128 S, const __m128i * isum, const __m128 * alpha, __m128 dy,
                                              int planes) {
    __m128 acc = _mm_setzero_ps();
    for (int i = 0; i < planes; ++i) {
        acc = _mm_fmadd_ps(alpha[i], _mm_cvtepi32_ps(isum[i]), acc);
    }
    return _mm_fmadd_ps(dy, acc, S);
}

// B = 64: the lanes acc[0] | acc[1] (S01) and acc[2] | acc[3] (S23), four groups each, added as
// atd_dot_reduce64 does
ATD_TARGET_AVX2 ATD_INLINE float atd_finish64(__m256 S01, __m256 S23) {
    const __m256 u = _mm256_add_ps(S01, S23);                                           // acc0+acc2 | acc1+acc3
    const __m128 v = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));  // v_g
    const __m128 t = _mm_add_ps(v, _mm_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1)));       // v0+v1, ., v2+v3, .
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehl_ps(t, t)));
}

// the 16 lanes S[0] | S[1] | S[2] | S[3] added pairwise as atd_dot_reduce16 does
ATD_TARGET_AVX2 ATD_INLINE float atd_finish4(const __m128 * S) {
    __m128 c = _mm_add_ps(_mm_add_ps(S[0], S[2]), _mm_add_ps(S[1], S[3]));  // (i, i+8), then (i, i+4)
    c = _mm_add_ps(c, _mm_movehl_ps(c, c));                                 // (i, i+2)
    c = _mm_add_ss(c, _mm_shuffle_ps(c, c, 1));                             // (0, 1)
    return _mm_cvtss_f32(c);
}

// The float step of one block for four rows (the gemv kernels): acc[r][i] sums to row r's plane i sum,
// row r's scales at blk + r * bx; lane r of the result is row r's. Then the 16 lanes of each row, added
// as atd_dot_reduce16 does.
ATD_TARGET_AVX2 ATD_INLINE __m128 atd_gemv4_step(__m128 L, __m256i (*acc)[ATD_MAX_PLANES], const uint8_t * blk,
                                                size_t bx, float dy, int planes) {
    __m128i isum[ATD_MAX_PLANES];
    __m128  alpha[ATD_MAX_PLANES];
    ATD_UNROLL for (int i = 0; i < planes; ++i) {
        isum[i] = atd_hsum4_epi32(acc[0][i], acc[1][i], acc[2][i], acc[3][i]);
    }
    atd_alpha4(blk, bx, 4, alpha);
    return atd_combine4(L, isum, alpha, _mm_set1_ps(dy), planes);
}
ATD_TARGET_AVX2 ATD_INLINE void atd_gemv4_finish(__m128 * L, float * out) {
    for (int w = ATD_LANES / 2; w >= 1; w /= 2) {
        for (int l = 0; l < w; ++l) L[l] = _mm_add_ps(L[l], L[l + w]);
    }
    _mm_storeu_ps(out, L[0]);
}

// The 4-block driver of the 256-blocks (bsz bytes from one block of the row to the next): ACC(blk, yb,
// planes, acc) leaves per plane a vector of 8 int32 whose sum is (sum t q) << SHIFT.
#define ATD_DEFINE_K256(NAME, TARGET, ACC, SHIFT)                                                            \
    TARGET ATD_INLINE void NAME(int n, float * s, const uint8_t * x, size_t bsz, const block_q8_K * y,       \
                                const int planes) {                                                         \
        const int    nb  = n / QK_ATD;                                                                      \
        __m128       S[4] = { _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps() };     \
        for (int b16 = 0; b16 < nb; b16 += ATD_LANES) {                                                     \
          ATD_UNROLL for (int q = 0; q < 4; ++q) { /* unrolled: S[q] stays in a register */                \
            const int b0 = b16 + 4 * q;                                                                     \
            if (b0 >= nb) break;                                                                            \
            const int m = nb - b0 < 4 ? nb - b0 : 4;                                                        \
            __m256i   acc[4][ATD_MAX_PLANES];                                                               \
            ATD_UNROLL for (int j = 0; j < 4; ++j) {                                                        \
                if (j < m) {                                                                                \
                    ATD_PREFETCH_BLOCK(x + (size_t)(b0 + j) * bsz, bsz);                                    \
                    ACC(x + (size_t)(b0 + j) * bsz, y + b0 + j, planes, acc[j]);                            \
                } else {                                                                                    \
                    for (int i = 0; i < planes; ++i) acc[j][i] = _mm256_setzero_si256();                     \
                }                                                                                           \
            }                                                                                               \
            __m128i isum[ATD_MAX_PLANES];                                                                   \
            __m128  alpha[ATD_MAX_PLANES];                                                                  \
            ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                   \
                isum[i] = _mm_srai_epi32(atd_hsum4_epi32(acc[0][i], acc[1][i], acc[2][i], acc[3][i]), SHIFT); \
            }                                                                                               \
            atd_alpha4(x + (size_t)b0 * bsz, bsz, m, alpha);                                                \
            S[q] = atd_combine4(S[q], isum, alpha, atd_dy4_256(y + b0, m), planes);                         \
          }                                                                                                 \
        }                                                                                                   \
        *s = atd_finish4(S);                                                                                \
    }

// ---- AVX2 ------------------------------------------------------------------------------------------------
//
// B = 256: a plane's 52 bytes are two 32-byte loads, bytes 0..31 and 20..51 (the second with lanes
// 0..11 cleared, so nothing is read beyond the plane); digit k of them meets q[52k + 0..31] and
// q[52k + 20..51]. B = 64: the plane (13 bytes + 3 that meet zero activations) goes to both 128-bit
// lanes, which take digits (0, 1), (2, 3), (4, -) against the activations' digit groups; the two lanes'
// int32 sums add up to the four scale groups' sums.
// Three flavours of the unsigned x signed byte dot:
//   mad:  maddubs (pairs: |.| <= 2*2*128), summed in int16 (<= 10 terms), one madd to int32;
//   vnni: vpdpbusd straight into int32 (AVX-VNNI);  evex: the AVX512-VL encoding of vpdpbusd.
// With vpdpbusd the 256-blocks skip the digit decoding altogether (the "x-trick"): with x_0 = byte and
// x_{k+1} = 3 x_k mod 256 (two byte adds), the code of digit k is (3 x_k - x_{k+1}) / 256, so
//   sum_j c_k(j) q(j) = (3 sum_j x_k(j) q(j) - sum_j x_{k+1}(j) q(j)) / 256,
// two vpdpbusd on the raw bytes (0..255, exact in int32) instead of two multiplies, an or and four adds.

// codes of the current digit of 32 bytes held as even lanes (b << 8) and odd lanes (b & 0xff00)
ATD_TARGET_AVX2 ATD_INLINE __m256i atd_digit256(__m256i ev, __m256i od) {
    const __m256i hi = _mm256_set1_epi16((short)0xff00);
    const __m256i ce = _mm256_mulhi_epu16(ev, _mm256_set1_epi16(3));    // code in the low byte
    const __m256i co = _mm256_mulhi_epu16(od, _mm256_set1_epi16(768));  // 3b: code in the high byte
    return _mm256_or_si256(ce, _mm256_and_si256(co, hi));
}
ATD_TARGET_AVX2 ATD_INLINE __m256i atd_times3_epi8(__m256i v) {
    return _mm256_add_epi8(_mm256_add_epi8(v, v), v);
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

// one 256-block with maddubs: acc[i] sums to sum t q of plane i. The code of x is (x >= 86) + (x >= 171):
// two signed compares of y = x - 128 (y > -43, y > 42), each -1 where true, summed and negated. y follows
// the same recurrence as x: y_{k+1} = 3 y_k mod 256 (3 (x - 128) = 3 x - 384 = 3 x - 128 mod 256).
ATD_TARGET_AVX2 ATD_INLINE __m256i atd_code256_signed(__m256i y) {
    const __m256i m1 = _mm256_cmpgt_epi8(y, _mm256_set1_epi8(-43));
    const __m256i m2 = _mm256_cmpgt_epi8(y, _mm256_set1_epi8(42));
    return _mm256_sub_epi8(_mm256_setzero_si256(), _mm256_add_epi8(m1, m2));
}

ATD_TARGET_AVX2 ATD_INLINE void atd_acc256_avx2_mad(const uint8_t * blk, const block_q8_K * yb, const int planes,
                                                   __m256i * acc) {
    const __m256i tail = _mm256_setr_epi32(0, 0, 0, -1, -1, -1, -1, -1);  // lanes 12..31
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    __m256i       qa[ATD_TRITS_PER_BYTE], qb[ATD_TRITS_PER_BYTE];
    ATD_UNROLL for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
        qa[k] = _mm256_loadu_si256((const __m256i *)(yb->qs + ATD_S256 * k));
        qb[k] = _mm256_loadu_si256((const __m256i *)(yb->qs + ATD_S256 * k + 20));
    }
    // -sum q as 8 int32 pair sums of the bsums: the start of every plane's sum
    const __m256i init = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)yb->bsums), _mm256_set1_epi16(-1));
    ATD_UNROLL for (int i = 0; i < planes; ++i) {
        const uint8_t * p = blk + 2 * planes + i * ATD_S256;
        // lanes 0..11 of the second load are cleared: their code 0 meets the q that bytes 20..31 met
        __m256i ylo = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)p), bias);
        __m256i yhi = _mm256_xor_si256(_mm256_and_si256(_mm256_loadu_si256((const __m256i *)(p + 20)), tail), bias);
        __m256i a   = _mm256_setzero_si256();
        ATD_UNROLL for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
            a = ATD_AVX2_DOT_mad_ADD(a, atd_code256_signed(ylo), qa[k]);
            a = ATD_AVX2_DOT_mad_ADD(a, atd_code256_signed(yhi), qb[k]);
            if (k + 1 < ATD_TRITS_PER_BYTE) {
                ylo = atd_times3_epi8(ylo);
                yhi = atd_times3_epi8(yhi);
            }
        }
        acc[i] = _mm256_add_epi32(init, ATD_AVX2_DOT_mad_I32(a));
    }
}

// one 256-block with vpdpbusd on the raw bytes (the x-trick): acc[i] sums to 256 * sum t q of plane i
#define ATD_DEFINE_AVX2_ACC256_X(SFX, TARGET)                                                                \
    TARGET ATD_INLINE void atd_acc256_avx2_x_##SFX(const uint8_t * blk, const block_q8_K * yb,              \
                                                   const int planes, __m256i * acc) {                      \
        const __m256i tail = _mm256_setr_epi32(0, 0, 0, -1, -1, -1, -1, -1); /* lanes 12..31 */              \
        __m256i       qa[ATD_TRITS_PER_BYTE], qb[ATD_TRITS_PER_BYTE];                                       \
        ATD_UNROLL for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {                                            \
            qa[k] = _mm256_loadu_si256((const __m256i *)(yb->qs + ATD_S256 * k));                           \
            qb[k] = _mm256_loadu_si256((const __m256i *)(yb->qs + ATD_S256 * k + 20));                      \
        }                                                                                                   \
        /* 256 * sum q (8 int32 pair sums of the bsums) starts the x_{k+1} sums: 3D - E is then          \
           256 (sum c q - sum q) = 256 sum t q */                                                          \
        const __m256i init = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)yb->bsums),             \
                                               _mm256_set1_epi16(256));                                    \
        ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                       \
            const uint8_t * p = blk + 2 * planes + i * ATD_S256;                                            \
            __m256i         A = _mm256_loadu_si256((const __m256i *)p);                                     \
            __m256i         B = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(p + 20)), tail);      \
            __m256i         D = _mm256_setzero_si256(), E = init;                                           \
            ATD_UNROLL for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {                                        \
                D = ATD_AVX2_DOT_##SFX##_ADD(D, A, qa[k]);                                                  \
                D = ATD_AVX2_DOT_##SFX##_ADD(D, B, qb[k]);                                                  \
                A = atd_times3_epi8(A);                                                                     \
                B = atd_times3_epi8(B);                                                                     \
                E = ATD_AVX2_DOT_##SFX##_ADD(E, A, qa[k]);                                                  \
                E = ATD_AVX2_DOT_##SFX##_ADD(E, B, qb[k]);                                                  \
            }                                                                                               \
            acc[i] = _mm256_sub_epi32(_mm256_add_epi32(_mm256_add_epi32(D, D), D), E);                      \
        }                                                                                                   \
    }

// B = 64: the codes of digits (0, 1), (2, 3) and (4, -) of a plane's bytes, one digit per 128-bit lane
// (the signed decoder above; the high lane starts one digit on)
ATD_TARGET_AVX2 ATD_INLINE void atd_codes64_avx2(const uint8_t * p, __m256i * c) {
    const __m256i y = _mm256_xor_si256(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p)),
                                       _mm256_set1_epi8((char)0x80));
    __m256i       v = _mm256_blend_epi32(y, atd_times3_epi8(y), 0xf0);
    c[0] = atd_code256_signed(v);
    v    = atd_times3_epi8(atd_times3_epi8(v));
    c[1] = atd_code256_signed(v);
    v    = atd_times3_epi8(atd_times3_epi8(v));
    c[2] = atd_code256_signed(v);  // the high lane meets zero activations
}

// B = 64, blocks j0, j0 + 1 of four (block j0 + z in 128-bit lane z): the plane scale from the four
// blocks' alpha, and the activation scales of each group (0 for blocks >= m)
ATD_TARGET_AVX2 ATD_INLINE __m256 atd_alpha2x4(__m128 alpha, int j0) {
    const __m256i idx = _mm256_setr_epi32(j0, j0, j0, j0, j0 + 1, j0 + 1, j0 + 1, j0 + 1);
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(alpha), idx);
}
ATD_TARGET_AVX2 ATD_INLINE __m256 atd_dy2x4(const block_atd_q8_64 * y, int j0, int m) {
    const __m128 d0 = j0 < m ? _mm_loadu_ps(y[j0].d) : _mm_setzero_ps();
    const __m128 d1 = j0 + 1 < m ? _mm_loadu_ps(y[j0 + 1].d) : _mm_setzero_ps();
    return _mm256_insertf128_ps(_mm256_castps128_ps256(d0), d1, 1);
}

#define ATD_DEFINE_AVX2_KERNELS(SFX, TARGET, K256)                                                           \
    /* one 64-block: isum[i] = the four groups' sum t q of plane i; the 16-byte plane loads may read 3   \
       bytes past the block: callers pass a padded copy for the last block of a row */                    \
    TARGET ATD_INLINE void atd_acc64_avx2_##SFX(const uint8_t * blk, const block_atd_q8_64 * yb,            \
                                                const int planes, __m128i * isum) {                        \
        const __m256i g01  = _mm256_loadu_si256((const __m256i *)yb->qs[0]);                                \
        const __m256i g23  = _mm256_loadu_si256((const __m256i *)yb->qs[2]);                                \
        const __m256i g4   = _mm256_inserti128_si256(_mm256_setzero_si256(),                                \
                                                     _mm_loadu_si128((const __m128i *)yb->qs[4]), 0);       \
        const __m128i init = _mm_sub_epi32(_mm_setzero_si128(), _mm_loadu_si128((const __m128i *)yb->sum)); \
        ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                       \
            __m256i c[3];                                                                                   \
            atd_codes64_avx2(blk + 2 * planes + i * ATD_S64, c);                                            \
            ATD_AVX2_DOT_##SFX##_T a = ATD_AVX2_DOT_##SFX##_ADD(ATD_AVX2_DOT_##SFX##_ZERO(), c[0], g01);    \
            a = ATD_AVX2_DOT_##SFX##_ADD(a, c[1], g23);                                                     \
            a = ATD_AVX2_DOT_##SFX##_ADD(a, c[2], g4);                                                      \
            const __m256i r = ATD_AVX2_DOT_##SFX##_I32(a);                                                  \
            isum[i] = _mm_add_epi32(_mm_add_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)), init); \
        }                                                                                                   \
    }                                                                                                       \
    TARGET ATD_INLINE void atd_k64_avx2_##SFX(int n, float * s, const uint8_t * x, const block_atd_q8_64 * y, \
                                              const int planes) {                                          \
        const int    nb  = n / QK_ATD_64;                                                                   \
        const size_t bsz = ATD_TYPE_SIZE(planes, QK_ATD_64);                                                \
        uint8_t      last[ATD_TYPE_SIZE(ATD_MAX_PLANES, QK_ATD_64) + 16] = { 0 };                           \
        memcpy(last, x + (size_t)(nb - 1) * bsz, bsz); /* the last block, padded for 16-byte loads */      \
        __m256 S[2] = { _mm256_setzero_ps(), _mm256_setzero_ps() }; /* lanes 0 | 1 and 2 | 3 */             \
        for (int b0 = 0; b0 < nb; b0 += ATD_LANES64) {                                                      \
            const int m = nb - b0 < 4 ? nb - b0 : 4;                                                        \
            __m128i   isum[4][ATD_MAX_PLANES];                                                              \
            ATD_UNROLL for (int j = 0; j < 4; ++j) {                                                        \
                if (j < m) {                                                                                \
                    const int b = b0 + j;                                                                   \
                    ATD_PREFETCH_BLOCK(x + (size_t)b * bsz, bsz);                                           \
                    atd_acc64_avx2_##SFX(b == nb - 1 ? last : x + (size_t)b * bsz, y + b, planes, isum[j]);  \
                } else {                                                                                    \
                    for (int i = 0; i < planes; ++i) isum[j][i] = _mm_setzero_si128();                       \
                }                                                                                           \
            }                                                                                               \
            __m128 alpha[ATD_MAX_PLANES];                                                                   \
            atd_alpha4(x + (size_t)b0 * bsz, bsz, m, alpha);                                                \
            ATD_UNROLL for (int h = 0; h < 2; ++h) { /* blocks 2h, 2h + 1 */                                \
                __m256 acc = _mm256_setzero_ps();                                                           \
                ATD_UNROLL for (int i = 0; i < planes; ++i) {                                               \
                    const __m256i I = _mm256_inserti128_si256(_mm256_castsi128_si256(isum[2 * h][i]),       \
                                                              isum[2 * h + 1][i], 1);                       \
                    acc = _mm256_fmadd_ps(atd_alpha2x4(alpha[i], 2 * h), _mm256_cvtepi32_ps(I), acc);       \
                }                                                                                           \
                S[h] = _mm256_fmadd_ps(atd_dy2x4(y + b0, 2 * h, m), acc, S[h]);                             \
            }                                                                                               \
        }                                                                                                   \
        *s = atd_finish64(S[0], S[1]);                                                                      \
    }                                                                                                       \
    TARGET static void atd_vec_dot_avx2_##SFX(int n, float * s, const void * vx, const void * vy, int planes, \
                                              int block) {                                                 \
        const uint8_t * x = (const uint8_t *)vx;                                                            \
        if (n < block) { *s = 0.0f; return; }                                                               \
        if (block == QK_ATD) {                                                                              \
            const block_q8_K * y = (const block_q8_K *)vy;                                                  \
            ATD_DISPATCH_PLANES(planes, K256, n, s, x, ATD_TYPE_SIZE(planes, QK_ATD), y);                   \
        } else {                                                                                            \
            const block_atd_q8_64 * y = (const block_atd_q8_64 *)vy;                                        \
            ATD_DISPATCH_PLANES(planes, atd_k64_avx2_##SFX, n, s, x, y);                                    \
        }                                                                                                   \
    }

ATD_DEFINE_K256(atd_k256_avx2_mad, ATD_TARGET_AVX2, atd_acc256_avx2_mad, 0)
ATD_DEFINE_AVX2_KERNELS(mad, ATD_TARGET_AVX2, atd_k256_avx2_mad)
#if defined(ATD_HAVE_AVXVNNI)
ATD_DEFINE_AVX2_ACC256_X(vnni, ATD_TARGET_AVXVNNI)
ATD_DEFINE_K256(atd_k256_avx2_vnni, ATD_TARGET_AVXVNNI, atd_acc256_avx2_x_vnni, 8)
ATD_DEFINE_AVX2_KERNELS(vnni, ATD_TARGET_AVXVNNI, atd_k256_avx2_vnni)
#endif
#if defined(ATD_HAVE_AVX512)
ATD_DEFINE_AVX2_ACC256_X(evex, ATD_TARGET_AVX512)
ATD_DEFINE_K256(atd_k256_avx2_evex, ATD_TARGET_AVX512, atd_acc256_avx2_x_evex, 8)
ATD_DEFINE_AVX2_KERNELS(evex, ATD_TARGET_AVX512, atd_k256_avx2_evex)
#endif

// ---- r2 layout (atd.h), one row: the codes of digit-row k of a 32-byte half are (P >> 2k) & 3 ----------
#define ATD_DEFINE_AVX2_ACC_R2(SFX, TARGET)                                                                  \
    TARGET ATD_INLINE void atd_acc_r2_avx2_##SFX(const uint8_t * blk, const block_q8_K * yb, const int planes, \
                                                 __m256i * acc) {                                          \
        const __m256i m3 = _mm256_set1_epi8(3);                                                             \
        __m256i       q[8]; /* q[2k + h]: q[64k + 32h .. + 31] */                                           \
        ATD_UNROLL for (int t = 0; t < 8; ++t) q[t] = _mm256_loadu_si256((const __m256i *)(yb->qs + 32 * ((t & 1) + 2 * (t >> 1)))); \
        const __m256i init = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)yb->bsums), _mm256_set1_epi16(-1)); \
        ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                       \
            const uint8_t * p = blk + 2 * planes + i * ATD_R2_PLANE_BYTES(QK_ATD);                                  \
            ATD_AVX2_DOT_##SFX##_T a = ATD_AVX2_DOT_##SFX##_ZERO();                                         \
            ATD_UNROLL for (int h = 0; h < 2; ++h) {                                                        \
                const __m256i P = _mm256_loadu_si256((const __m256i *)(p + 32 * h));                        \
                ATD_UNROLL for (int k = 0; k < 4; ++k) {                                                    \
                    const __m256i c = _mm256_and_si256(k ? _mm256_srli_epi16(P, 2 * k) : P, m3);            \
                    a = ATD_AVX2_DOT_##SFX##_ADD(a, c, q[2 * k + h]);                                       \
                }                                                                                           \
            }                                                                                               \
            acc[i] = _mm256_add_epi32(init, ATD_AVX2_DOT_##SFX##_I32(a));                                   \
        }                                                                                                   \
    }                                                                                                       \
    ATD_DEFINE_K256(atd_k256r2_avx2_##SFX##_k, TARGET, atd_acc_r2_avx2_##SFX, 0)                            \
    TARGET static void atd_dot_r2_avx2_##SFX(int n, float * s, const uint8_t * x, size_t step, const block_q8_K * y, \
                                             int planes) {                                                 \
        ATD_DISPATCH_PLANES(planes, atd_k256r2_avx2_##SFX##_k, n, s, x, step, y);                           \
    }

// mad: maddubs pairs of codes 0..2 times q reach 2 * 2 * 128; eight of them per int16 lane stay < 2^15
ATD_DEFINE_AVX2_ACC_R2(mad, ATD_TARGET_AVX2)
#if defined(ATD_HAVE_AVXVNNI)
ATD_DEFINE_AVX2_ACC_R2(vnni, ATD_TARGET_AVXVNNI)
#endif
#if defined(ATD_HAVE_AVX512)
ATD_DEFINE_AVX2_ACC_R2(evex, ATD_TARGET_AVX512)
#endif

// ---- r2 layout (atd.h), 64 family, AVX2 gemv: a group of four rows, a ymm per two rows and plane ---------
//
// A group's plane is 64 bytes, rows 2h and 2h + 1 in ymm h; field k, (P >> 2k) & 3, meets q[16k .. 16k + 15]
// in both lanes. Each int32 lane sums one scale group (less its sum of q), then turns float with its row's
// alpha times the group's d: the lanes of the scalar reference.
ATD_TARGET_AVX2 ATD_INLINE void atd_r2_64_finish2(__m256 acc, float * out) {
    __m256 t = _mm256_add_ps(acc, _mm256_permute_ps(acc, 0xb1));  // (c, c ^ 1)
    t = _mm256_add_ps(t, _mm256_permute_ps(t, 0x4e));             // (0 + 1) + (2 + 3)
    out[0] = _mm256_cvtss_f32(t);
    out[1] = _mm_cvtss_f32(_mm256_extractf128_ps(t, 1));
}
#define ATD_DEFINE_AVX2_GEMV_R2_64(SFX, TARGET)                                                              \
    TARGET ATD_INLINE void atd_gemv_r2_64_avx2_##SFX##_k(int n, const uint8_t * x, const block_atd_q8_64r2 * y, \
                                                        float * out, const int planes) {                   \
        const size_t  gsz = ATD_R2_GROUP * ATD_R2_TYPE_SIZE(planes, QK_ATD_64);                             \
        const __m256i m3  = _mm256_set1_epi8(3);                                                            \
        __m256        acc[2] = { _mm256_setzero_ps(), _mm256_setzero_ps() };                                \
        for (int b = 0; b < n / QK_ATD_64; ++b) {                                                           \
            const block_atd_q8_64r2 * yb = y + b;                                                           \
            const uint8_t *           g  = x + (size_t)b * gsz;                                             \
            __m256i                   q[4];                                                                 \
            ATD_UNROLL for (int k = 0; k < 4; ++k) q[k] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(yb->qs + 16 * k))); \
            const __m256i init = _mm256_sub_epi32(_mm256_setzero_si256(),                                   \
                                                  _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)yb->sum))); \
            const __m256  d    = _mm256_broadcast_ps((const __m128 *)yb->d);                                \
            /* the scales, row by row (the 16-byte loads stay in the group's block: 72 N bytes) */          \
            ATD_ALIGN64 float al[16];                                                                       \
            _mm256_store_ps(al, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g)));                      \
            if (planes > 2) _mm256_store_ps(al + 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + 16)))); \
            ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                   \
                ATD_UNROLL for (int h = 0; h < 2; ++h) {                                                    \
                    const __m256i P = _mm256_loadu_si256((const __m256i *)(g + 8 * planes + 64 * i + 32 * h)); \
                    ATD_AVX2_DOT_##SFX##_T a = ATD_AVX2_DOT_##SFX##_ZERO();                                 \
                    ATD_UNROLL for (int k = 0; k < 4; ++k) {                                                \
                        a = ATD_AVX2_DOT_##SFX##_ADD(a, _mm256_and_si256(k ? _mm256_srli_epi16(P, 2 * k) : P, m3), q[k]); \
                    }                                                                                       \
                    const __m256i s  = _mm256_add_epi32(init, ATD_AVX2_DOT_##SFX##_I32(a));                 \
                    const __m256  sc = _mm256_mul_ps(_mm256_set_m128(_mm_set1_ps(al[(2 * h + 1) * planes + i]), \
                                                                     _mm_set1_ps(al[2 * h * planes + i])), d); \
                    acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc[h]);                            \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
        atd_r2_64_finish2(acc[0], out);                                                                     \
        atd_r2_64_finish2(acc[1], out + 2);                                                                 \
    }                                                                                                       \
    TARGET static void atd_gemv_r2_64_avx2_##SFX(int n, const uint8_t * x, const block_atd_q8_64r2 * y,      \
                                                 float * out, int planes) {                                \
        ATD_DISPATCH_PLANES(planes, atd_gemv_r2_64_avx2_##SFX##_k, n, x, y, out);                           \
    }

// mad: four fields of maddubs pairs (codes 0..2 times q) per int16 lane stay below 2^15
ATD_DEFINE_AVX2_GEMV_R2_64(mad, ATD_TARGET_AVX2)
#if defined(ATD_HAVE_AVXVNNI)
ATD_DEFINE_AVX2_GEMV_R2_64(vnni, ATD_TARGET_AVXVNNI)
#endif
#if defined(ATD_HAVE_AVX512)
ATD_DEFINE_AVX2_GEMV_R2_64(evex, ATD_TARGET_AVX512)
#endif

// ---- AVX2 gemv of the 64 family: two rows per ymm ---------------------------------------------------------
//
// One activation row against many weight rows (token generation): 128-bit lane z holds block b of row
// r + z, so both lanes meet the same activations (broadcast) and every digit of a plane is one 16-byte
// group, no digit pairing. The int32 lanes of the plane sum are the four scale groups' sums of each row.
// With vpdpbusd the plane sum takes the x-trick of the 256-blocks: with x_{k+1} = 3 x_k mod 256,
// 256 sum_k c_k q_k = 3 sum_k x_k q_k - sum_k x_{k+1} q_k (two vpdpbusd and two byte adds per digit);
// with maddubs the signed-compare codes. The float combination is vec_dot's, per row, so each result
// equals atd_vec_dot of that row bit for bit.

// the four groups' sum t q of one plane of two rows: P the plane bytes (lanes 13..15 meet zeros), o the
// five digit groups (both lanes), init = 256 * sum q (x-trick) or -sum q (maddubs) of each group
#define ATD_DEFINE_AVX2_PLANE64X2_X(SFX, TARGET)                                                             \
    TARGET ATD_INLINE __m256i atd_plane64x2_##SFX(__m256i P, const __m256i * o, __m256i init) {              \
        __m256i D = _mm256_setzero_si256(), E = init;                                                        \
        ATD_UNROLL for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {                                            \
            D = ATD_AVX2_DOT_##SFX##_ADD(D, P, o[k]);                                                        \
            P = atd_times3_epi8(P);                                                                          \
            E = ATD_AVX2_DOT_##SFX##_ADD(E, P, o[k]);                                                        \
        }                                                                                                    \
        return _mm256_srai_epi32(_mm256_sub_epi32(_mm256_add_epi32(_mm256_add_epi32(D, D), D), E), 8);      \
    }
ATD_TARGET_AVX2 ATD_INLINE __m256i atd_plane64x2_mad(__m256i P, const __m256i * o, __m256i init) {
    __m256i Y = _mm256_xor_si256(P, _mm256_set1_epi8((char)0x80)), a = _mm256_setzero_si256();
    ATD_UNROLL for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
        a = ATD_AVX2_DOT_mad_ADD(a, atd_code256_signed(Y), o[k]);  // int16: |.| <= 5 * 2 * 2 * 128
        if (k + 1 < ATD_TRITS_PER_BYTE) Y = atd_times3_epi8(Y);
    }
    return _mm256_add_epi32(ATD_AVX2_DOT_mad_I32(a), init);
}
#define ATD_AVX2_GEMV64_INIT_mad(sum)  _mm256_sub_epi32(_mm256_setzero_si256(), (sum))
#define ATD_AVX2_GEMV64_INIT_vnni(sum) _mm256_slli_epi32((sum), 8)
#define ATD_AVX2_GEMV64_INIT_evex(sum) _mm256_slli_epi32((sum), 8)

#define ATD_DEFINE_AVX2_GEMV64(SFX, TARGET)                                                                  \
    TARGET ATD_INLINE void atd_gemv64_avx2_##SFX##_k(int n, const uint8_t * x, size_t bx,                    \
                                                     const block_atd_q8_64 * y, float * out, const int planes) { \
        const int    nb  = n / QK_ATD_64;                                                                   \
        const size_t bsz = ATD_TYPE_SIZE(planes, QK_ATD_64);                                                \
        /* the last block of both rows, padded: the 16-byte plane loads read 3 bytes past a plane */       \
        uint8_t last[2][ATD_TYPE_SIZE(ATD_MAX_PLANES, QK_ATD_64) + 16] = { { 0 } };                         \
        memcpy(last[0], x + (size_t)(nb - 1) * bsz, bsz);                                                   \
        memcpy(last[1], x + bx + (size_t)(nb - 1) * bsz, bsz);                                              \
        __m256 L[ATD_LANES64]; /* lane z of L[l]: acc[l][0..3] of row z */                                  \
        for (int l = 0; l < ATD_LANES64; ++l) L[l] = _mm256_setzero_ps();                                   \
        for (int b4 = 0; b4 < nb; b4 += ATD_LANES64) {                                                      \
          ATD_UNROLL for (int l = 0; l < ATD_LANES64; ++l) { /* unrolled: L[l] stays in a register */      \
            const int b = b4 + l;                                                                           \
            if (b >= nb) break;                                                                             \
            const block_atd_q8_64 * yb = y + b;                                                             \
            __m256i o[ATD_TRITS_PER_BYTE];                                                                  \
            ATD_UNROLL for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {                                       \
                o[k] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)yb->qs[k]));            \
            }                                                                                               \
            const __m256i init = ATD_AVX2_GEMV64_INIT_##SFX(                                                \
                _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)yb->sum)));                    \
            const uint8_t * b0 = b == nb - 1 ? last[0] : x + (size_t)b * bsz;                               \
            const uint8_t * b1 = b == nb - 1 ? last[1] : x + bx + (size_t)b * bsz;                          \
            ATD_GEMV_PREFETCH(x + (size_t)b * bsz, bx, bsz);                                                \
            ATD_GEMV_PREFETCH(x + bx + (size_t)b * bsz, bx, bsz);                                           \
            /* the plane scales of both rows: float 4z + i = alpha_i of row z */                            \
            const __m256 F = _mm256_cvtph_ps(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)b0),       \
                                                                _mm_loadl_epi64((const __m128i *)b1)));     \
            __m256 acc = _mm256_setzero_ps();                                                               \
            ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                   \
                const int     off = 2 * planes + i * ATD_S64;                                               \
                const __m256i P   = _mm256_inserti128_si256(                                                \
                    _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(b0 + off))),                   \
                    _mm_loadu_si128((const __m128i *)(b1 + off)), 1);                                       \
                const __m256 A = _mm256_permutevar8x32_ps(F, _mm256_setr_epi32(i, i, i, i, 4 + i, 4 + i, 4 + i, 4 + i)); \
                acc = _mm256_fmadd_ps(A, _mm256_cvtepi32_ps(atd_plane64x2_##SFX(P, o, init)), acc);         \
            }                                                                                               \
            L[l] = _mm256_fmadd_ps(_mm256_broadcast_ps((const __m128 *)yb->d), acc, L[l]);                  \
          }                                                                                                 \
        }                                                                                                   \
        /* per row as atd_dot_reduce64: v_g = (acc0 + acc2) + (acc1 + acc3), (v0 + v1) + (v2 + v3) */      \
        const __m256 v = _mm256_add_ps(_mm256_add_ps(L[0], L[2]), _mm256_add_ps(L[1], L[3]));               \
        const __m256 t = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1)));                \
        const __m256 r = _mm256_add_ps(t, _mm256_shuffle_ps(t, t, _MM_SHUFFLE(1, 0, 3, 2)));                \
        out[0] = _mm256_cvtss_f32(r);                                                                       \
        out[1] = _mm_cvtss_f32(_mm256_extractf128_ps(r, 1));                                                \
    }                                                                                                       \
    TARGET static void atd_gemv64_avx2_##SFX(int n, const uint8_t * x, size_t bx, const block_atd_q8_64 * y,  \
                                             float * out, int planes) {                                    \
        ATD_DISPATCH_PLANES(planes, atd_gemv64_avx2_##SFX##_k, n, x, bx, y, out);                          \
    }

ATD_DEFINE_AVX2_GEMV64(mad, ATD_TARGET_AVX2)
#if defined(ATD_HAVE_AVXVNNI)
ATD_DEFINE_AVX2_PLANE64X2_X(vnni, ATD_TARGET_AVXVNNI)
ATD_DEFINE_AVX2_GEMV64(vnni, ATD_TARGET_AVXVNNI)
#endif
#if defined(ATD_HAVE_AVX512)
ATD_DEFINE_AVX2_PLANE64X2_X(evex, ATD_TARGET_AVX512)
ATD_DEFINE_AVX2_GEMV64(evex, ATD_TARGET_AVX512)
#endif

// ---- AVX-512 (F/BW/VL/VNNI; VBMI) -------------------------------------------------------------------------
//
// The codes of a digit come from one of two decoders, then vpdpbusd meets them with the activations:
//   mul (variant 1): the byte b in a 16-bit lane as b << 8, mulhi(lane, 3) is the top digit and
//        lane * 3 moves to the next one (even and odd bytes in two lane sets, merged by vpternlog);
//   lut (variant 2, AVX512-VBMI): two 256-entry tables, looked up with vpermi2b (7 bits) and the top
//        bit as a blend mask: one gives digits 0..3 packed in 2-bit fields, the other digit 4;
//   gfni (variant 3, VBMI + GFNI): the lut decoder with one gf2p8affineqb per field instead of a shift
//        and an and (one op fewer for each of digits 1..3: about 7 % more plane weights per second).
// B = 256: one masked zmm load takes a plane's 52 bytes (lanes 52..63 zero); digit k meets the 64
// activations at q + 52k (lanes 52..63 meet code 0). B = 64: four blocks share a zmm, block j in
// 128-bit lane j (its 13 plane bytes, 3 zero lanes), digit k against the four blocks' digit group k
// gathered into one zmm; the int32 lanes of the one accumulator per plane are the scale groups' sums.
#if defined(ATD_HAVE_AVX512)

ATD_ALIGN64 const uint8_t atd_lut_c0123[256] = {
    0x00, 0x00, 0x00, 0x00, 0x40, 0x40, 0x40, 0x80, 0x80, 0x80, 0x10, 0x10, 0x10, 0x50, 0x50, 0x50,
    0x90, 0x90, 0x90, 0x20, 0x20, 0x20, 0x20, 0x60, 0x60, 0x60, 0xa0, 0xa0, 0xa0, 0x04, 0x04, 0x04,
    0x44, 0x44, 0x44, 0x84, 0x84, 0x84, 0x14, 0x14, 0x14, 0x14, 0x54, 0x54, 0x54, 0x94, 0x94, 0x94,
    0x24, 0x24, 0x24, 0x64, 0x64, 0x64, 0xa4, 0xa4, 0xa4, 0x08, 0x08, 0x08, 0x08, 0x48, 0x48, 0x48,
    0x88, 0x88, 0x88, 0x18, 0x18, 0x18, 0x58, 0x58, 0x58, 0x98, 0x98, 0x98, 0x28, 0x28, 0x28, 0x28,
    0x68, 0x68, 0x68, 0xa8, 0xa8, 0xa8, 0x01, 0x01, 0x01, 0x41, 0x41, 0x41, 0x81, 0x81, 0x81, 0x11,
    0x11, 0x11, 0x51, 0x51, 0x51, 0x51, 0x91, 0x91, 0x91, 0x21, 0x21, 0x21, 0x61, 0x61, 0x61, 0xa1,
    0xa1, 0xa1, 0x05, 0x05, 0x05, 0x45, 0x45, 0x45, 0x45, 0x85, 0x85, 0x85, 0x15, 0x15, 0x15, 0x55,
    0x55, 0x55, 0x95, 0x95, 0x95, 0x25, 0x25, 0x25, 0x65, 0x65, 0x65, 0x65, 0xa5, 0xa5, 0xa5, 0x09,
    0x09, 0x09, 0x49, 0x49, 0x49, 0x89, 0x89, 0x89, 0x19, 0x19, 0x19, 0x59, 0x59, 0x59, 0x59, 0x99,
    0x99, 0x99, 0x29, 0x29, 0x29, 0x69, 0x69, 0x69, 0xa9, 0xa9, 0xa9, 0x02, 0x02, 0x02, 0x42, 0x42,
    0x42, 0x82, 0x82, 0x82, 0x82, 0x12, 0x12, 0x12, 0x52, 0x52, 0x52, 0x92, 0x92, 0x92, 0x22, 0x22,
    0x22, 0x62, 0x62, 0x62, 0xa2, 0xa2, 0xa2, 0xa2, 0x06, 0x06, 0x06, 0x46, 0x46, 0x46, 0x86, 0x86,
    0x86, 0x16, 0x16, 0x16, 0x56, 0x56, 0x56, 0x96, 0x96, 0x96, 0x96, 0x26, 0x26, 0x26, 0x66, 0x66,
    0x66, 0xa6, 0xa6, 0xa6, 0x0a, 0x0a, 0x0a, 0x4a, 0x4a, 0x4a, 0x8a, 0x8a, 0x8a, 0x8a, 0x1a, 0x1a,
    0x1a, 0x5a, 0x5a, 0x5a, 0x9a, 0x9a, 0x9a, 0x2a, 0x2a, 0x2a, 0x6a, 0x6a, 0x6a, 0xaa, 0xaa, 0xaa,
};
ATD_ALIGN64 const uint8_t atd_lut_c4[256] = {
    0x00, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02,
    0x00, 0x01, 0x02, 0x00, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02,
    0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02,
    0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x02, 0x00, 0x01, 0x02,
    0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x02,
    0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00,
    0x01, 0x02, 0x00, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00,
    0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00,
    0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00,
    0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x02, 0x00,
    0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01,
    0x02, 0x00, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01,
    0x02, 0x00, 0x01, 0x02, 0x00, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01,
    0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01,
    0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x02, 0x00, 0x01,
    0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02, 0x00, 0x01, 0x02,
};

ATD_TARGET_AVX512 ATD_INLINE __m512i atd_digit512(__m512i ev, __m512i od) {
    // (code in the low byte) | (3b & 0xff00): vpternlog A | (B & C)
    return _mm512_ternarylogic_epi32(_mm512_mulhi_epu16(ev, _mm512_set1_epi16(3)),
                                     _mm512_mulhi_epu16(od, _mm512_set1_epi16(768)),
                                     _mm512_set1_epi16((short)0xff00), 0xF8);
}
ATD_TARGET_AVX512 ATD_INLINE __m512i atd_times3_epi16_512(__m512i v) {
    return _mm512_add_epi16(_mm512_add_epi16(v, v), v);
}

// the codes of digits 0..4 of the 64 bytes of P (mul decoder)
ATD_TARGET_AVX512 ATD_INLINE void atd_codes512_mul(__m512i P, const __m512i * tab, __m512i * c) {
    (void)tab;
    const __m512i hi = _mm512_set1_epi16((short)0xff00);
    __m512i       ev = _mm512_slli_epi16(P, 8), od = _mm512_and_si512(P, hi);
    c[0] = atd_digit512(ev, od);
    ATD_UNROLL for (int k = 1; k < ATD_TRITS_PER_BYTE; ++k) {
        ev   = atd_times3_epi16_512(ev);
        od   = atd_times3_epi16_512(od);
        c[k] = atd_digit512(ev, od);
    }
}
ATD_TARGET_AVX512 ATD_INLINE void atd_tables512_mul(__m512i * tab) {
    (void)tab;
}
// atd_tables512_lut and atd_codes512_lut (the VBMI decoder) are in atd-simd.h, shared with atd-mm.c

// B = 64: alpha = [a0 a1 a2 a3] (one per 128-bit lane j) -> each repeated over the four lanes of lane j
ATD_TARGET_AVX512 ATD_INLINE __m512 atd_alpha4x4(__m128 alpha) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(alpha));
}

#define ATD_DEFINE_AVX512_KERNELS(DEC, TARGET)                                                               \
    /* one 256-block: acc[i] sums to sum t q of plane i */                                                  \
    TARGET ATD_INLINE void atd_acc256_avx512_##DEC(const uint8_t * blk, const block_q8_K * yb, const int planes, \
                                                   __m256i * acc, const __m512i * tab) {                   \
        const __mmask64 plane = (1ull << ATD_S256) - 1;                                                     \
        __m512i         q[ATD_TRITS_PER_BYTE];                                                              \
        ATD_UNROLL for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {                                            \
            /* reads up to qs + 272: inside the block (bsums follow qs); lanes >= 52 meet code 0 */         \
            q[k] = _mm512_loadu_si512((const void *)(yb->qs + ATD_S256 * k));                               \
        }                                                                                                   \
        const __m512i init = _mm512_zextsi256_si512(                                                        \
            _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)yb->bsums), _mm256_set1_epi16(-1)));      \
        ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                       \
            __m512i c[ATD_TRITS_PER_BYTE];                                                                  \
            atd_codes512_##DEC(_mm512_maskz_loadu_epi8(plane, blk + 2 * planes + i * ATD_S256), tab, c);    \
            __m512i a = _mm512_dpbusd_epi32(init, c[0], q[0]);                                              \
            ATD_UNROLL for (int k = 1; k < ATD_TRITS_PER_BYTE; ++k) a = _mm512_dpbusd_epi32(a, c[k], q[k]); \
            acc[i] = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));          \
        }                                                                                                   \
    }                                                                                                       \
    TARGET ATD_INLINE void atd_k256_avx512_##DEC(int n, float * s, const uint8_t * x, const block_q8_K * y,  \
                                                 const int planes) {                                       \
        const int    nb  = n / QK_ATD;                                                                      \
        const size_t bsz = ATD_TYPE_SIZE(planes, QK_ATD);                                                   \
        __m512i      tab[8];                                                                                \
        atd_tables512_##DEC(tab);                                                                           \
        __m128 S[4] = { _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps() };           \
        for (int b16 = 0; b16 < nb; b16 += ATD_LANES) {                                                     \
          ATD_UNROLL for (int q = 0; q < 4; ++q) { /* unrolled: S[q] stays in a register */                \
            const int b0 = b16 + 4 * q;                                                                     \
            if (b0 >= nb) break;                                                                            \
            const int m = nb - b0 < 4 ? nb - b0 : 4;                                                        \
            __m256i   acc[4][ATD_MAX_PLANES];                                                               \
            ATD_UNROLL for (int j = 0; j < 4; ++j) {                                                        \
                if (j < m) {                                                                                \
                    ATD_PREFETCH_BLOCK(x + (size_t)(b0 + j) * bsz, bsz);                                    \
                    atd_acc256_avx512_##DEC(x + (size_t)(b0 + j) * bsz, y + b0 + j, planes, acc[j], tab);   \
                } else {                                                                                    \
                    for (int i = 0; i < planes; ++i) acc[j][i] = _mm256_setzero_si256();                     \
                }                                                                                           \
            }                                                                                               \
            __m128i isum[ATD_MAX_PLANES];                                                                   \
            __m128  alpha[ATD_MAX_PLANES];                                                                  \
            ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                   \
                isum[i] = atd_hsum4_epi32(acc[0][i], acc[1][i], acc[2][i], acc[3][i]);                      \
            }                                                                                               \
            atd_alpha4(x + (size_t)b0 * bsz, bsz, m, alpha);                                                \
            S[q] = atd_combine4(S[q], isum, alpha, atd_dy4_256(y + b0, m), planes);                         \
          }                                                                                                 \
        }                                                                                                   \
        *s = atd_finish4(S);                                                                                \
    }                                                                                                       \
    TARGET ATD_INLINE void atd_k64_avx512_##DEC(int n, float * s, const uint8_t * x,                        \
                                                const block_atd_q8_64 * y, const int planes) {             \
        const int    nb  = n / QK_ATD_64;                                                                   \
        const size_t bsz = ATD_TYPE_SIZE(planes, QK_ATD_64);                                                \
        __m512i      tab[8];                                                                                \
        atd_tables512_##DEC(tab);                                                                           \
        __m512 S = _mm512_setzero_ps(); /* lane j: acc[j][0..3] */                                           \
        for (int b0 = 0; b0 < nb; b0 += ATD_LANES64) {                                                      \
            const int               m  = nb - b0 < 4 ? nb - b0 : 4; /* blocks in this zmm */                \
            const block_atd_q8_64 * yb = y + b0;                                                            \
            /* digit group k of the 4 blocks in one zmm: a 4x4 transpose of 128-bit lanes (groups 0..3), */ \
            /* inserts (group 4); the scales and sums likewise */                                           \
            __m512i L[4], o[ATD_TRITS_PER_BYTE], H[2];                                                      \
            ATD_UNROLL for (int j = 0; j < 4; ++j) {                                                        \
                L[j] = j < m ? _mm512_loadu_si512((const void *)yb[j].qs[0]) : _mm512_setzero_si512();      \
            }                                                                                               \
            {                                                                                               \
                const __m512i t0 = _mm512_shuffle_i64x2(L[0], L[1], 0x44), t1 = _mm512_shuffle_i64x2(L[0], L[1], 0xEE); \
                const __m512i t2 = _mm512_shuffle_i64x2(L[2], L[3], 0x44), t3 = _mm512_shuffle_i64x2(L[2], L[3], 0xEE); \
                o[0] = _mm512_shuffle_i64x2(t0, t2, 0x88);                                                  \
                o[1] = _mm512_shuffle_i64x2(t0, t2, 0xDD);                                                  \
                o[2] = _mm512_shuffle_i64x2(t1, t3, 0x88);                                                  \
                o[3] = _mm512_shuffle_i64x2(t1, t3, 0xDD);                                                  \
                o[4] = _mm512_setzero_si512();                                                              \
                ATD_UNROLL for (int j = 0; j < 2; ++j) H[j] = _mm512_setzero_si512();                       \
                ATD_UNROLL for (int j = 0; j < 4; ++j) {                                                    \
                    if (j < m) {                                                                            \
                        o[4] = _mm512_mask_broadcast_i32x4(o[4], (__mmask16)(0xf << (4 * j)),               \
                                                           _mm_loadu_si128((const __m128i *)yb[j].qs[4]));  \
                        /* d[4] and sum[4] of block j: lanes 2 (j % 2), 2 (j % 2) + 1 of H[j / 2] */        \
                        H[j / 2] = _mm512_mask_broadcast_i64x4(H[j / 2], (__mmask8)(0xf << (4 * (j % 2))),  \
                                                               _mm256_loadu_si256((const __m256i *)&yb[j])); \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
            const __m512  D    = _mm512_castsi512_ps(_mm512_shuffle_i64x2(H[0], H[1], 0x88));               \
            const __m512i init = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_shuffle_i64x2(H[0], H[1], 0xDD)); \
            __m128 alpha[ATD_MAX_PLANES];                                                                   \
            atd_alpha4(x + (size_t)b0 * bsz, bsz, m, alpha);                                                \
            const uint8_t * blk = x + (size_t)b0 * bsz + 2 * planes;                                        \
            ATD_PREFETCH_BLOCK(x + (size_t)b0 * bsz, 4 * bsz);                                              \
            __m512 acc = _mm512_setzero_ps();                                                               \
            ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                   \
                /* the 13 plane bytes of each block, masked: nothing is read past the row */                \
                const uint8_t * p  = blk + i * ATD_S64;                                                     \
                const __m128i   x0 = _mm_maskz_loadu_epi8(0x1fff, p);                                       \
                const __m128i   x1 = m > 1 ? _mm_maskz_loadu_epi8(0x1fff, p + bsz) : _mm_setzero_si128();  \
                const __m128i   x2 = m > 2 ? _mm_maskz_loadu_epi8(0x1fff, p + 2 * bsz) : _mm_setzero_si128(); \
                const __m128i   x3 = m > 3 ? _mm_maskz_loadu_epi8(0x1fff, p + 3 * bsz) : _mm_setzero_si128(); \
                const __m512i   P  = _mm512_inserti64x4(                                                    \
                    _mm512_castsi256_si512(_mm256_inserti128_si256(_mm256_castsi128_si256(x0), x1, 1)),     \
                    _mm256_inserti128_si256(_mm256_castsi128_si256(x2), x3, 1), 1);                         \
                __m512i c[ATD_TRITS_PER_BYTE];                                                              \
                atd_codes512_##DEC(P, tab, c);                                                              \
                __m512i a = _mm512_dpbusd_epi32(init, c[0], o[0]);                                          \
                ATD_UNROLL for (int k = 1; k < ATD_TRITS_PER_BYTE; ++k) a = _mm512_dpbusd_epi32(a, c[k], o[k]); \
                acc = _mm512_fmadd_ps(atd_alpha4x4(alpha[i]), _mm512_cvtepi32_ps(a), acc);                  \
            }                                                                                               \
            S = _mm512_fmadd_ps(D, acc, S);                                                                 \
        }                                                                                                   \
        *s = atd_finish64(_mm512_castps512_ps256(S), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(S), 1))); \
    }                                                                                                       \
    TARGET static void atd_vec_dot_avx512_##DEC(int n, float * s, const void * vx, const void * vy,         \
                                                int planes, int block) {                                   \
        const uint8_t * x = (const uint8_t *)vx;                                                            \
        if (n < block) { *s = 0.0f; return; }                                                               \
        if (block == QK_ATD) {                                                                              \
            const block_q8_K * y = (const block_q8_K *)vy;                                                  \
            ATD_DISPATCH_PLANES(planes, atd_k256_avx512_##DEC, n, s, x, y);                                 \
        } else {                                                                                            \
            const block_atd_q8_64 * y = (const block_atd_q8_64 *)vy;                                        \
            ATD_DISPATCH_PLANES(planes, atd_k64_avx512_##DEC, n, s, x, y);                                  \
        }                                                                                                   \
    }

ATD_DEFINE_AVX512_KERNELS(mul, ATD_TARGET_AVX512)
#if defined(ATD_HAVE_AVX512VBMI)
ATD_DEFINE_AVX512_KERNELS(lut, ATD_TARGET_AVX512VBMI)
#endif
#if defined(ATD_HAVE_AVX512GFNI)
ATD_DEFINE_AVX512_KERNELS(gfni, ATD_TARGET_AVX512GFNI)
#endif

// ---- AVX-512 gemv of the 64 family: four rows per zmm ----------------------------------------------------
//
// One activation row against many weight rows (token generation): 128-bit lane r holds block b of row
// r (r = 0..3), so every lane meets the same activations, broadcast from memory, and no cross-block
// transpose is needed. With VBMI each row's block is one masked load and every plane is gathered from
// two pairs of rows by vpermi2b; without, four masked 16-byte loads per plane. The groups' sums of q
// start the accumulator, whose int32 lanes are then the four groups' sums of each row: no reduction.
// Per row the float combination is the scalar loop's (lane b % 4 of that row), so each result equals
// atd_vec_dot of that row bit for bit.

// plane i of block b of four rows, one per 128-bit lane (13 bytes, 3 zero lanes)
ATD_TARGET_AVX512 ATD_INLINE __m512i atd_gather4_ins(const uint8_t * blk, size_t bx, int off) {
    const uint8_t * p   = blk + off;
    const __m256i   P01 = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_maskz_loadu_epi8(0x1fff, p)),
                                                  _mm_maskz_loadu_epi8(0x1fff, p + bx), 1);
    const __m256i   P23 = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_maskz_loadu_epi8(0x1fff, p + 2 * bx)),
                                                  _mm_maskz_loadu_epi8(0x1fff, p + 3 * bx), 1);
    return _mm512_inserti64x4(_mm512_castsi256_si512(P01), P23, 1);
}

// the plane scales of the four rows' blocks: A[i] lane r = alpha_i of row r, in all four of its floats
ATD_TARGET_AVX512 ATD_INLINE void atd_gemv64_alpha_mul(const __m512i * R, const uint8_t * blk, size_t bx,
                                                      int planes, __m512 * A) {
    (void)R;
    __m128 alpha[ATD_MAX_PLANES];
    atd_alpha4(blk, bx, 4, alpha);
    for (int i = 0; i < planes; ++i) A[i] = atd_alpha4x4(alpha[i]);
}

#define ATD_GEMV64_ROWS_mul(R, blk, bx, bsz) (void)(R)
#define ATD_GEMV64_PLANE_mul(R, idx, blk, bx, off) atd_gather4_ins((blk), (bx), (off))
#if defined(ATD_HAVE_AVX512VBMI)
// VBMI: rows 0, 1 and rows 2, 3 as two 128-byte tables; idx picks the plane's 13 bytes for each lane
#define ATD_GEMV64_ROWS_lut(R, blk, bx, bsz)                                                                 \
    do {                                                                                                     \
        const __mmask64 m_ = (bsz) >= 64 ? ~0ull : (1ull << (bsz)) - 1;                                      \
        for (int r_ = 0; r_ < 4; ++r_) (R)[r_] = _mm512_maskz_loadu_epi8(m_, (blk) + (size_t)r_ * (bx));   \
    } while (0)
#define ATD_GEMV64_PLANE_lut(R, idx, blk, bx, off)                                                           \
    _mm512_or_si512(_mm512_maskz_permutex2var_epi8(0x1fff1fffull, (R)[0], (idx), (R)[1]),                   \
                    _mm512_maskz_permutex2var_epi8(0x1fff1fffull << 32, (R)[2], (idx), (R)[3]))
// word 4r + i of W takes word i (alpha_i) of row r's block: index i, + 32 for rows 1 and 3 (the second
// table of the pairs R[0], R[1] and R[2], R[3])
static const ATD_ALIGN64 uint16_t atd_gemv64_alpha_idx[32] = {
    0, 1, 2, 3, 32, 33, 34, 35, 0, 1, 2, 3, 32, 33, 34, 35,
};
// the scales straight from the rows' blocks in R (fp16 word i of R[r]): the 16 of the four rows by two
// word permutes and one conversion, then each plane's to the four floats of each row
ATD_TARGET_AVX512VBMI ATD_INLINE void atd_gemv64_alpha_lut(const __m512i * R, const uint8_t * blk, size_t bx,
                                                          int planes, __m512 * A) {
    (void)blk;
    (void)bx;
    const __m512i   idx = _mm512_load_si512((const void *)atd_gemv64_alpha_idx);
    const __mmask32 r01 = 0xffu;  // words of rows 0 and 1
    const __m512i   W   = _mm512_mask_blend_epi16(r01, _mm512_permutex2var_epi16(R[2], idx, R[3]),
                                                  _mm512_permutex2var_epi16(R[0], idx, R[1]));
    const __m512    F   = _mm512_cvtph_ps(_mm512_castsi512_si256(W));  // float 4r + i = alpha_i of row r
    for (int i = 0; i < planes; ++i) {
        A[i] = _mm512_permutexvar_ps(_mm512_setr_epi32(i, i, i, i, 4 + i, 4 + i, 4 + i, 4 + i, 8 + i, 8 + i, 8 + i,
                                                       8 + i, 12 + i, 12 + i, 12 + i, 12 + i), F);
    }
}
#endif
#if defined(ATD_HAVE_AVX512GFNI)
#define ATD_GEMV64_ROWS_gfni  ATD_GEMV64_ROWS_lut
#define ATD_GEMV64_PLANE_gfni ATD_GEMV64_PLANE_lut
#define atd_gemv64_alpha_gfni atd_gemv64_alpha_lut
#endif

#define ATD_DEFINE_AVX512_GEMV64(DEC, TARGET)                                                                \
    TARGET ATD_INLINE void atd_gemv64_avx512_##DEC##_k(int n, const uint8_t * x, size_t bx,                   \
                                                       const block_atd_q8_64 * y, float * out, const int planes) { \
        const int    nb  = n / QK_ATD_64;                                                                   \
        const size_t bsz = ATD_TYPE_SIZE(planes, QK_ATD_64);                                                \
        __m512i      tab[8];                                                                                \
        atd_tables512_##DEC(tab);                                                                           \
        /* gather indices: lane l takes byte 2N + 13 i + (l % 16) of row (l / 16) % 2 of its table pair */  \
        __m512i gidx[ATD_MAX_PLANES];                                                                       \
        (void)gidx;                                                                                         \
        ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                       \
            ATD_ALIGN64 uint8_t t[64];                                                                      \
            for (int l = 0; l < 64; ++l) t[l] = (uint8_t)(((l >> 4) & 1) * 64 + 2 * planes + ATD_S64 * i + (l & 15)); \
            gidx[i] = _mm512_load_si512((const void *)t);                                                   \
        }                                                                                                   \
        __m512 L[ATD_LANES64]; /* lane r of L[l]: acc[l][0..3] of row r */                                  \
        for (int l = 0; l < ATD_LANES64; ++l) L[l] = _mm512_setzero_ps();                                   \
        for (int b4 = 0; b4 < nb; b4 += ATD_LANES64) {                                                      \
          ATD_UNROLL for (int l = 0; l < ATD_LANES64; ++l) { /* unrolled: L[l] stays in a register */      \
            const int b = b4 + l;                                                                           \
            if (b >= nb) break;                                                                             \
            const block_atd_q8_64 * yb = y + b;                                                             \
            __m512i o[ATD_TRITS_PER_BYTE];                                                                  \
            ATD_UNROLL for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {                                       \
                o[k] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)yb->qs[k]));                 \
            }                                                                                               \
            const __m512i init = _mm512_sub_epi32(_mm512_setzero_si512(),                                   \
                                                  _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)yb->sum))); \
            const uint8_t * blk = x + (size_t)b * bsz;                                                      \
            for (int r = 0; r < 4; ++r) ATD_GEMV_PREFETCH(blk + (size_t)r * bx, bx, bsz);                   \
            __m512i R[4];                                                                                   \
            ATD_GEMV64_ROWS_##DEC(R, blk, bx, bsz);                                                         \
            __m512 A[ATD_MAX_PLANES];                                                                       \
            atd_gemv64_alpha_##DEC(R, blk, bx, planes, A);                                                  \
            __m512 acc = _mm512_setzero_ps();                                                               \
            ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                   \
                const __m512i P = ATD_GEMV64_PLANE_##DEC(R, gidx[i], blk, bx, 2 * planes + i * ATD_S64);    \
                __m512i       c[ATD_TRITS_PER_BYTE];                                                        \
                atd_codes512_##DEC(P, tab, c);                                                              \
                __m512i a = _mm512_dpbusd_epi32(init, c[0], o[0]);                                          \
                ATD_UNROLL for (int k = 1; k < ATD_TRITS_PER_BYTE; ++k) a = _mm512_dpbusd_epi32(a, c[k], o[k]); \
                acc = _mm512_fmadd_ps(A[i], _mm512_cvtepi32_ps(a), acc);                                    \
            }                                                                                               \
            L[l] = _mm512_fmadd_ps(_mm512_broadcast_f32x4(_mm_loadu_ps(yb->d)), acc, L[l]);                 \
          }                                                                                                 \
        }                                                                                                   \
        /* per row as atd_dot_reduce64: v_g = (acc0 + acc2) + (acc1 + acc3), (v0 + v1) + (v2 + v3) */      \
        const __m512 v = _mm512_add_ps(_mm512_add_ps(L[0], L[2]), _mm512_add_ps(L[1], L[3]));               \
        const __m512 t = _mm512_add_ps(v, _mm512_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1)));                \
        const __m512 r = _mm512_add_ps(t, _mm512_shuffle_ps(t, t, _MM_SHUFFLE(1, 0, 3, 2)));                \
        _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(                                    \
                               _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), r)));    \
    }                                                                                                       \
    TARGET static void atd_gemv64_avx512_##DEC(int n, const uint8_t * x, size_t bx, const block_atd_q8_64 * y, \
                                               float * out, int planes) {                                  \
        ATD_DISPATCH_PLANES(planes, atd_gemv64_avx512_##DEC##_k, n, x, bx, y, out);                        \
    }

ATD_DEFINE_AVX512_GEMV64(mul, ATD_TARGET_AVX512)
#if defined(ATD_HAVE_AVX512VBMI)
ATD_DEFINE_AVX512_GEMV64(lut, ATD_TARGET_AVX512VBMI)
#endif
#if defined(ATD_HAVE_AVX512GFNI)
ATD_DEFINE_AVX512_GEMV64(gfni, ATD_TARGET_AVX512GFNI)
#endif

// ---- AVX-512 gemv of the 256 family: four rows per step -------------------------------------------------
//
// The activations of block b (five zmm, the bsums) are loaded once for four weight rows; each row's
// plane sums go through the same vpdpbusd chain as vec_dot's, the four rows' sums of a plane are reduced
// together, and row r's float parts live in lane r of a float32x4 per lane b % 16. Each result equals
// atd_vec_dot of that row bit for bit.
#define ATD_DEFINE_AVX512_GEMV256(DEC, TARGET)                                                               \
    TARGET ATD_INLINE void atd_gemv256_avx512_##DEC##_k(int n, const uint8_t * x, size_t bx,                  \
                                                        const block_q8_K * y, float * out, const int planes) { \
        const int       nb    = n / QK_ATD;                                                                 \
        const size_t    bsz   = ATD_TYPE_SIZE(planes, QK_ATD);                                              \
        const __mmask64 plane = (1ull << ATD_S256) - 1;                                                     \
        __m512i         tab[8];                                                                             \
        atd_tables512_##DEC(tab);                                                                           \
        __m128 L[ATD_LANES];                                                                                \
        for (int l = 0; l < ATD_LANES; ++l) L[l] = _mm_setzero_ps();                                        \
        for (int b = 0; b < nb; ++b) {                                                                      \
            const block_q8_K * yb = y + b;                                                                  \
            __m512i            q[ATD_TRITS_PER_BYTE];                                                       \
            ATD_UNROLL for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {                                        \
                q[k] = _mm512_loadu_si512((const void *)(yb->qs + ATD_S256 * k));                           \
            }                                                                                               \
            const __m512i init = _mm512_zextsi256_si512(                                                    \
                _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)yb->bsums), _mm256_set1_epi16(-1)));  \
            const uint8_t * blk = x + (size_t)b * bsz;                                                      \
            __m256i acc[4][ATD_MAX_PLANES];                                                                 \
            ATD_UNROLL for (int r = 0; r < 4; ++r) {                                                        \
                const uint8_t * br = blk + (size_t)r * bx;                                                  \
                ATD_GEMV_PREFETCH(br, bx, bsz);                                                             \
                ATD_UNROLL for (int i = 0; i < planes; ++i) {                                               \
                    __m512i c[ATD_TRITS_PER_BYTE];                                                          \
                    atd_codes512_##DEC(_mm512_maskz_loadu_epi8(plane, br + 2 * planes + i * ATD_S256), tab, c); \
                    __m512i a = _mm512_dpbusd_epi32(init, c[0], q[0]);                                      \
                    ATD_UNROLL for (int k = 1; k < ATD_TRITS_PER_BYTE; ++k) a = _mm512_dpbusd_epi32(a, c[k], q[k]); \
                    acc[r][i] = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1)); \
                }                                                                                           \
            }                                                                                               \
            L[b % ATD_LANES] = atd_gemv4_step(L[b % ATD_LANES], acc, blk, bx, yb->d, planes);               \
        }                                                                                                   \
        atd_gemv4_finish(L, out);                                                                           \
    }                                                                                                       \
    TARGET static void atd_gemv256_avx512_##DEC(int n, const uint8_t * x, size_t bx, const block_q8_K * y,   \
                                                float * out, int planes) {                                 \
        ATD_DISPATCH_PLANES(planes, atd_gemv256_avx512_##DEC##_k, n, x, bx, y, out);                       \
    }

ATD_DEFINE_AVX512_GEMV256(mul, ATD_TARGET_AVX512)
#if defined(ATD_HAVE_AVX512VBMI)
ATD_DEFINE_AVX512_GEMV256(lut, ATD_TARGET_AVX512VBMI)
#endif
#if defined(ATD_HAVE_AVX512GFNI)
ATD_DEFINE_AVX512_GEMV256(gfni, ATD_TARGET_AVX512GFNI)
#endif
// ---- r2 layout (atd.h), AVX-512 gemv: a group of four rows (one stream) per step, one zmm per plane -----
//
// No software prefetch: the hardware prefetchers follow one stream (measured on Zen 4 from DRAM, one thread,
// ATD2 4096-wide rows: 21-22 GB/s without, 10-18 GB/s with prefetches 2 or 8 KB ahead; the file layout's
// four strided rows reach 9-11 GB/s).
// Digit-row k of a plane is (P >> 2k) & 3 (shift: variant 1; one gf2p8affineqb with GFNI) against
// q[64k .. 64k + 63]; the sums and the float combination are those of atd_gemv256_avx512, so each result
// equals atd_vec_dot of the original row.
ATD_TARGET_AVX512 ATD_INLINE __m512i atd_r2_field_shift(__m512i P, int k) {
    return _mm512_and_si512(k ? _mm512_srli_epi16(P, 2 * k) : P, _mm512_set1_epi8(3));
}
#if defined(ATD_HAVE_AVX512GFNI)
// bit i of each result byte is the parity of (byte 7 - i of the matrix) & x: bits 2k, 2k+1 to bits 0, 1
ATD_TARGET_AVX512GFNI ATD_INLINE __m512i atd_r2_field_gfni(__m512i P, int k) {
    const long long m = (long long)(((uint64_t)(1u << (2 * k)) << 56) | ((uint64_t)(2u << (2 * k)) << 48));
    return _mm512_gf2p8affine_epi64_epi8(P, _mm512_set1_epi64(m), 0);
}
#endif
#define ATD_DEFINE_AVX512_GEMV_R2(FIELD, TARGET)                                                             \
    TARGET ATD_INLINE void atd_gemv_r2_avx512_##FIELD##_k(int n, const uint8_t * x, const block_q8_K * y,    \
                                                         float * out, const int planes) {                  \
        const int    nb  = n / QK_ATD;                                                                      \
        const size_t bsz = ATD_R2_TYPE_SIZE(planes, QK_ATD);                                                        \
        __m128       L[ATD_LANES];                                                                          \
        for (int l = 0; l < ATD_LANES; ++l) L[l] = _mm_setzero_ps();                                        \
        for (int b = 0; b < nb; ++b) {                                                                      \
            const block_q8_K * yb = y + b;                                                                  \
            __m512i            q[4];                                                                        \
            ATD_UNROLL for (int k = 0; k < 4; ++k) q[k] = _mm512_loadu_si512((const void *)(yb->qs + 64 * k)); \
            const __m512i init = _mm512_zextsi256_si512(                                                    \
                _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)yb->bsums), _mm256_set1_epi16(-1)));  \
            const uint8_t * blk = x + (size_t)b * 4 * bsz;                                                  \
            __m256i acc[4][ATD_MAX_PLANES];                                                                 \
            ATD_UNROLL for (int r = 0; r < 4; ++r) {                                                        \
                const uint8_t * br = blk + (size_t)r * bsz;                                                 \
                ATD_UNROLL for (int i = 0; i < planes; ++i) {                                               \
                    const __m512i P = _mm512_loadu_si512((const void *)(br + 2 * planes + i * ATD_R2_PLANE_BYTES(QK_ATD))); \
                    __m512i a = _mm512_dpbusd_epi32(init, atd_r2_field_##FIELD(P, 0), q[0]);                \
                    ATD_UNROLL for (int k = 1; k < 4; ++k) a = _mm512_dpbusd_epi32(a, atd_r2_field_##FIELD(P, k), q[k]); \
                    acc[r][i] = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1)); \
                }                                                                                           \
            }                                                                                               \
            L[b % ATD_LANES] = atd_gemv4_step(L[b % ATD_LANES], acc, blk, bsz, yb->d, planes);              \
        }                                                                                                   \
        atd_gemv4_finish(L, out);                                                                           \
    }                                                                                                       \
    TARGET static void atd_gemv_r2_avx512_##FIELD(int n, const uint8_t * x, const block_q8_K * y, float * out, \
                                                  int planes) {                                            \
        ATD_DISPATCH_PLANES(planes, atd_gemv_r2_avx512_##FIELD##_k, n, x, y, out);                         \
    }

ATD_DEFINE_AVX512_GEMV_R2(shift, ATD_TARGET_AVX512)
#if defined(ATD_HAVE_AVX512GFNI)
ATD_DEFINE_AVX512_GEMV_R2(gfni, ATD_TARGET_AVX512GFNI)
#endif

// The 64 family: a group's plane is one zmm (128-bit lane r: row r), field k meets q[16k .. 16k + 15] in
// every lane; the int32 lanes (scale groups) and their float combination are the AVX2 gemv's (the scalar
// reference's).
#define ATD_DEFINE_AVX512_GEMV_R2_64(FIELD, TARGET)                                                          \
    TARGET ATD_INLINE void atd_gemv_r2_64_avx512_##FIELD##_k(int n, const uint8_t * x, const block_atd_q8_64r2 * y, \
                                                            float * out, const int planes) {               \
        const size_t    gsz = ATD_R2_GROUP * ATD_R2_TYPE_SIZE(planes, QK_ATD_64);                           \
        const __mmask16 sm  = (__mmask16)((1u << (4 * planes)) - 1);  /* the group's 4 N scales */         \
        __m512i         idx[ATD_MAX_PLANES];  /* lane r of plane i: scale r N + i */                       \
        ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                       \
            idx[i] = _mm512_set_epi32(3 * planes + i, 3 * planes + i, 3 * planes + i, 3 * planes + i,       \
                                      2 * planes + i, 2 * planes + i, 2 * planes + i, 2 * planes + i,       \
                                      planes + i, planes + i, planes + i, planes + i, i, i, i, i);          \
        }                                                                                                   \
        __m512 acc = _mm512_setzero_ps();                                                                   \
        for (int b = 0; b < n / QK_ATD_64; ++b) {                                                           \
            const block_atd_q8_64r2 * yb = y + b;                                                           \
            const uint8_t *           g  = x + (size_t)b * gsz;                                             \
            __m512i                   q[4];                                                                 \
            ATD_UNROLL for (int k = 0; k < 4; ++k) q[k] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(yb->qs + 16 * k))); \
            const __m512i init = _mm512_sub_epi32(_mm512_setzero_si512(),                                   \
                                                  _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)yb->sum))); \
            const __m512  d    = _mm512_broadcast_f32x4(_mm_loadu_ps(yb->d));                               \
            const __m512  al   = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(sm, g));                          \
            ATD_UNROLL for (int i = 0; i < planes; ++i) {                                                   \
                const __m512i P = _mm512_loadu_si512((const void *)(g + 8 * planes + 64 * i));              \
                __m512i a = _mm512_dpbusd_epi32(init, atd_r2_field_##FIELD(P, 0), q[0]);                    \
                ATD_UNROLL for (int k = 1; k < 4; ++k) a = _mm512_dpbusd_epi32(a, atd_r2_field_##FIELD(P, k), q[k]); \
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(_mm512_permutexvar_ps(idx[i], al), d), acc); \
            }                                                                                               \
        }                                                                                                   \
        __m512 t = _mm512_add_ps(acc, _mm512_permute_ps(acc, 0xb1));                                        \
        t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4e));                                                   \
        _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, t)));                    \
    }                                                                                                       \
    TARGET static void atd_gemv_r2_64_avx512_##FIELD(int n, const uint8_t * x, const block_atd_q8_64r2 * y,  \
                                                     float * out, int planes) {                            \
        ATD_DISPATCH_PLANES(planes, atd_gemv_r2_64_avx512_##FIELD##_k, n, x, y, out);                       \
    }

ATD_DEFINE_AVX512_GEMV_R2_64(shift, ATD_TARGET_AVX512)
#if defined(ATD_HAVE_AVX512GFNI)
ATD_DEFINE_AVX512_GEMV_R2_64(gfni, ATD_TARGET_AVX512GFNI)
#endif
#endif  // ATD_HAVE_AVX512
#endif  // ATD_HAVE_AVX2

// ---- NEON ------------------------------------------------------------------------------------------------
//
// Integer plane sums with NEON (8-bit multiplies decode the digits: x_k = b * 3^k mod 256, code =
// (x_k * 3) >> 8; sdot when the CPU has it, else widening multiplies), then the float combination of
// 16 blocks at once (four float32x4 lanes sets), so results equal the scalar path bit for bit.
#if defined(ATD_HAVE_NEON)

static inline int32x4_t atd_neon_dot(int32x4_t acc, uint8x16_t codes, int8x16_t q) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, vreinterpretq_s8_u8(codes), q);  // codes 0..2 are valid int8
#else
    // int32 lane m gets bytes 4m..4m+3, as sdot does (the 64 family's group sums need it)
    const int8x16_t c  = vreinterpretq_s8_u8(codes);
    const int16x8_t lo = vmull_s8(vget_low_s8(c), vget_low_s8(q)), hi = vmull_s8(vget_high_s8(c), vget_high_s8(q));
    return vpadalq_s16(acc, vpaddq_s16(lo, hi));  // pairs: |.| <= 2 * 2 * 128
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

// 16 blocks' integer sums, plane scales and activation scales of the 256 family, combined at once
typedef struct {
    int32_t  isum[ATD_MAX_PLANES][ATD_LANES];  // [plane][block % 16], sum t q (exact)
    uint16_t alpha[ATD_MAX_PLANES][ATD_LANES];  // fp16 plane scales
    float    dy[ATD_LANES];                     // activation scales
} atd_group;

static void atd_combine16_neon(float32x4_t * S, const atd_group * g, int planes) {
    for (int v = 0; v < 4; ++v) {
        float32x4_t acc = vdupq_n_f32(0.0f);
        for (int i = 0; i < planes; ++i) {
            const float32x4_t a = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(g->alpha[i] + 4 * v)));
            acc = vfmaq_f32(acc, a, vcvtq_f32_s32(vld1q_s32(g->isum[i] + 4 * v)));
        }
        S[v] = vfmaq_f32(S[v], vld1q_f32(g->dy + 4 * v), acc);
    }
}

static void atd_vec_dot_neon(int n, float * s, const void * vx, const void * vy, int planes, int block) {
    const uint8_t * x   = (const uint8_t *)vx;
    const size_t    bsz = ATD_TYPE_SIZE(planes, block);
    const int       nb  = n / block;
    if (block == QK_ATD_64) {
        // one block at a time: the int32 lanes of each plane's sum are the four groups' sums
        const block_atd_q8_64 * y     = (const block_atd_q8_64 *)vy;
        const uint8x16_t        three = vdupq_n_u8(3);
        float32x4_t             S[ATD_LANES64];
        for (int l = 0; l < ATD_LANES64; ++l) S[l] = vdupq_n_f32(0.0f);
        for (int b = 0; b < nb; ++b) {
            const uint8_t * blk  = x + (size_t)b * bsz;
            const int32x4_t init = vnegq_s32(vld1q_s32(y[b].sum));
            float32x4_t     acc  = vdupq_n_f32(0.0f);
            for (int i = 0; i < planes; ++i) {
                // 13 plane bytes in a zeroed 16-byte buffer: no read past the row
                uint8_t buf[16] = { 0 };
                memcpy(buf, blk + 2 * planes + i * ATD_S64, ATD_S64);
                uint8x16_t x8 = vld1q_u8(buf);
                int32x4_t  a  = init;
                for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
                    a  = atd_neon_dot(a, atd_neon_digit(x8), vld1q_s8(y[b].qs[k]));
                    x8 = vmulq_u8(x8, three);
                }
                acc = vfmaq_f32(acc, vdupq_n_f32(atd_dot_h2f(atd_dot_load_u16(blk + 2 * i))), vcvtq_f32_s32(a));
            }
            S[b % ATD_LANES64] = vfmaq_f32(S[b % ATD_LANES64], vld1q_f32(y[b].d), acc);
        }
        float acc[ATD_LANES64][ATD_Q8_64_GROUPS];
        for (int l = 0; l < ATD_LANES64; ++l) vst1q_f32(acc[l], S[l]);
        *s = atd_dot_reduce64(acc);
        return;
    }
    const block_q8_K * y = (const block_q8_K *)vy;
    atd_group          g;
    float32x4_t        S[4] = { vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f) };
    // bytes 0..15, 16..31, 32..47 and 36..51 (lanes 0..11 cleared); reads stay in the plane and, for the
    // activations, inside the q8_K block (qs + 260 at most)
    const uint8x16_t tail = vcombine_u8(vcreate_u8(0), vcreate_u8(0xffffffff00000000ull));
    for (int b = 0; b < nb; ++b) {
        const uint8_t *    blk  = x + (size_t)b * bsz;
        const int          l    = b % ATD_LANES;
        const block_q8_K * yb   = y + b;
        const int32_t      sumq = vaddvq_s32(vaddq_s32(vpaddlq_s16(vld1q_s16(yb->bsums)),
                                                       vpaddlq_s16(vld1q_s16(yb->bsums + 8))));
        for (int i = 0; i < planes; ++i) {
            const uint8_t * p   = blk + 2 * planes + i * ATD_S256;
            int32x4_t       acc = vdupq_n_s32(0);
            acc = atd_neon_bytes(acc, vld1q_u8(p), yb->qs, ATD_S256);
            acc = atd_neon_bytes(acc, vld1q_u8(p + 16), yb->qs + 16, ATD_S256);
            acc = atd_neon_bytes(acc, vld1q_u8(p + 32), yb->qs + 32, ATD_S256);
            acc = atd_neon_bytes(acc, vandq_u8(vld1q_u8(p + 36), tail), yb->qs + 36, ATD_S256);
            g.isum[i][l] = vaddvq_s32(acc) - sumq;
            g.alpha[i][l] = atd_dot_load_u16(blk + 2 * i);
        }
        g.dy[l] = yb->d;
        if (l == ATD_LANES - 1 || b == nb - 1) {
            // lanes past a last, partial group add nothing (d_y = 0, finite sums and scales)
            for (int t = l + 1; t < ATD_LANES; ++t) {
                g.dy[t] = 0.0f;
                for (int i = 0; i < ATD_MAX_PLANES; ++i) g.isum[i][t] = 0, g.alpha[i][t] = 0;
            }
            atd_combine16_neon(S, &g, planes);
        }
    }
    float acc[ATD_LANES];
    for (int v = 0; v < 4; ++v) vst1q_f32(acc + 4 * v, S[v]);
    *s = atd_dot_reduce16(acc);
}
#endif  // NEON

// ---- dispatch ----------------------------------------------------------------------------------------
//
// Variants inside a path (tests force them with atd_dot_set_variant):
//   AVX2:    1 maddubs, 2 AVX-VNNI, 3 AVX512-VL vpdpbusd on ymm (a stand-in for 2 on AVX-512 CPUs)
//   AVX-512: 1 mul decoder, 2 VBMI table decoder, 3 VBMI tables + GFNI fields
// 0 = the best the CPU has.
static int atd_dot_variant[ATD_PATH_NEON + 1];

#if defined(ATD_HAVE_AVX2)
static int atd_cpu_has_raw(const char * feature) {
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
    if (strcmp(feature, "avx512vbmi") == 0) {
        return __builtin_cpu_supports("avx512vbmi");
    }
    if (strcmp(feature, "gfni") == 0) {
        return __builtin_cpu_supports("gfni");
    }
    if (strcmp(feature, "avxvnni") == 0) {
        return __builtin_cpu_supports("avxvnni");
    }
    return 0;
#else
    // compile-time selection: compiled means runnable; the optional extensions may be left out
#if !defined(ATD_HAVE_AVX512VBMI)
    if (strcmp(feature, "avx512vbmi") == 0) return 0;
#endif
#if !defined(ATD_HAVE_AVX512GFNI)
    if (strcmp(feature, "gfni") == 0) return 0;
#endif
    (void)feature;
    return 1;
#endif
}

// 1 if this build and CPU have the feature, else 0
int atd_cpu_has(const char * feature) {
    return atd_cpu_has_raw(feature) != 0;
}
#endif

static int atd_dot_path_probe(int path) {
    switch (path) {
        case ATD_PATH_SCALAR:
            return 1;
#if defined(ATD_HAVE_AVX2)
        case ATD_PATH_AVX2:
            return atd_cpu_has("avx2");
#endif
#if defined(ATD_HAVE_AVX512)
        case ATD_PATH_AVX512:
            return atd_cpu_has("avx2") && atd_cpu_has("avx512");
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
        if (v == 2) return atd_cpu_has("avxvnni");
#endif
#if defined(ATD_HAVE_AVX512)
        if (v == 3) return atd_path_available(ATD_PATH_AVX512);
#endif
    }
#if defined(ATD_HAVE_AVX512VBMI)
    if (path == ATD_PATH_AVX512 && v == 2) {
        return atd_cpu_has("avx512vbmi");
    }
#endif
#if defined(ATD_HAVE_AVX512GFNI)
    if (path == ATD_PATH_AVX512 && v == 3) {
        return atd_cpu_has("avx512vbmi") && atd_cpu_has("gfni");
    }
#endif
    return v == 1;
}

static int atd_dot_best_variant_probe(int path) {
    if (path == ATD_PATH_AVX2) {
        return atd_dot_variant_ok(path, 2) ? 2 : atd_dot_variant_ok(path, 3) ? 3 : 1;
    }
    if (path == ATD_PATH_AVX512) {
        return atd_dot_variant_ok(path, 3) ? 3 : atd_dot_variant_ok(path, 2) ? 2 : 1;
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

static void atd_dot_auto_clear(void);

// internal test hook (declared by ggml-ext/tests/atd_dot_test.c, not in atd.h): 1 if runnable
int atd_dot_set_variant(int path, int variant);
int atd_dot_set_variant(int path, int variant) {
    if (path < ATD_PATH_SCALAR || path > ATD_PATH_NEON || (variant != 0 && !atd_dot_variant_ok(path, variant))) {
        return 0;
    }
    ATD_STORE(atd_dot_variant[path], variant);
    atd_dot_auto_clear();
    return 1;
}

// the variant a path runs (the forced one, else the best); atd-mm.c follows the same choice
int atd_dot_variant_of(int path) {
    if (path < ATD_PATH_SCALAR || path > ATD_PATH_NEON) {
        return 1;
    }
    const int forced = ATD_LOAD(atd_dot_variant[path]);
    return forced ? forced : atd_dot_best_variant(path);
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
    atd_dot_auto_clear();
}

// the kernel of a path and its variant (forced, else the best)
typedef void (*atd_dot_fn)(int n, float * s, const void * vx, const void * vy, int planes, int block);
typedef void (*atd_gemv256_fn)(int n, const uint8_t * x, size_t bx, const block_q8_K * y, float * out, int planes);
typedef void (*atd_gemv64_fn)(int n, const uint8_t * x, size_t bx, const block_atd_q8_64 * y, float * out,
                              int planes);
typedef void (*atd_dot_r2_fn)(int n, float * s, const uint8_t * x, size_t step, const block_q8_K * y, int planes);
typedef void (*atd_gemv_r2_fn)(int n, const uint8_t * x, const block_q8_K * y, float * out, int planes);
typedef void (*atd_gemv_r2_64_fn)(int n, const uint8_t * x, const block_atd_q8_64r2 * y, float * out, int planes);

// The kernels of one (path, variant): a trait table, as ggml's type_traits. NULL: no multi-row kernel
// there (the dispatchers go row by row).
typedef struct {
    atd_dot_fn        vec_dot;    // one row, file layout
    atd_gemv256_fn    gemv256;    // four rows, file layout, 256 family
    atd_gemv64_fn     gemv64;     // gemv64_rows rows, file layout, 64 family
    int               gemv64_rows;
    atd_dot_r2_fn     r2_one;     // one r2 row, 256 family (single tail rows)
    atd_gemv_r2_fn    r2_256;     // one r2 group, 256 family
    atd_gemv_r2_64_fn r2_64;      // one r2 group, 64 family (single tail rows: atd_dot_r2_64_scalar)
} atd_path_kernels;

#define ATD_KERNELS_SCALAR { atd_vec_dot_scalar, NULL, NULL, 0, atd_vec_dot_r2_scalar, NULL, NULL }
#if defined(ATD_HAVE_AVX2)
#define ATD_KERNELS_AVX2_MAD { atd_vec_dot_avx2_mad, NULL, atd_gemv64_avx2_mad, 2, atd_dot_r2_avx2_mad, NULL, \
                               atd_gemv_r2_64_avx2_mad }
#if defined(ATD_HAVE_AVXVNNI)
#define ATD_KERNELS_AVX2_VNNI { atd_vec_dot_avx2_vnni, NULL, atd_gemv64_avx2_vnni, 2, atd_dot_r2_avx2_vnni, NULL, \
                                atd_gemv_r2_64_avx2_vnni }
#else
#define ATD_KERNELS_AVX2_VNNI ATD_KERNELS_AVX2_MAD
#endif
#if defined(ATD_HAVE_AVX512)
#define ATD_KERNELS_AVX2_EVEX { atd_vec_dot_avx2_evex, NULL, atd_gemv64_avx2_evex, 2, atd_dot_r2_avx2_evex, NULL, \
                                atd_gemv_r2_64_avx2_evex }
#else
#define ATD_KERNELS_AVX2_EVEX ATD_KERNELS_AVX2_MAD
#endif
#endif
#if defined(ATD_HAVE_AVX512)
// the r2 kernels have no table decoder (variant 2 shifts); single r2 rows take the EVEX AVX2 kernel
#define ATD_KERNELS_AVX512_MUL { atd_vec_dot_avx512_mul, atd_gemv256_avx512_mul, atd_gemv64_avx512_mul, 4, \
                                 atd_dot_r2_avx2_evex, atd_gemv_r2_avx512_shift, atd_gemv_r2_64_avx512_shift }
#if defined(ATD_HAVE_AVX512VBMI)
#define ATD_KERNELS_AVX512_LUT { atd_vec_dot_avx512_lut, atd_gemv256_avx512_lut, atd_gemv64_avx512_lut, 4, \
                                 atd_dot_r2_avx2_evex, atd_gemv_r2_avx512_shift, atd_gemv_r2_64_avx512_shift }
#else
#define ATD_KERNELS_AVX512_LUT ATD_KERNELS_AVX512_MUL
#endif
#if defined(ATD_HAVE_AVX512GFNI)
#define ATD_KERNELS_AVX512_GFNI { atd_vec_dot_avx512_gfni, atd_gemv256_avx512_gfni, atd_gemv64_avx512_gfni, 4, \
                                  atd_dot_r2_avx2_evex, atd_gemv_r2_avx512_gfni, atd_gemv_r2_64_avx512_gfni }
#else
#define ATD_KERNELS_AVX512_GFNI ATD_KERNELS_AVX512_LUT
#endif
#endif

// [path][variant]: variant 0 is never looked up (atd_dot_variant_of resolves it), so it repeats 1
static const atd_path_kernels atd_kernel_table[ATD_PATH_NEON + 1][4] = {
    [ATD_PATH_SCALAR] = { ATD_KERNELS_SCALAR, ATD_KERNELS_SCALAR, ATD_KERNELS_SCALAR, ATD_KERNELS_SCALAR },
#if defined(ATD_HAVE_AVX2)
    [ATD_PATH_AVX2] = { ATD_KERNELS_AVX2_MAD, ATD_KERNELS_AVX2_MAD, ATD_KERNELS_AVX2_VNNI, ATD_KERNELS_AVX2_EVEX },
#endif
#if defined(ATD_HAVE_AVX512)
    [ATD_PATH_AVX512] = { ATD_KERNELS_AVX512_MUL, ATD_KERNELS_AVX512_MUL, ATD_KERNELS_AVX512_LUT,
                          ATD_KERNELS_AVX512_GFNI },
#endif
#if defined(ATD_HAVE_NEON)
#define ATD_KERNELS_NEON { atd_vec_dot_neon, NULL, NULL, 0, atd_vec_dot_r2_scalar, NULL, NULL }
    [ATD_PATH_NEON] = { ATD_KERNELS_NEON, ATD_KERNELS_NEON, ATD_KERNELS_NEON, ATD_KERNELS_NEON },
#endif
};

// the kernels a path runs: its forced or best variant; a path this build lacks gets the scalar ones
static const atd_path_kernels * atd_kernels_of(int path) {
    if (path < ATD_PATH_SCALAR || path > ATD_PATH_NEON || atd_kernel_table[path][1].vec_dot == NULL) {
        path = ATD_PATH_SCALAR;
    }
    const int v = atd_dot_variant_of(path);
    return &atd_kernel_table[path][v >= 1 && v <= 3 ? v : 1];
}

static atd_dot_fn atd_dot_resolve(int path) {
    return atd_kernels_of(path)->vec_dot;
}

// the selected path's kernel, resolved once: ggml calls vec_dot once per weight row, and short rows
// (576 weights) made the dispatch a few percent of the time. Forcing a path or a variant clears it.
static atd_dot_fn atd_dot_auto;

static void atd_dot_auto_clear(void) {
    ATD_STORE(atd_dot_auto, (atd_dot_fn)0);
}

void atd_vec_dot_path(int n, float * s, const void * vx, const void * vy, int planes, int block, int path) {
    if (path == ATD_PATH_AUTO || !atd_path_available(path)) {
        path = atd_selected_path();
    }
    atd_dot_resolve(path)(n, s, vx, vy, planes, block);
}

void atd_vec_dot(int n, float * s, const void * vx, const void * vy, int planes, int block) {
    atd_dot_fn f = ATD_LOAD(atd_dot_auto);
    if (f == (atd_dot_fn)0) {
        f = atd_dot_resolve(atd_selected_path());
        ATD_STORE(atd_dot_auto, f);
    }
    f(n, s, vx, vy, planes, block);
}

// One activation row against nr weight rows (stride bx bytes): out[r] = atd_vec_dot of row r, bit for
// bit. AVX-512 takes four rows per step, AVX2 two rows of the 64 family; the rest goes row by row.
void atd_gemv(int n, int planes, int block, const void * vx, size_t bx, int nr, const void * vy, float * out) {
    const uint8_t *          x = (const uint8_t *)vx;
    const atd_path_kernels * k = atd_kernels_of(atd_selected_path());
    int                      r = 0;
    if (n >= block && planes >= 1 && planes <= ATD_MAX_PLANES) {
        if (block == QK_ATD && k->gemv256 != NULL) {
            for (; r + 4 <= nr; r += 4) {
                k->gemv256(n, x + (size_t)r * bx, bx, (const block_q8_K *)vy, out + r, planes);
            }
        }
        if (block == QK_ATD_64 && k->gemv64 != NULL) {
            for (; r + k->gemv64_rows <= nr; r += k->gemv64_rows) {
                k->gemv64(n, x + (size_t)r * bx, bx, (const block_atd_q8_64 *)vy, out + r, planes);
            }
        }
    }
    for (; r < nr; ++r) {
        atd_vec_dot(n, out + r, x + (size_t)r * bx, vy, planes, block);
    }
}

// ---- r2 layout: dispatch ----------------------------------------------------------------------------

// whole groups by the path's SIMD gemv (one stream of four rows), single rows one by one
void atd_gemv_r2_path(int n, int planes, int block, const void * vx, int nr, const void * vy, float * out, int path) {
    if ((block != QK_ATD && block != QK_ATD_64) || n < block || n % block != 0 || planes < 1 ||
        planes > ATD_MAX_PLANES || nr <= 0) {
        return;
    }
    if (path == ATD_PATH_AUTO || !atd_path_available(path)) {
        path = atd_selected_path();
    }
    const atd_path_kernels * k   = atd_kernels_of(path);
    const size_t             rsz = (size_t)(n / block) * ATD_R2_TYPE_SIZE(planes, block);
    const uint8_t *          x   = (const uint8_t *)vx;
    int                      r   = 0;
    _Static_assert(ATD_R2_GROUP == 4, "the r2 gemvs take four rows");
    if (block == QK_ATD_64) {
        const block_atd_q8_64r2 * y = (const block_atd_q8_64r2 *)vy;
        for (; k->r2_64 != NULL && r + ATD_R2_GROUP <= nr; r += ATD_R2_GROUP) {
            k->r2_64(n, x + (size_t)r * rsz, y, out + r, planes);
        }
        for (; r < nr; ++r) {
            out[r] = atd_dot_r2_64_scalar(n, atd_r2_row(vx, nr, r, rsz, planes, QK_ATD_64), y, planes);
        }
        return;
    }
    const block_q8_K * y = (const block_q8_K *)vy;
    for (; k->r2_256 != NULL && r + ATD_R2_GROUP <= nr; r += ATD_R2_GROUP) {
        k->r2_256(n, x + (size_t)r * rsz, y, out + r, planes);
    }
    for (; r < nr; ++r) {
        const atd_row_view rv = atd_r2_row(vx, nr, r, rsz, planes, QK_ATD);
        k->r2_one(n, out + r, rv.blk, rv.step, y, planes);
    }
}

void atd_gemv_r2(int n, int planes, int block, const void * vx, int nr, const void * vy, float * out) {
    atd_gemv_r2_path(n, planes, block, vx, nr, vy, out, ATD_PATH_AUTO);
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

#if defined(ATD_HAVE_AVX2)
// atd_q8_64 with AVX2, the same bytes as quantize_row_atd_q8_64: digit row k = x[13k .. 13k+15] as two
// float32x8 (lanes j = 0..7: groups 0, 1; j = 8..15: group 2, group 3 at j = 12, the rest no element).
// max_ps(a, m) is a > m ? a : m, the reference's comparison; cvtps rounds to nearest even as nearbyintf.
ATD_TARGET_AVX2 static void atd_quantize_q8_64_avx2(const float * x, block_atd_q8_64 * y, int64_t nb) {
    const __m256  sign  = _mm256_set1_ps(-0.0f);
    const __m256i hi4   = _mm256_setr_epi32(-1, -1, -1, -1, -1, 0, 0, 0);  // j = 8..12
    const __m256i hi4_4 = _mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0);   // digit 4: j = 8..11 (e < 64)
    for (int64_t b = 0; b < nb; ++b) {
        const float * xb = x + b * QK_ATD_64;
        __m256        lo[ATD_TRITS_PER_BYTE], hi[ATD_TRITS_PER_BYTE];
        __m256        mlo = _mm256_setzero_ps(), mhi = _mm256_setzero_ps();
        for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
            const float * r = xb + ATD_S64 * k;
            lo[k] = _mm256_loadu_ps(r);
            hi[k] = k < 4 ? _mm256_and_ps(_mm256_loadu_ps(r + 8), _mm256_castsi256_ps(hi4))
                          : _mm256_maskload_ps(r + 8, hi4_4);  // elements 60..63 only: nothing past the row
            mlo = _mm256_max_ps(_mm256_andnot_ps(sign, lo[k]), mlo);
            mhi = _mm256_max_ps(_mm256_andnot_ps(sign, hi[k]), mhi);
        }
        // the max of each 4 lanes, in all four: groups [0 | 1] and [2 | 3]
        mlo = _mm256_max_ps(mlo, _mm256_shuffle_ps(mlo, mlo, _MM_SHUFFLE(2, 3, 0, 1)));
        mlo = _mm256_max_ps(mlo, _mm256_shuffle_ps(mlo, mlo, _MM_SHUFFLE(1, 0, 3, 2)));
        mhi = _mm256_max_ps(mhi, _mm256_shuffle_ps(mhi, mhi, _MM_SHUFFLE(2, 3, 0, 1)));
        mhi = _mm256_max_ps(mhi, _mm256_shuffle_ps(mhi, mhi, _MM_SHUFFLE(1, 0, 3, 2)));
        const __m256 dlo = _mm256_div_ps(mlo, _mm256_set1_ps(127.0f)), dhi = _mm256_div_ps(mhi, _mm256_set1_ps(127.0f));
        const __m256 one = _mm256_set1_ps(1.0f);
        const __m256 ilo = _mm256_and_ps(_mm256_cmp_ps(dlo, _mm256_setzero_ps(), _CMP_NEQ_OQ), _mm256_div_ps(one, dlo));
        const __m256 ihi = _mm256_and_ps(_mm256_cmp_ps(dhi, _mm256_setzero_ps(), _CMP_NEQ_OQ), _mm256_div_ps(one, dhi));
        const __m256i qmax = _mm256_set1_epi32(127), qmin = _mm256_set1_epi32(-127);
        __m256i       slo = _mm256_setzero_si256(), shi = _mm256_setzero_si256();
        for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
            __m256i ql = _mm256_cvtps_epi32(_mm256_mul_ps(lo[k], ilo));
            __m256i qh = _mm256_cvtps_epi32(_mm256_mul_ps(hi[k], ihi));  // cleared lanes give 0
            ql  = _mm256_max_epi32(_mm256_min_epi32(ql, qmax), qmin);
            qh  = _mm256_max_epi32(_mm256_min_epi32(qh, qmax), qmin);
            slo = _mm256_add_epi32(slo, ql);
            shi = _mm256_add_epi32(shi, qh);
            const __m256i q16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(ql, qh), 0xd8);  // j = 0..15
            _mm_storeu_si128((__m128i *)y[b].qs[k],
                             _mm_packs_epi16(_mm256_castsi256_si128(q16), _mm256_extracti128_si256(q16, 1)));
        }
        // group sums: the 4 lanes of each half
        __m256i s = _mm256_hadd_epi32(slo, shi);  // [lo0+1 lo2+3 hi0+1 hi2+3 | lo4+5 lo6+7 hi4+5 hi6+7]
        s = _mm256_hadd_epi32(s, s);              // [g0 g2 g0 g2 | g1 g3 g1 g3]
        s = _mm256_permutevar8x32_epi32(s, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
        _mm_storeu_si128((__m128i *)y[b].sum, _mm256_castsi256_si128(s));
        const __m256 d = _mm256_permutevar8x32_ps(_mm256_blend_ps(dlo, dhi, 0x22), _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
        _mm_storeu_ps(y[b].d, _mm256_castps256_ps128(d));
    }
}
#endif

// atd_q8_64 for ggml-cpu's from_float: the bytes of quantize_row_atd_q8_64 (the reference in atd-quants.c)
void atd_quantize_row_q8_64(const float * x, void * vy, int64_t k) {
#if defined(ATD_HAVE_AVX2)
    if (atd_path_available(ATD_PATH_AVX2)) {
        atd_quantize_q8_64_avx2(x, (block_atd_q8_64 *)vy, k / QK_ATD_64);
        return;
    }
#endif
    quantize_row_atd_q8_64(x, vy, k);
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
