// Batched ATD matmul: one weight matrix times two or more activation rows (prompt processing).
//
// The one-row vec_dot (atd-dot.c) decodes every weight block again for every activation row. Here a
// chunk of weight rows is decoded once, block by block, into int8 and used for every activation row:
//
//   w_e ~ s_b * u_e,   u_e = rint(L_e * 127 / A_b) in [-127, 127],   s_b = A_b / 127,
//   L_e = sum_i alpha_i t_ie (the exact float32 level of docs/atd-format.md §3),   A_b = sum_i |alpha_i|
//
// (A_b bounds every level of the block, so no level is clipped), then one int8 x int8 multiply-add per
// weight and activation, as ggml's Q8_0 GEMM does, instead of N exact ternary plane sums (N multiply-
// adds). The price is the rounding of the levels to 255 steps: |s_b u_e - L_e| <= s_b / 2 = A_b / 254,
// so the result differs from the exact dot of the decoded weights and its activations (and, for the 256
// family, whose activations are vec_dot's q8_K, from the one-row vec_dot) by at most
//
//   sum_b (A_b / 254) * sum_{e in b} |x_e|      (x_e = d_y q_e, the quantized activations)
//
// plus float rounding (docs/llama-plugin.md; tests/test_ggml_ext_dot.py checks the bound).
//
// Activations: the 256 family takes ggml's q8_K rows (the same as vec_dot); the 64 family takes
// block_atd_q8_64mm rows (atd.h: natural order, a scale per 32; vec_dot's atd_q8_64 has four scale groups
// across each 4-byte k-group here, so the one-row and batched paths round the activations differently).
// Float combination, the same bits on every path (explicit fused multiply-adds, fixed order):
//   isum_h = sum_{e in h} u_e q_e        (int32, exact; vpdpbusd takes u + 128 and starts from -128 sum q)
//   t      = fma(d_0, isum_0, 0)  [then t = fma(d_1, isum_1, t) for the 64 family's second scale]
//   out    = fma(t, s_b, out)            (blocks in order; out starts at 0)
//
// Layout: rows are decoded in chunks of ATD_MM_KC weights (4 blocks of 256 or 16 of 64) into natural
// order (u + 128 as bytes), then packed for the path's microkernel: AVX-512 32 rows x 4 bytes per
// k-group (one zmm holds 16 rows' 4 consecutive weights), AVX2 16 rows (8 per ymm), NEON 8 rows
// (4 per 128-bit register, signed), scalar the natural rows themselves. The microkernels keep 4
// activation rows' int32 sums in registers and broadcast 4 activation bytes against the packed rows.
#include "atd.h"
#include "atd-simd.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#define ATD_MM_KC     1024  // weights per row and chunk
#define ATD_MM_NAT    16    // rows decoded at once into the natural-order buffer
#define ATD_MM_MR_MAX 32    // rows of a packed tile (AVX-512)
#define ATD_MM_NR     4     // activation rows per microkernel call
#define ATD_S256_MM   ATD_PLANE_BYTES(QK_ATD)     // 52
#define ATD_S64_MM    ATD_PLANE_BYTES(QK_ATD_64)  // 13

_Static_assert(ATD_MM_KC % QK_ATD == 0 && ATD_MM_KC % QK_ATD_64 == 0, "chunk of whole blocks");

// scratch: natural rows (16 x (KC + 64): 4 bytes of digit-4 padding may spill past a block), the
// packed tile (32 x KC) and the scales (32 x KC/64)
#define ATD_MM_NAT_STRIDE (ATD_MM_KC + 64)
#define ATD_MM_SCRATCH    (64 + ATD_MM_NAT * ATD_MM_NAT_STRIDE + ATD_MM_MR_MAX * ATD_MM_KC + \
                           ATD_MM_MR_MAX * (ATD_MM_KC / QK_ATD_64) * sizeof(float))

size_t atd_mul_mat_scratch_size(void) {
    return ATD_MM_SCRATCH;
}

// ---- bookkeeping for tests -------------------------------------------------------------------------

static uint64_t atd_mm_ncalls;

uint64_t atd_mul_mat_calls(void) {
    return ATD_LOAD(atd_mm_ncalls);
}

// ---- activations of the 64 family -------------------------------------------------------------------

size_t atd_mm_act_row_size(int block, int64_t n) {
    return block == QK_ATD ? (size_t)(n / QK_K) * sizeof(block_q8_K)
                           : (size_t)(n / QK_ATD_64) * sizeof(block_atd_q8_64mm);
}

#if defined(ATD_HAVE_AVX2)
// the same with AVX2: cvtps rounds to nearest even, as nearbyintf does in the default rounding mode
ATD_TARGET_AVX2 static void atd_quantize_q8_64mm_avx2(const float * x, block_atd_q8_64mm * y, int64_t nb) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < nb; ++b) {
        for (int h = 0; h < 2; ++h) {
            const float * xh = x + b * QK_ATD_64 + 32 * h;
            __m256        v[4], m = _mm256_setzero_ps();
            for (int j = 0; j < 4; ++j) {
                v[j] = _mm256_loadu_ps(xh + 8 * j);
                m    = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
            }
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            const float  d  = _mm_cvtss_f32(m4) / 127.0f;
            const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
            __m256i      q[4];
            for (int j = 0; j < 4; ++j) {
                q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));  // |x| <= max: |q| <= 127 (+ rounding)
                q[j] = _mm256_max_epi32(_mm256_min_epi32(q[j], _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
            }
            const __m256i q16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xd8);
            const __m256i r16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xd8);
            const __m256i q8  = _mm256_permute4x64_epi64(_mm256_packs_epi16(q16, r16), 0xd8);
            _mm256_storeu_si256((__m256i *)(y[b].qs + 32 * h), q8);
            const __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            __m128i       s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
            y[b].d[h]    = d;
            y[b].bias[h] = -128 * _mm_cvtsi128_si32(s4);
        }
    }
}
#endif

// natural order, per 32: d = max|x| / 127, q = nearest int of x / d (atd.h's atd_quantize_group)
void quantize_row_atd_q8_64mm(const float * x, void * vy, int64_t k) {
    block_atd_q8_64mm * y = (block_atd_q8_64mm *)vy;
#if defined(ATD_HAVE_AVX2)
    if (atd_path_available(ATD_PATH_AVX2)) {
        atd_quantize_q8_64mm_avx2(x, y, k / QK_ATD_64);
        return;
    }
#endif
    for (int64_t b = 0; b < k / QK_ATD_64; ++b) {
        for (int h = 0; h < 2; ++h) {
            int32_t sum;
            y[b].d[h]    = atd_quantize_group(x + b * QK_ATD_64 + 32 * h, 32, y[b].qs + 32 * h, &sum);
            y[b].bias[h] = -128 * sum;
        }
    }
}

// ---- decoding (the reference, and the table of levels the SIMD decoders look up) ---------------------

static inline float atd_mm_h2f(const uint8_t * p) {
    const uint16_t h    = (uint16_t)(p[0] | p[1] << 8);
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t       exp  = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
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

// a block's plane scales, and its int8 step: *s = A / 127 and the factor 127 / A (0 for an all-zero block)
static inline float atd_mm_block_scale(const uint8_t * blk, int planes, float * alpha, float * s) {
    float amax = 0.0f;
    for (int i = 0; i < planes; ++i) {
        alpha[i] = atd_mm_h2f(blk + 2 * i);
        amax     = amax + fabsf(alpha[i]);
    }
    if (!(amax > 0.0f)) {
        *s = 0.0f;
        return 0.0f;
    }
    *s = amax / 127.0f;
    return 127.0f / amax;
}

// the int8 step of a level
static inline int atd_mm_round(float level, float inv) {
    int w = (int)rintf(level * inv);
    return w > 127 ? 127 : (w < -127 ? -127 : w);
}

// the reference: blocks [b0, b0 + nblk) of one row into natural order, u[e] = w + 128, s[b] = step
// (v: the row, in the file layout or the r2 layout of atd.h)
static void atd_mm_decode_ref(const atd_row_view * v, int planes, int block, int b0, int nblk, uint8_t * u, float * s) {
    const int r2 = v->r2, S = r2 ? ATD_R2_PLANE_BYTES(block) : ATD_PLANE_BYTES(block);
    for (int b = 0; b < nblk; ++b) {
        const uint8_t * blk = v->blk + (size_t)(b0 + b) * v->step;
        float           alpha[ATD_MAX_PLANES];
        const float     inv = atd_mm_block_scale(blk, planes, alpha, &s[b]);
        for (int e = 0; e < block; ++e) {
            float L = 0.0f;
            for (int i = 0; i < planes; ++i) {
                const uint8_t b = blk[v->poff + i * v->pstep + e % S];
                const int     t = (r2 ? (b >> (2 * (e / S))) & 3 : atd_byte_digit(b, e / S)) - 1;
                L = fmaf(alpha[i], (float)t, L);  // exact product: the §3 sum, plane order
            }
            u[b * block + e] = (uint8_t)(atd_mm_round(L, inv) + 128);
        }
    }
}

// The levels of every combination of trits, combo c = sum_i (t_i + 1) 3^(N-1-i) (plane 0 the most
// significant digit), as bytes w + 128: the SIMD decoders look them up by the combo of each weight.
// atd_mm_tdigit[k][c] = base-3 digit k of c, minus 1: the trit of plane N-1-k (c < 81; 0 beyond).
#define ATD_MM_COMBOS 96
#if defined(ATD_HAVE_AVX2)
static const int8_t atd_mm_tdigit[ATD_MAX_PLANES][ATD_MM_COMBOS] = {
    {
      -1,  0,  1, -1,  0,  1, -1,  0,  1, -1,  0,  1, -1,  0,  1, -1,  0,  1, -1,  0,  1, -1,  0,  1,
      -1,  0,  1, -1,  0,  1, -1,  0,  1, -1,  0,  1, -1,  0,  1, -1,  0,  1, -1,  0,  1, -1,  0,  1,
      -1,  0,  1, -1,  0,  1, -1,  0,  1, -1,  0,  1, -1,  0,  1, -1,  0,  1, -1,  0,  1, -1,  0,  1,
      -1,  0,  1, -1,  0,  1, -1,  0,  1,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
    },
    {
      -1, -1, -1,  0,  0,  0,  1,  1,  1, -1, -1, -1,  0,  0,  0,  1,  1,  1, -1, -1, -1,  0,  0,  0,
       1,  1,  1, -1, -1, -1,  0,  0,  0,  1,  1,  1, -1, -1, -1,  0,  0,  0,  1,  1,  1, -1, -1, -1,
       0,  0,  0,  1,  1,  1, -1, -1, -1,  0,  0,  0,  1,  1,  1, -1, -1, -1,  0,  0,  0,  1,  1,  1,
      -1, -1, -1,  0,  0,  0,  1,  1,  1,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
    },
    {
      -1, -1, -1, -1, -1, -1, -1, -1, -1,  0,  0,  0,  0,  0,  0,  0,  0,  0,  1,  1,  1,  1,  1,  1,
       1,  1,  1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  0,  0,  0,  0,  0,  0,  0,  0,  0,  1,  1,  1,
       1,  1,  1,  1,  1,  1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  0,  0,  0,  0,  0,  0,  0,  0,  0,
       1,  1,  1,  1,  1,  1,  1,  1,  1,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
    },
    {
      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
      -1, -1, -1,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
       0,  0,  0,  0,  0,  0,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,
       1,  1,  1,  1,  1,  1,  1,  1,  1,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
    },
};
#endif

static inline int atd_mm_ncombos(int planes) {
    return planes == 1 ? 3 : planes == 2 ? 9 : planes == 3 ? 27 : 81;
}

// ---- scalar path -----------------------------------------------------------------------------------------
//
// Decodes 16 rows into natural order and multiplies directly: the definition the SIMD paths reproduce.

static void atd_mm_kernel_scalar(const uint8_t * nat, const float * s, int nrows, int planes, int block,
                                 int kb0, int nblk, const void * vy, size_t by, int nc, float * dst, size_t ldd,
                                 int first) {
    (void)planes;
    for (int c = 0; c < nc; ++c) {
        const char * yrow = (const char *)vy + (size_t)c * by;
        for (int r = 0; r < nrows; ++r) {
            const uint8_t * u   = nat + (size_t)r * ATD_MM_NAT_STRIDE;
            float           out = first ? 0.0f : dst[(size_t)c * ldd + r];
            for (int b = 0; b < nblk; ++b) {
                float t = 0.0f;
                if (block == QK_ATD) {
                    const block_q8_K * yb   = (const block_q8_K *)yrow + kb0 + b;
                    int32_t            isum = 0;
                    for (int e = 0; e < QK_ATD; ++e) isum += ((int)u[b * QK_ATD + e] - 128) * yb->qs[e];
                    t = fmaf(yb->d, (float)isum, 0.0f);
                } else {
                    const block_atd_q8_64mm * yb = (const block_atd_q8_64mm *)yrow + kb0 + b;
                    for (int h = 0; h < 2; ++h) {
                        int32_t isum = 0;
                        for (int e = 32 * h; e < 32 * h + 32; ++e) isum += ((int)u[b * QK_ATD_64 + e] - 128) * yb->qs[e];
                        t = fmaf(yb->d[h], (float)isum, t);
                    }
                }
                out = fmaf(t, s[b * ATD_MM_MR_MAX + r], out);
            }
            dst[(size_t)c * ldd + r] = out;
        }
    }
}

// ---- AVX2 and AVX-512 ------------------------------------------------------------------------------------
#if defined(ATD_HAVE_AVX2)

// The table of levels of one block: lt[c] = rint(L_c * inv) + 128 for c < 3^N (bytes), from the float
// level of every combo computed as the reference does (fma chain in plane order, exact products).
ATD_TARGET_AVX2 ATD_INLINE void atd_mm_levels_avx2(const float * alpha, float inv, int planes, uint8_t * lt) {
    const int     nc    = atd_mm_ncombos(planes);
    const __m256  vinv  = _mm256_set1_ps(inv);
    const __m256i lo    = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127), off = _mm256_set1_epi32(128);
    for (int c = 0; c < nc; c += 8) {
        __m256 L = _mm256_setzero_ps();
        for (int i = 0; i < planes; ++i) {
            const int8_t * d = atd_mm_tdigit[planes - 1 - i] + c;  // the trits of plane i
            const __m256   t = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)d)));
            L = _mm256_fmadd_ps(_mm256_set1_ps(alpha[i]), t, L);
        }
        __m256i w = _mm256_cvtps_epi32(_mm256_mul_ps(L, vinv));  // round to nearest even, as rintf
        w = _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(w, lo), hi), off);
        // 8 int32 (0..255) -> 8 bytes
        const __m128i p16 = _mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
        _mm_storel_epi64((__m128i *)(lt + c), _mm_packus_epi16(p16, p16));
    }
}

// codes of a digit of 32 bytes as even lanes (b << 8) and odd lanes (b & 0xff00)
ATD_TARGET_AVX2 ATD_INLINE __m256i atd_mm_digit256(__m256i ev, __m256i od) {
    const __m256i hi = _mm256_set1_epi16((short)0xff00);
    return _mm256_or_si256(_mm256_mulhi_epu16(ev, _mm256_set1_epi16(3)),
                           _mm256_and_si256(_mm256_mulhi_epu16(od, _mm256_set1_epi16(768)), hi));
}
ATD_TARGET_AVX2 ATD_INLINE __m256i atd_mm_t3(__m256i v) {
    return _mm256_add_epi16(_mm256_add_epi16(v, v), v);
}

// lookup of 32 byte combos in the table lt (n16 chunks of 16 entries): vpshufb per chunk, the
// combos of other chunks pushed to >= 0x80 (zero) by a saturating add
ATD_TARGET_AVX2 ATD_INLINE __m256i atd_mm_lookup_avx2(__m256i idx, const __m256i * lt, int n16) {
    if (n16 == 1) {
        return _mm256_shuffle_epi8(lt[0], idx);
    }
    __m256i r = _mm256_setzero_si256();
    for (int t = 0; t < n16; ++t) {
        const __m256i v = _mm256_adds_epu8(_mm256_sub_epi8(idx, _mm256_set1_epi8((char)(16 * t))), _mm256_set1_epi8(0x70));
        r = _mm256_or_si256(r, _mm256_shuffle_epi8(lt[t], v));
    }
    return r;
}

// the codes (0..2) of one base-3 plane in natural order: codes[e] for e < block, garbage up to QK_ATD + 64
// (digit k of byte j at S k + j; the stores overlap in order). Reads 16 bytes of a 13-byte plane (B = 64).
ATD_TARGET_AVX2 ATD_INLINE void atd_mm_codes_avx2(const uint8_t * p, int block, uint8_t * codes) {
    const __m256i hi = _mm256_set1_epi16((short)0xff00);
    const int     S  = ATD_PLANE_BYTES(block);
    if (block == QK_ATD) {
        const __m256i A = _mm256_loadu_si256((const __m256i *)p);
        const __m256i B = _mm256_loadu_si256((const __m256i *)(p + 20));
        __m256i ea = _mm256_slli_epi16(A, 8), oa = _mm256_and_si256(A, hi);
        __m256i eb = _mm256_slli_epi16(B, 8), ob = _mm256_and_si256(B, hi);
        for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
            _mm256_storeu_si256((__m256i *)(codes + S * k), atd_mm_digit256(ea, oa));
            _mm256_storeu_si256((__m256i *)(codes + S * k + 20), atd_mm_digit256(eb, ob));
            ea = atd_mm_t3(ea); oa = atd_mm_t3(oa); eb = atd_mm_t3(eb); ob = atd_mm_t3(ob);
        }
    } else {
        const __m256i V = _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p));
        __m256i ev = _mm256_slli_epi16(V, 8), od = _mm256_and_si256(V, hi);
        for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
            _mm_storeu_si128((__m128i *)(codes + S * k), _mm256_castsi256_si128(atd_mm_digit256(ev, od)));
            ev = atd_mm_t3(ev); od = atd_mm_t3(od);
        }
    }
}

// blocks [b0, b0 + nblk) of one row into natural order (the same bytes as atd_mm_decode_ref)
ATD_TARGET_AVX2 static void atd_mm_decode_avx2(const atd_row_view * v, int planes, int block, int b0, int nblk,
                                                uint8_t * u, float * s, int last_block) {
    const size_t bsz = ATD_TYPE_SIZE(planes, block);
    const int    n16 = (atd_mm_ncombos(planes) + 15) / 16;
    ATD_ALIGN64 uint8_t codes[ATD_MAX_PLANES][QK_ATD + 64];
    ATD_ALIGN64 uint8_t lt[ATD_MM_COMBOS] = { 0 };  // entries past 3^N are never looked up
    uint8_t             pad[ATD_TYPE_SIZE(ATD_MAX_PLANES, QK_ATD_64) + 16];
    for (int b = 0; b < nblk; ++b) {
        const uint8_t * blk = v->blk + (size_t)(b0 + b) * v->step;
        if (block == QK_ATD_64 && b0 + b == last_block && !v->r2) {
            // 16-byte loads of the last 64-block of a row would read past it: a padded copy
            memset(pad, 0, sizeof pad);
            memcpy(pad, blk, bsz);
            blk = pad;
        }
        float       alpha[ATD_MAX_PLANES];
        const float inv = atd_mm_block_scale(blk, planes, alpha, &s[b * ATD_MM_MR_MAX]);
        atd_mm_levels_avx2(alpha, inv, planes, lt);
        __m256i ltv[6];
        for (int t = 0; t < n16; ++t) {
            ltv[t] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(lt + 16 * t)));
        }
        // codes of every plane in natural order
        for (int i = 0; i < planes; ++i) {
            const uint8_t * p = blk + v->poff + i * v->pstep;
            if (v->r2) {  // bits 2k, 2k+1 of byte j: element (B/4) k + j
                const __m256i m3 = _mm256_set1_epi8(3);
                if (block == QK_ATD_64) {
                    const __m128i P = _mm_loadu_si128((const __m128i *)p);
                    for (int k = 0; k < 4; ++k) {
                        _mm_storeu_si128((__m128i *)(codes[i] + 16 * k),
                                         _mm_and_si128(_mm_srli_epi16(P, 2 * k), _mm256_castsi256_si128(m3)));
                    }
                    continue;
                }
                for (int h = 0; h < 2; ++h) {
                    const __m256i P = _mm256_loadu_si256((const __m256i *)(p + 32 * h));
                    for (int k = 0; k < 4; ++k) {
                        _mm256_storeu_si256((__m256i *)(codes[i] + 64 * k + 32 * h),
                                            _mm256_and_si256(_mm256_srli_epi16(P, 2 * k), m3));
                    }
                }
                continue;
            }
            atd_mm_codes_avx2(p, block, codes[i]);
        }
        // combos, then levels
        for (int e = 0; e < block; e += 32) {
            __m256i idx = _mm256_loadu_si256((const __m256i *)(codes[0] + e));
            for (int i = 1; i < planes; ++i) {
                idx = _mm256_add_epi8(_mm256_add_epi8(_mm256_add_epi8(idx, idx), idx),
                                      _mm256_loadu_si256((const __m256i *)(codes[i] + e)));
            }
            _mm256_storeu_si256((__m256i *)(u + b * block + e), atd_mm_lookup_avx2(idx, ltv, n16));
        }
    }
}

// 8x8 transpose of int32: rows r[0..7] -> columns
ATD_TARGET_AVX2 ATD_INLINE void atd_mm_tr8x8(__m256i * r) {
    const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
    r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
    r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
    r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
    r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
    r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
    r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
    r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

// pack 16 natural rows (weights [0, kw)) into tile[g][MR][4] at row offset r0 (MR = 16 or 32)
ATD_TARGET_AVX2 static void atd_mm_pack_avx2(const uint8_t * nat, int kw, uint8_t * tile, int mr, int r0) {
    for (int g0 = 0; g0 < kw / 4; g0 += 8) {
        for (int h = 0; h < 2; ++h) {
            __m256i r[8];
            for (int j = 0; j < 8; ++j) {
                r[j] = _mm256_loadu_si256((const __m256i *)(nat + (size_t)(8 * h + j) * ATD_MM_NAT_STRIDE + 4 * g0));
            }
            atd_mm_tr8x8(r);
            for (int j = 0; j < 8; ++j) {
                _mm256_storeu_si256((__m256i *)(tile + ((size_t)(g0 + j) * mr + r0 + 8 * h) * 4), r[j]);
            }
        }
    }
}

// ---- AVX2 microkernel: 16 rows (2 ymm of 8 rows x 4 bytes) x NC <= 4 activation rows -------------------
//
// Unsigned tile (u + 128): vpdpbusd with the activations, started from bias = -128 sum q. The maddubs
// flavour cannot take u + 128 against int8 (a pair may reach 2 * 255 * 128 > int16): it multiplies
// |u| by q with the sign of u moved onto q (vpsignb), pairs <= 2 * 127 * 128.

#define ATD_MM_AVX2_DP_vnni(acc, w, v) _mm256_dpbusd_avx_epi32((acc), (w), (v))
#define ATD_MM_AVX2_DP_evex(acc, w, v) _mm256_dpbusd_epi32((acc), (w), (v))

// 8 int32 accumulators (4 activation rows x 2 ymm) stay in registers; the float sums (t, out) of the
// 16 rows live in small arrays (AVX2 has 16 ymm registers)
#define ATD_MM_AVX2_KERNEL(SFX, TARGET, SIGNED, DOT)                                                         \
    TARGET static void atd_mm_kernel_avx2_##SFX(const uint8_t * tile, const float * s, int nrows, int block,   \
                                                int kb0, int nblk, const void * vy, size_t by, int nc,      \
                                                float * dst, size_t ldd, int first) {                       \
        const int    gpb = block / 4; /* k-groups per block */                                              \
        const int    gph = block == QK_ATD ? gpb : gpb / 2; /* k-groups per activation scale */             \
        const char * yr[ATD_MM_NR];                                                                         \
        for (int c = 0; c < ATD_MM_NR; ++c) yr[c] = (const char *)vy + (size_t)(c < nc ? c : 0) * by;       \
        ATD_ALIGN64 float o[ATD_MM_NR][16], t[ATD_MM_NR][16];                                               \
        for (int c = 0; c < ATD_MM_NR; ++c) {                                                               \
            memset(o[c], 0, sizeof o[c]);                                                                   \
            if (!first && c < nc) memcpy(o[c], dst + (size_t)c * ldd, (size_t)nrows * sizeof(float));       \
        }                                                                                                   \
        for (int b = 0; b < nblk; ++b) {                                                                    \
            for (int h = 0; h * gph < gpb; ++h) {                                                           \
                __m256i        a[ATD_MM_NR][2];                                                             \
                const int8_t * q[ATD_MM_NR];                                                                \
                float          d[ATD_MM_NR];                                                                \
                for (int c = 0; c < ATD_MM_NR; ++c) {                                                       \
                    int32_t bias;                                                                           \
                    if (block == QK_ATD) {                                                                  \
                        const block_q8_K * yb = (const block_q8_K *)yr[c] + kb0 + b;                        \
                        int32_t sq = 0;                                                                     \
                        for (int j = 0; j < QK_K / 16; ++j) sq += yb->bsums[j];                             \
                        bias = -128 * sq;                                                                   \
                        q[c] = yb->qs;                                                                      \
                        d[c] = yb->d;                                                                       \
                    } else {                                                                                \
                        const block_atd_q8_64mm * yb = (const block_atd_q8_64mm *)yr[c] + kb0 + b;          \
                        bias = yb->bias[h];                                                                 \
                        q[c] = yb->qs + 32 * h;                                                             \
                        d[c] = yb->d[h];                                                                    \
                    }                                                                                       \
                    a[c][0] = a[c][1] = _mm256_set1_epi32(SIGNED ? 0 : bias);                               \
                }                                                                                           \
                const uint8_t * tb = tile + ((size_t)b * gpb + (size_t)h * gph) * 16 * 4;                   \
                for (int g = 0; g < gph; ++g) {                                                             \
                    const __m256i w0 = _mm256_loadu_si256((const __m256i *)(tb + g * 64));                  \
                    const __m256i w1 = _mm256_loadu_si256((const __m256i *)(tb + g * 64 + 32));             \
                    ATD_UNROLL for (int c = 0; c < ATD_MM_NR; ++c) {                                        \
                        int32_t qq;                                                                         \
                        memcpy(&qq, q[c] + 4 * g, 4);                                                       \
                        const __m256i v = _mm256_set1_epi32(qq);                                            \
                        a[c][0] = DOT(a[c][0], w0, v);                                                      \
                        a[c][1] = DOT(a[c][1], w1, v);                                                      \
                    }                                                                                       \
                }                                                                                           \
                for (int c = 0; c < ATD_MM_NR; ++c) {                                                       \
                    const __m256 dv = _mm256_set1_ps(d[c]);                                                 \
                    for (int z = 0; z < 2; ++z) {                                                           \
                        const __m256 t0 = h == 0 ? _mm256_setzero_ps() : _mm256_load_ps(t[c] + 8 * z);      \
                        _mm256_store_ps(t[c] + 8 * z, _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(a[c][z]), t0)); \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
            for (int z = 0; z < 2; ++z) {                                                                   \
                const __m256 sv = _mm256_loadu_ps(s + b * ATD_MM_MR_MAX + 8 * z);                           \
                for (int c = 0; c < ATD_MM_NR; ++c) {                                                       \
                    _mm256_store_ps(o[c] + 8 * z, _mm256_fmadd_ps(_mm256_load_ps(t[c] + 8 * z), sv,         \
                                                                  _mm256_load_ps(o[c] + 8 * z)));           \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
        for (int c = 0; c < nc; ++c) memcpy(dst + (size_t)c * ldd, o[c], (size_t)nrows * sizeof(float));   \
    }

// maddubs: |w| x (q with the sign of w); w = u - 128
ATD_TARGET_AVX2 ATD_INLINE __m256i atd_mm_dot_mad(__m256i acc, __m256i u, __m256i v) {
    const __m256i w = _mm256_xor_si256(u, _mm256_set1_epi8((char)0x80));
    const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(v, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

ATD_MM_AVX2_KERNEL(mad, ATD_TARGET_AVX2, 1, atd_mm_dot_mad)
#if defined(ATD_HAVE_AVXVNNI)
ATD_MM_AVX2_KERNEL(vnni, ATD_TARGET_AVXVNNI, 0, ATD_MM_AVX2_DP_vnni)
#endif
#if defined(ATD_HAVE_AVX512)
ATD_MM_AVX2_KERNEL(evex, ATD_TARGET_AVX512, 0, ATD_MM_AVX2_DP_evex)
#endif

// ---- AVX-512 --------------------------------------------------------------------------------------------
#if defined(ATD_HAVE_AVX512)

// microkernel: 32 rows (2 zmm of 16 rows x 4 bytes) x NC <= 4 activation rows, unsigned tile
ATD_TARGET_AVX512 static void atd_mm_kernel_avx512(const uint8_t * tile, const float * s, int nrows, int block,
                                                   int kb0, int nblk, const void * vy, size_t by, int nc,
                                                   float * dst, size_t ldd, int first) {
    const int       gpb  = block / 4;
    const int       gph  = block == QK_ATD ? gpb : gpb / 2;
    const __mmask16 m0   = (__mmask16)(nrows >= 16 ? 0xffff : (1u << nrows) - 1);
    const __mmask16 m1   = (__mmask16)(nrows >= 32 ? 0xffff : nrows <= 16 ? 0 : (1u << (nrows - 16)) - 1);
    const char *    yr[ATD_MM_NR];
    for (int c = 0; c < ATD_MM_NR; ++c) yr[c] = (const char *)vy + (size_t)(c < nc ? c : 0) * by;
    __m512 o[ATD_MM_NR][2];
    for (int c = 0; c < ATD_MM_NR; ++c) {
        if (first || c >= nc) {
            o[c][0] = o[c][1] = _mm512_setzero_ps();
        } else {
            o[c][0] = _mm512_maskz_loadu_ps(m0, dst + (size_t)c * ldd);
            o[c][1] = _mm512_maskz_loadu_ps(m1, dst + (size_t)c * ldd + 16);
        }
    }
    for (int b = 0; b < nblk; ++b) {
        __m512 t[ATD_MM_NR][2] = { { _mm512_setzero_ps(), _mm512_setzero_ps() } };
        for (int h = 0; h * gph < gpb; ++h) {
            __m512i        a[ATD_MM_NR][2];
            const int8_t * q[ATD_MM_NR];
            float          d[ATD_MM_NR];
            for (int c = 0; c < ATD_MM_NR; ++c) {
                int32_t bias;
                if (block == QK_ATD) {
                    const block_q8_K * yb = (const block_q8_K *)yr[c] + kb0 + b;
                    const __m256i      s8 = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)yb->bsums),
                                                              _mm256_set1_epi16(-128));
                    const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
                    const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
                    bias = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xb1)));
                    q[c] = yb->qs;
                    d[c] = yb->d;
                } else {
                    const block_atd_q8_64mm * yb = (const block_atd_q8_64mm *)yr[c] + kb0 + b;
                    bias = yb->bias[h];
                    q[c] = yb->qs + 32 * h;
                    d[c] = yb->d[h];
                }
                a[c][0] = a[c][1] = _mm512_set1_epi32(bias);
            }
            const uint8_t * tb = tile + ((size_t)b * gpb + (size_t)h * gph) * ATD_MM_MR_MAX * 4;
            ATD_UNROLL for (int g = 0; g < gph; ++g) {
                const __m512i w0 = _mm512_loadu_si512((const void *)(tb + g * 128));
                const __m512i w1 = _mm512_loadu_si512((const void *)(tb + g * 128 + 64));
                ATD_UNROLL for (int c = 0; c < ATD_MM_NR; ++c) {
                    int32_t qq;
                    memcpy(&qq, q[c] + 4 * g, 4);
                    const __m512i v = _mm512_set1_epi32(qq);
                    a[c][0] = _mm512_dpbusd_epi32(a[c][0], w0, v);
                    a[c][1] = _mm512_dpbusd_epi32(a[c][1], w1, v);
                }
            }
            for (int c = 0; c < ATD_MM_NR; ++c) {
                const __m512 dv = _mm512_set1_ps(d[c]);
                for (int z = 0; z < 2; ++z) {
                    t[c][z] = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(a[c][z]), h == 0 ? _mm512_setzero_ps() : t[c][z]);
                }
            }
        }
        const __m512 s0 = _mm512_loadu_ps(s + b * ATD_MM_MR_MAX), s1 = _mm512_loadu_ps(s + b * ATD_MM_MR_MAX + 16);
        for (int c = 0; c < ATD_MM_NR; ++c) {
            o[c][0] = _mm512_fmadd_ps(t[c][0], s0, o[c][0]);
            o[c][1] = _mm512_fmadd_ps(t[c][1], s1, o[c][1]);
        }
    }
    for (int c = 0; c < nc; ++c) {
        _mm512_mask_storeu_ps(dst + (size_t)c * ldd, m0, o[c][0]);
        _mm512_mask_storeu_ps(dst + (size_t)c * ldd + 16, m1, o[c][1]);
    }
}

#if defined(ATD_HAVE_AVX512VBMI)
// decoding with the VBMI digit tables of atd-dot.c (atd_codes512_lut, atd-simd.h)

// blocks [b0, b0 + nblk) of one row into natural order (the same bytes as atd_mm_decode_ref)
ATD_TARGET_AVX512VBMI static void atd_mm_decode_avx512(const uint8_t * row, int planes, int block, int b0, int nblk,
                                                       uint8_t * u, float * s) {
    const size_t bsz = ATD_TYPE_SIZE(planes, block);
    __m512i      tab[8];
    atd_tables512_lut(tab);
    ATD_ALIGN64 uint8_t lt[4][128];
    if (block == QK_ATD) {
        const __mmask64 plane = (1ull << ATD_S256_MM) - 1;
        for (int b = 0; b < nblk; ++b) {
            const uint8_t * blk = row + (size_t)(b0 + b) * bsz;
            float           alpha[ATD_MAX_PLANES];
            const float     inv = atd_mm_block_scale(blk, planes, alpha, &s[b * ATD_MM_MR_MAX]);
            atd_mm_levels_avx2(alpha, inv, planes, lt[0]);
            const __m512i L0 = _mm512_loadu_si512((const void *)lt[0]), L1 = _mm512_loadu_si512((const void *)(lt[0] + 64));
            __m512i idx[ATD_TRITS_PER_BYTE];
            for (int i = 0; i < planes; ++i) {
                __m512i c[ATD_TRITS_PER_BYTE];
                atd_codes512_lut(_mm512_maskz_loadu_epi8(plane, blk + 2 * planes + i * ATD_S256_MM), tab, c);
                for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
                    idx[k] = i == 0 ? c[k] : _mm512_add_epi8(_mm512_add_epi8(_mm512_add_epi8(idx[k], idx[k]), idx[k]), c[k]);
                }
            }
            for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
                const __m512i w = planes < 4 ? _mm512_permutexvar_epi8(idx[k], L0) : _mm512_permutex2var_epi8(L0, idx[k], L1);
                // digit 4 holds elements 208..255 in bytes 0..47 (48..51 are padding)
                _mm512_mask_storeu_epi8(u + b * QK_ATD + ATD_S256_MM * k, k < 4 ? plane : (1ull << 48) - 1, w);
            }
        }
    } else {
        // four blocks per zmm (block j in 128-bit lane j, its 13 plane bytes), each lane looking up its
        // own block's levels: lane j's combos + 32 j index a 128-entry table of four 32-entry ones (N < 4),
        // or one 81-entry table per block, merged by lane masks (N = 4)
        const __m512i lane_off = _mm512_set_epi32(0x60606060, 0x60606060, 0x60606060, 0x60606060, 0x40404040,
                                                  0x40404040, 0x40404040, 0x40404040, 0x20202020, 0x20202020,
                                                  0x20202020, 0x20202020, 0, 0, 0, 0);
        for (int b = 0; b < nblk; b += 4) {
            const int m = nblk - b < 4 ? nblk - b : 4;
            for (int j = 0; j < 4; ++j) memset(lt[j], 128, sizeof lt[j]);
            for (int j = 0; j < m; ++j) {
                float       alpha[ATD_MAX_PLANES];
                const float inv = atd_mm_block_scale(row + (size_t)(b0 + b + j) * bsz, planes, alpha,
                                                     &s[(b + j) * ATD_MM_MR_MAX]);
                atd_mm_levels_avx2(alpha, inv, planes, lt[j]);
            }
            __m512i idx[ATD_TRITS_PER_BYTE];
            for (int i = 0; i < planes; ++i) {
                const uint8_t * p = row + (size_t)(b0 + b) * bsz + 2 * planes + i * ATD_S64_MM;
                __m512i         P = _mm512_setzero_si512();
                for (int j = 0; j < m; ++j) {
                    P = _mm512_mask_loadu_epi8(P, (__mmask64)0x1fff << (16 * j), p + (size_t)j * bsz - 16 * j);
                }
                __m512i c[ATD_TRITS_PER_BYTE];
                atd_codes512_lut(P, tab, c);
                for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
                    idx[k] = i == 0 ? c[k] : _mm512_add_epi8(_mm512_add_epi8(_mm512_add_epi8(idx[k], idx[k]), idx[k]), c[k]);
                }
            }
            __m512i w[ATD_TRITS_PER_BYTE];
            if (planes < 4) {
                // the four tables at 32-entry spacing in 128 bytes
                ATD_ALIGN64 uint8_t t4[128];
                for (int j = 0; j < 4; ++j) memcpy(t4 + 32 * j, lt[j], 32);
                const __m512i T0 = _mm512_loadu_si512((const void *)t4), T1 = _mm512_loadu_si512((const void *)(t4 + 64));
                for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
                    w[k] = _mm512_permutex2var_epi8(T0, _mm512_add_epi8(idx[k], lane_off), T1);
                }
            } else {
                for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) w[k] = _mm512_setzero_si512();
                for (int j = 0; j < m; ++j) {
                    const __m512i   T0 = _mm512_loadu_si512((const void *)lt[j]), T1 = _mm512_loadu_si512((const void *)(lt[j] + 64));
                    const __mmask64 mj = (__mmask64)0xffff << (16 * j);
                    for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
                        w[k] = _mm512_mask_mov_epi8(w[k], mj, _mm512_permutex2var_epi8(T0, idx[k], T1));
                    }
                }
            }
            // lane j, digit k -> elements 13 k .. 13 k + 12 of block j (digit 4: 12 elements)
            for (int j = 0; j < m; ++j) {
                for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
                    _mm512_mask_storeu_epi8(u + (b + j) * QK_ATD_64 + ATD_S64_MM * k - 16 * j,
                                            (__mmask64)(k < 4 ? 0x1fff : 0x0fff) << (16 * j), w[k]);
                }
            }
        }
    }
}
#endif  // ATD_HAVE_AVX512VBMI

// 16x16 transpose of int32 (rows r[0..15] -> columns)
ATD_TARGET_AVX512 ATD_INLINE void atd_mm_tr16x16(__m512i * r) {
    __m512i t[16];
    for (int j = 0; j < 16; j += 2) {
        t[j]     = _mm512_unpacklo_epi32(r[j], r[j + 1]);
        t[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]);
    }
    for (int j = 0; j < 16; j += 4) {
        r[j]     = _mm512_unpacklo_epi64(t[j], t[j + 2]);
        r[j + 1] = _mm512_unpackhi_epi64(t[j], t[j + 2]);
        r[j + 2] = _mm512_unpacklo_epi64(t[j + 1], t[j + 3]);
        r[j + 3] = _mm512_unpackhi_epi64(t[j + 1], t[j + 3]);
    }
    // r[4a + c]: rows 4a..4a+3 of column (4 * lane + c) for each 128-bit lane; gather the lanes
    for (int c = 0; c < 4; ++c) {
        const __m512i x0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);       // lanes 0,2 of both
        const __m512i x1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);       // lanes 1,3
        const __m512i x2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
        const __m512i x3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
        t[c]      = _mm512_shuffle_i32x4(x0, x2, 0x88);  // lane 0 of every row group: column c
        t[8 + c]  = _mm512_shuffle_i32x4(x0, x2, 0xdd);  // lane 2: column 8 + c
        t[4 + c]  = _mm512_shuffle_i32x4(x1, x3, 0x88);  // lane 1: column 4 + c
        t[12 + c] = _mm512_shuffle_i32x4(x1, x3, 0xdd);  // lane 3: column 12 + c
    }
    for (int j = 0; j < 16; ++j) r[j] = t[j];
}

// pack 16 natural rows (weights [0, kw)) into tile[g][32][4] at row offset r0 (0 or 16)
ATD_TARGET_AVX512 static void atd_mm_pack_avx512(const uint8_t * nat, int kw, uint8_t * tile, int r0) {
    for (int g0 = 0; g0 < kw / 4; g0 += 16) {
        __m512i r[16];
        for (int j = 0; j < 16; ++j) {
            r[j] = _mm512_loadu_si512((const void *)(nat + (size_t)j * ATD_MM_NAT_STRIDE + 4 * g0));
        }
        atd_mm_tr16x16(r);
        for (int j = 0; j < 16; ++j) {
            _mm512_storeu_si512((void *)(tile + ((size_t)(g0 + j) * ATD_MM_MR_MAX + r0) * 4), r[j]);
        }
    }
}
#endif  // ATD_HAVE_AVX512
#endif  // ATD_HAVE_AVX2

// ---- NEON (sdot) -----------------------------------------------------------------------------------------
//
// 8 rows (2 registers of 4 rows x 4 signed bytes) x NC <= 4 activation rows: vdotq_laneq_s32 takes
// one activation k-group from a lane of a 16-byte load. Decoding is the scalar reference.
#if defined(ATD_HAVE_NEON) && defined(__ARM_FEATURE_DOTPROD)
#define ATD_MM_HAVE_NEON 1

static void atd_mm_pack_neon(const uint8_t * nat, int nrows, int kw, uint8_t * tile) {
    // tile[g][8 rows][4] signed, rows >= nrows zero
    for (int g = 0; g < kw / 4; ++g) {
        for (int r = 0; r < 8; ++r) {
            for (int j = 0; j < 4; ++j) {
                tile[((size_t)g * 8 + r) * 4 + j] =
                    r < nrows ? (uint8_t)(nat[(size_t)r * ATD_MM_NAT_STRIDE + 4 * g + j] ^ 0x80) : 0;
            }
        }
    }
}

static void atd_mm_kernel_neon(const uint8_t * tile, const float * s, int nrows, int block, int kb0, int nblk,
                               const void * vy, size_t by, int nc, float * dst, size_t ldd, int first) {
    const int    gpb = block / 4;
    const int    gph = block == QK_ATD ? gpb : gpb / 2;
    float        ob[ATD_MM_NR][8];
    float32x4_t  o[ATD_MM_NR][2];
    for (int c = 0; c < ATD_MM_NR; ++c) {
        memset(ob[c], 0, sizeof ob[c]);
        if (!first && c < nc) memcpy(ob[c], dst + (size_t)c * ldd, (size_t)nrows * sizeof(float));
        o[c][0] = vld1q_f32(ob[c]);
        o[c][1] = vld1q_f32(ob[c] + 4);
    }
    for (int b = 0; b < nblk; ++b) {
        float32x4_t t[ATD_MM_NR][2];
        for (int h = 0; h * gph < gpb; ++h) {
            int32x4_t      a[ATD_MM_NR][2];
            const int8_t * q[ATD_MM_NR];
            float          d[ATD_MM_NR];
            for (int c = 0; c < ATD_MM_NR; ++c) {
                const char * yr = (const char *)vy + (size_t)(c < nc ? c : 0) * by;
                if (block == QK_ATD) {
                    const block_q8_K * yb = (const block_q8_K *)yr + kb0 + b;
                    q[c] = yb->qs;
                    d[c] = yb->d;
                } else {
                    const block_atd_q8_64mm * yb = (const block_atd_q8_64mm *)yr + kb0 + b;
                    q[c] = yb->qs + 32 * h;
                    d[c] = yb->d[h];
                }
                a[c][0] = a[c][1] = vdupq_n_s32(0);
            }
            const int8_t * tb = (const int8_t *)tile + ((size_t)b * gpb + (size_t)h * gph) * 8 * 4;
            for (int g = 0; g < gph; g += 4) {
                int8x16_t v[ATD_MM_NR];
                for (int c = 0; c < ATD_MM_NR; ++c) v[c] = vld1q_s8(q[c] + 4 * g);
#define ATD_MM_NEON_STEP(L)                                                                 \
    {                                                                                       \
        const int8x16_t w0 = vld1q_s8(tb + (g + L) * 32), w1 = vld1q_s8(tb + (g + L) * 32 + 16); \
        for (int c = 0; c < ATD_MM_NR; ++c) {                                               \
            a[c][0] = vdotq_laneq_s32(a[c][0], w0, v[c], L);                                \
            a[c][1] = vdotq_laneq_s32(a[c][1], w1, v[c], L);                                \
        }                                                                                   \
    }
                ATD_MM_NEON_STEP(0) ATD_MM_NEON_STEP(1) ATD_MM_NEON_STEP(2) ATD_MM_NEON_STEP(3)
#undef ATD_MM_NEON_STEP
            }
            for (int c = 0; c < ATD_MM_NR; ++c) {
                const float32x4_t dv = vdupq_n_f32(d[c]);
                for (int z = 0; z < 2; ++z) {
                    t[c][z] = vfmaq_f32(h == 0 ? vdupq_n_f32(0.0f) : t[c][z], dv, vcvtq_f32_s32(a[c][z]));
                }
            }
        }
        const float32x4_t s0 = vld1q_f32(s + b * ATD_MM_MR_MAX), s1 = vld1q_f32(s + b * ATD_MM_MR_MAX + 4);
        for (int c = 0; c < ATD_MM_NR; ++c) {
            o[c][0] = vfmaq_f32(o[c][0], t[c][0], s0);
            o[c][1] = vfmaq_f32(o[c][1], t[c][1], s1);
        }
    }
    for (int c = 0; c < nc; ++c) {
        vst1q_f32(ob[c], o[c][0]);
        vst1q_f32(ob[c] + 4, o[c][1]);
        memcpy(dst + (size_t)c * ldd, ob[c], (size_t)nrows * sizeof(float));
    }
}
#endif

// ---- driver ------------------------------------------------------------------------------------------------


// which machinery a path uses: tile rows, decoder and microkernel
// (the AVX-512 microkernel with the VBMI decoder, or with the AVX2 one: the path's dot variant 2 or 3 / 1;
// a tile is decoded once for many activation rows, so the GFNI fields of variant 3 are not used here)
enum { ATD_MM_K_SCALAR, ATD_MM_K_AVX2_MAD, ATD_MM_K_AVX2_VNNI, ATD_MM_K_AVX2_EVEX, ATD_MM_K_AVX512, ATD_MM_K_AVX512_VBMI,
       ATD_MM_K_NEON };

static int atd_mm_kind(int path) {
    switch (path) {
#if defined(ATD_HAVE_AVX512)
        case ATD_PATH_AVX512:
#if defined(ATD_HAVE_AVX512VBMI)
            if (atd_dot_variant_of(ATD_PATH_AVX512) >= 2) return ATD_MM_K_AVX512_VBMI;
#endif
            return ATD_MM_K_AVX512;
#endif
#if defined(ATD_HAVE_AVX2)
        case ATD_PATH_AVX2: {
            const int v = atd_dot_variant_of(ATD_PATH_AVX2);
            (void)v;
#if defined(ATD_HAVE_AVXVNNI)
            if (v == 2) return ATD_MM_K_AVX2_VNNI;
#endif
#if defined(ATD_HAVE_AVX512)
            if (v == 3) return ATD_MM_K_AVX2_EVEX;
#endif
            return ATD_MM_K_AVX2_MAD;
        }
#endif
#if defined(ATD_MM_HAVE_NEON)
        case ATD_PATH_NEON:
            return ATD_MM_K_NEON;
#endif
        default:
            return ATD_MM_K_SCALAR;
    }
}

// blocks [b0, b0 + nblk) of one row (of nb blocks) into natural order by the decoder of a kernel kind:
// u[e] = w + 128, s[b * ATD_MM_MR_MAX] the block's step
static void atd_mm_decode_blocks(int kind, const atd_row_view * v, int planes, int block, int nb, int b0, int nblk,
                                 uint8_t * u, float * s) {
    (void)nb;
    switch (kind) {
#if defined(ATD_HAVE_AVX512VBMI)
        case ATD_MM_K_AVX512_VBMI:
            if (!v->r2) {
                atd_mm_decode_avx512(v->blk, planes, block, b0, nblk, u, s);
                break;
            }
            atd_mm_decode_avx2(v, planes, block, b0, nblk, u, s, nb - 1);  // r2 needs no digit tables
            break;
#endif
#if defined(ATD_HAVE_AVX2)
        case ATD_MM_K_AVX512:
        case ATD_MM_K_AVX2_MAD:
        case ATD_MM_K_AVX2_VNNI:
        case ATD_MM_K_AVX2_EVEX:
            atd_mm_decode_avx2(v, planes, block, b0, nblk, u, s, nb - 1);
            break;
#endif
        default:
            for (int b = 0; b < nblk; ++b) {
                atd_mm_decode_ref(v, planes, block, b0 + b, 1, u + b * block, &s[b * ATD_MM_MR_MAX]);
            }
            break;
    }
}

static void atd_mul_mat_impl(int n, int planes, int block, const void * vx, size_t bx, int nr, const void * vy,
                             size_t by, int nc, float * dst, size_t ldd, void * scratch, int path, int r2) {
    if (n < block || nr <= 0 || nc <= 0 || planes < 1 || planes > ATD_MAX_PLANES ||
        (block != QK_ATD && block != QK_ATD_64)) {
        return;
    }
    if (path == ATD_PATH_AUTO || !atd_path_available(path)) {
        path = atd_selected_path();
    }
    ATD_INC(atd_mm_ncalls);
    const int kind = atd_mm_kind(path);
    const int mr   = kind == ATD_MM_K_AVX512 || kind == ATD_MM_K_AVX512_VBMI ? 32 : kind == ATD_MM_K_NEON ? 8 : 16;
    const int nb   = n / block;
    const int kcb  = ATD_MM_KC / block;  // blocks per chunk
    uint8_t * base = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    uint8_t * nat  = base;
    uint8_t * tile = nat + ATD_MM_NAT * ATD_MM_NAT_STRIDE;
    float *   sc   = (float *)(tile + ATD_MM_MR_MAX * ATD_MM_KC);
    (void)tile;
    for (int r0 = 0; r0 < nr; r0 += mr) {
        const int nrows = nr - r0 < mr ? nr - r0 : mr;
        for (int kb0 = 0; kb0 < nb; kb0 += kcb) {
            const int nblk = nb - kb0 < kcb ? nb - kb0 : kcb;
            const int kw   = nblk * block;
            // decode (16 rows at a time) and pack
            for (int rs = 0; rs < mr; rs += ATD_MM_NAT) {
                for (int r = 0; r < ATD_MM_NAT; ++r) {
                    uint8_t * u  = nat + (size_t)r * ATD_MM_NAT_STRIDE;
                    float *   sr = sc + rs + r;  // s[b * 32 + row]
                    if (rs + r >= nrows) {
                        memset(u, 128, (size_t)kw);  // rows past the end: zero weights, zero scale
                        for (int b = 0; b < nblk; ++b) sr[b * ATD_MM_MR_MAX] = 0.0f;
                        continue;
                    }
                    const atd_row_view v = r2 ? atd_r2_row(vx, nr, r0 + rs + r, bx, planes, block)
                                              : atd_file_row((const uint8_t *)vx + (size_t)(r0 + rs + r) * bx, planes, block);
                    atd_mm_decode_blocks(kind, &v, planes, block, nb, kb0, nblk, u, sr);
                }
                switch (kind) {
#if defined(ATD_HAVE_AVX512)
                    case ATD_MM_K_AVX512:
                    case ATD_MM_K_AVX512_VBMI:
                        atd_mm_pack_avx512(nat, kw, tile, rs);
                        break;
#endif
#if defined(ATD_HAVE_AVX2)
                    case ATD_MM_K_AVX2_MAD:
                    case ATD_MM_K_AVX2_VNNI:
                    case ATD_MM_K_AVX2_EVEX:
                        atd_mm_pack_avx2(nat, kw, tile, 16, 0);
                        break;
#endif
#if defined(ATD_MM_HAVE_NEON)
                    case ATD_MM_K_NEON:
                        atd_mm_pack_neon(nat, nrows, kw, tile);
                        break;
#endif
                    default:
                        break;
                }
                if (kind == ATD_MM_K_SCALAR) {
                    atd_mm_kernel_scalar(nat, sc, nrows - rs < ATD_MM_NAT ? nrows - rs : ATD_MM_NAT, planes, block,
                                         kb0, nblk, vy, by, nc, dst + r0 + rs, ldd, kb0 == 0);
                }
                if (mr <= ATD_MM_NAT) {
                    break;  // the tile holds these rows only
                }
            }
            if (kind == ATD_MM_K_SCALAR) {
                continue;
            }
            for (int c0 = 0; c0 < nc; c0 += ATD_MM_NR) {
                const int    ncc = nc - c0 < ATD_MM_NR ? nc - c0 : ATD_MM_NR;
                const void * yc  = (const char *)vy + (size_t)c0 * by;
                float *      dc  = dst + (size_t)c0 * ldd + r0;
                (void)ncc; (void)yc; (void)dc;  // unused where no SIMD kernel is compiled
                switch (kind) {
#if defined(ATD_HAVE_AVX512)
                    case ATD_MM_K_AVX512:
                    case ATD_MM_K_AVX512_VBMI:
                        atd_mm_kernel_avx512(tile, sc, nrows, block, kb0, nblk, yc, by, ncc, dc, ldd, kb0 == 0);
                        break;
                    case ATD_MM_K_AVX2_EVEX:
                        atd_mm_kernel_avx2_evex(tile, sc, nrows, block, kb0, nblk, yc, by, ncc, dc, ldd, kb0 == 0);
                        break;
#endif
#if defined(ATD_HAVE_AVXVNNI)
                    case ATD_MM_K_AVX2_VNNI:
                        atd_mm_kernel_avx2_vnni(tile, sc, nrows, block, kb0, nblk, yc, by, ncc, dc, ldd, kb0 == 0);
                        break;
#endif
#if defined(ATD_HAVE_AVX2)
                    case ATD_MM_K_AVX2_MAD:
                        atd_mm_kernel_avx2_mad(tile, sc, nrows, block, kb0, nblk, yc, by, ncc, dc, ldd, kb0 == 0);
                        break;
#endif
#if defined(ATD_MM_HAVE_NEON)
                    case ATD_MM_K_NEON:
                        atd_mm_kernel_neon(tile, sc, nrows, block, kb0, nblk, yc, by, ncc, dc, ldd, kb0 == 0);
                        break;
#endif
                    default:
                        break;
                }
            }
        }
    }
}

// ---- the r2 repack (atd.h; the scalar reference atd_repack_r2_ref is in atd-quants.c) ---------------------
#if defined(ATD_HAVE_AVX2)
// each plane's base-3 bytes decoded as the batched decoder does, then packed four codes a byte
ATD_TARGET_AVX2 static void atd_repack_r2_avx2(const uint8_t * x, void * dst, int64_t nrows, int64_t n, int planes,
                                                int block, size_t rsz) {
    const int           S   = ATD_PLANE_BYTES(block);
    const size_t        bsz = ATD_TYPE_SIZE(planes, block);
    ATD_ALIGN64 uint8_t codes[QK_ATD + 64];
    uint8_t             pad[ATD_TYPE_SIZE(ATD_MAX_PLANES, QK_ATD_64) + 16] = { 0 };
    for (int64_t r = 0; r < nrows; ++r) {
        const atd_row_view v = atd_r2_row(dst, nrows, r, rsz, planes, block);
        for (int64_t b = 0; b < n / block; ++b, x += bsz) {
            const uint8_t * blk = x;
            // the 16-byte load of a 13-byte plane reads 3 bytes past the source only in its last block
            if (block == QK_ATD_64 && r == nrows - 1 && b == n / block - 1) {
                memcpy(pad, x, bsz);
                blk = pad;
            }
            uint8_t * y = (uint8_t *)v.blk + (size_t)b * v.step;
            memcpy(y, blk, 2 * (size_t)planes);
            for (int i = 0; i < planes; ++i) {
                atd_mm_codes_avx2(blk + 2 * planes + i * S, block, codes);
                uint8_t * out = y + v.poff + i * v.pstep;
                if (block == QK_ATD) {  // codes 0..2: no bit crosses into the next byte
                    for (int h = 0; h < 2; ++h) {
                        __m256i c = _mm256_load_si256((const __m256i *)(codes + 32 * h));
                        for (int k = 1; k < 4; ++k) {
                            const __m256i ck = _mm256_load_si256((const __m256i *)(codes + 64 * k + 32 * h));
                            c = _mm256_or_si256(c, _mm256_slli_epi16(ck, 2 * k));
                        }
                        _mm256_storeu_si256((__m256i *)(out + 32 * h), c);
                    }
                } else {
                    __m128i c = _mm_load_si128((const __m128i *)codes);
                    for (int k = 1; k < 4; ++k) {
                        c = _mm_or_si128(c, _mm_slli_epi16(_mm_load_si128((const __m128i *)(codes + 16 * k)), 2 * k));
                    }
                    _mm_storeu_si128((__m128i *)out, c);
                }
            }
        }
    }
}
#endif

size_t atd_repack_r2_path(const void * src, void * dst, int64_t nrows, int64_t n, int planes, int block, int path) {
    const size_t rsz = atd_r2_row_size(planes, block, n);
    if (rsz == 0 || nrows < 0) return 0;
    if (path == ATD_PATH_AUTO || !atd_path_available(path)) path = atd_selected_path();
#if defined(ATD_HAVE_AVX2)
    if (path == ATD_PATH_AVX2 || path == ATD_PATH_AVX512) {
        atd_repack_r2_avx2((const uint8_t *)src, dst, nrows, n, planes, block, rsz);
        return (size_t)nrows * rsz;
    }
#endif
    return atd_repack_r2_ref(src, dst, nrows, n, planes, block);
}

size_t atd_repack_r2(const void * src, void * dst, int64_t nrows, int64_t n, int planes, int block) {
    return atd_repack_r2_path(src, dst, nrows, n, planes, block, ATD_PATH_AUTO);
}

void atd_mul_mat_path(int n, int planes, int block, const void * vx, size_t bx, int nr, const void * vy, size_t by,
                      int nc, float * dst, size_t ldd, void * scratch, int path) {
    atd_mul_mat_impl(n, planes, block, vx, bx, nr, vy, by, nc, dst, ldd, scratch, path, 0);
}

// (r2: bx is the row size of the r2 layout, rows are found by atd_r2_row)
void atd_mul_mat_r2_path(int n, int planes, int block, const void * vx, int nr, const void * vy, size_t by, int nc,
                         float * dst, size_t ldd, void * scratch, int path) {
    const size_t bx = atd_r2_row_size(planes, block, n);
    if (bx != 0) atd_mul_mat_impl(n, planes, block, vx, bx, nr, vy, by, nc, dst, ldd, scratch, path, 1);
}

void atd_mul_mat(int n, int planes, int block, const void * vx, size_t bx, int nr, const void * vy, size_t by, int nc,
                 float * dst, size_t ldd, void * scratch) {
    atd_mul_mat_path(n, planes, block, vx, bx, nr, vy, by, nc, dst, ldd, scratch, ATD_PATH_AUTO);
}

// internal test hook: the natural-order decode of one row (blocks [b0, b0 + nblk), nblk <= KC / block) by
// a path's decoder, u[e] = w + 128, s[b]
void atd_mm_decode_row(const void * row, int planes, int block, int nb, int b0, int nblk, uint8_t * u, float * s,
                       int path);
void atd_mm_decode_row(const void * row, int planes, int block, int nb, int b0, int nblk, uint8_t * u, float * s,
                       int path) {
    ATD_ALIGN64 uint8_t buf[ATD_MM_NAT_STRIDE];
    float               sc[ATD_MM_KC / QK_ATD_64 * ATD_MM_MR_MAX];
    const atd_row_view  v = atd_file_row(row, planes, block);
    if (path == ATD_PATH_AUTO || !atd_path_available(path)) path = atd_selected_path();
    atd_mm_decode_blocks(atd_mm_kind(path), &v, planes, block, nb, b0, nblk, buf, sc);
    memcpy(u, buf, (size_t)nblk * block);
    for (int b = 0; b < nblk; ++b) s[b] = sc[b * ATD_MM_MR_MAX];
}
