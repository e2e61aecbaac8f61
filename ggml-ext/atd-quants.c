// ATD quantization: fp16 helpers, the reference grid fit (docs/atd-format.md section 6),
// dequantization (section 3), validation, and the ggml-style per-type entry points.
//
// Exactness: the bytes must equal gguf_types.quantize() (numpy). Compile with
// -ffp-contract=off and without -ffast-math: every double expression below is evaluated as
// written, one rounding per operation, and every sum over a block runs in element order.
//
// Two implementations of the fit, same bytes:
//   atd_fit_block_scalar  - one block at a time, a line-by-line transcription of section 6;
//                           the portable reference (also used where GCC vector extensions are
//                           missing, e.g. MSVC).
//   atd_fit_group         - 4 blocks at once, one block per SIMD lane (GCC/Clang vector
//                           extensions, compiled for AVX-512 / AVX2 / baseline and picked at run
//                           time). Each lane runs exactly the scalar sequence of its block; no sum
//                           is ever reordered within a block.
#if !defined(_GNU_SOURCE) && !defined(_POSIX_C_SOURCE) && !defined(_WIN32)
#define _POSIX_C_SOURCE 200809L
#endif

#include "atd.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(_WIN32) || defined(ATD_NO_THREADS)
#define ATD_THREADS 0 // atd_quantize_rows runs on the calling thread
#else
#define ATD_THREADS 1
#include <pthread.h>
#include <unistd.h>
#endif

#if (defined(__GNUC__) || defined(__clang__)) && !defined(ATD_NO_LANES)
#define ATD_LANES 1 // the 4-lane group fit (vector extensions)
#else
#define ATD_LANES 0
#endif

#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0 && FLT_EVAL_METHOD != -1
#warning "ATD fit: excess precision (x87) changes the rounding; the bytes will not match the reference"
#endif

// fit constants (gguf_types/fit.py)
#define ATD_K          32    // grid candidates
#define ATD_ITERS      6     // LS refit + reassignment rounds
#define ATD_SING_RTOL  1e-10 // LDL pivot D_j <= 1e-10 * G_jj: keep the previous scales
#define ATD_MAX_LEVELS 81    // 3^4
#define ATD_MID_PAD    128   // midpoints padded with +inf to a power of two for the binary search

static const int atd_pow3[5] = { 1, 3, 9, 27, 81 };

// ---------------------------------------------------------------------------------------------
// fp16 <-> fp32 (bit manipulation, so the result does not depend on the compiler or F16C)

static inline uint32_t atd_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float    atd_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

float atd_fp16_to_fp32(ggml_half h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13); // inf / NaN (payload kept)
    } else if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { // subnormal: man * 2^-24, normalize
            int s = 0;
            while (!(man & 0x400u)) { man <<= 1; ++s; }
            u = sign | ((uint32_t)(113 - s) << 23) | ((man & 0x3ffu) << 13);
        }
    } else {
        u = sign | ((exp + 112) << 23) | (man << 13);
    }
    return atd_bits_f32(u);
}

// round to nearest even, subnormals kept, overflow to inf: numpy astype(float16), F16C _cvtss_sh(x, 0)
ggml_half atd_fp32_to_fp16(float f) {
    const uint32_t x    = atd_f32_bits(f);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax   = x & 0x7fffffffu;
    if (ax > 0x7f800000u) {
        return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu)); // NaN: quiet, top payload bits
    }
    if (ax >= 0x477ff000u) {
        return (uint16_t)(sign | 0x7c00u); // >= 65520 (and inf) rounds to inf
    }
    if (ax < 0x38800000u) { // below 2^-14: fp16 subnormal or zero
        if (ax < 0x33000000u) {
            return sign; // below 2^-25 (half the smallest subnormal): zero
        }
        const uint32_t e   = ax >> 23;                // 102..112
        const uint32_t m   = (ax & 0x7fffffu) | 0x800000u;
        const uint32_t s   = 126 - e;                 // value / 2^-24 = m >> s
        uint32_t       h   = m >> s;
        const uint32_t rem = m & ((1u << s) - 1);
        const uint32_t half = 1u << (s - 1);
        if (rem > half || (rem == half && (h & 1u))) {
            ++h; // may carry into the smallest normal (0x400): still the right encoding
        }
        return (uint16_t)(sign | h);
    }
    uint32_t       h   = ((ax >> 23) - 112) << 10 | ((ax >> 13) & 0x3ffu);
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) {
        ++h; // carry into the exponent is the correct rounding
    }
    return (uint16_t)(sign | h);
}

static inline int atd_half_is_finite(uint16_t h) { return (h & 0x7c00u) != 0x7c00u; }

// ---------------------------------------------------------------------------------------------
// shared pieces of the fit

static inline int atd_type_ok(int planes, int block) {
    return planes >= 1 && planes <= ATD_MAX_PLANES && (block == QK_ATD || block == QK_ATD_64);
}

static inline size_t atd_block_bytes(int planes, int block) {
    return (size_t)ATD_TYPE_SIZE(planes, block);
}

// f_k = 0.30 + (0.70 * k) / (K - 1)
static inline double atd_grid_factor(int k) {
    return 0.30 + (0.70 * (double)k) / (double)(ATD_K - 1);
}

// trit of plane i in combo c = sum_i (t_i + 1) * 3^(N-1-i)
static inline int atd_combo_trit(int c, int i, int n) {
    return (c / atd_pow3[n - 1 - i]) % 3 - 1;
}

// The 3^N levels sorted stably by (value, combo), and their midpoints.
typedef struct {
    double  mid[ATD_MID_PAD];      // (s_k + s_{k+1}) * 0.5, then +inf up to npad
    uint8_t order[ATD_MAX_LEVELS]; // combo at sorted position p
    int     npad;                  // power of two >= 3^N - 1
} atd_levels;

static inline int atd_lev_before(const double * v, int a, int b) {
    return v[a] < v[b] || (v[a] == v[b] && a < b); // -0.0 == +0.0, then combo index
}

// Sort the 3^N levels l_c = sum_i alpha_i * t_i(c) (summed in plane order from 0: double, or
// float32 like the decoder when d32 is given) stably by (value, combo), and form the midpoints.
// order: in, a guess (identity, or the previous round's order: the levels move little between
// rounds, so insertion sort is then close to linear); out, the sorted order. Insertion sort is
// a correct stable sort from any start, so the guess only changes the speed.
static void atd_sort_levels(int n, const double * alpha, const float * d32, uint8_t * order, atd_levels * lv) {
    double pv[ATD_MAX_LEVELS], nv[ATD_MAX_LEVELS];
    int cnt = 1;
    pv[0] = 0.0;
    for (int i = 0; i < n; ++i) { // levels of planes 0..i from those of planes 0..i-1
        for (int c = 0; c < cnt; ++c) {
            for (int t = -1; t <= 1; ++t) {
                nv[3*c + t + 1] = d32 ? (double)((float)pv[c] + d32[i] * (float)t) : pv[c] + alpha[i] * (double)t;
            }
        }
        cnt *= 3;
        memcpy(pv, nv, sizeof(double)*cnt);
    }
    for (int m = 1; m < cnt; ++m) {
        const uint8_t c = order[m];
        int k = m - 1;
        while (k >= 0 && atd_lev_before(pv, c, order[k])) { order[k + 1] = order[k]; --k; }
        order[k + 1] = c;
    }
    int npad = 1;
    while (npad < cnt - 1) npad <<= 1;
    for (int k = 0; k < cnt - 1; ++k) {
        lv->mid[k] = (pv[order[k]] + pv[order[k + 1]]) * 0.5;
    }
    for (int k = cnt - 1; k < npad; ++k) {
        lv->mid[k] = INFINITY;
    }
    memcpy(lv->order, order, cnt);
    lv->npad = npad;
}

static inline void atd_identity_order(uint8_t * order, int L) {
    for (int c = 0; c < L; ++c) order[c] = (uint8_t)c;
}

// sorted position p = number of midpoints strictly below w (branchless lower_bound; the
// midpoints are non-decreasing, so this equals the spec's linear count)
static inline int atd_nearest_combo(const atd_levels * lv, double w) {
    const double * m = lv->mid;
    int p = 0;
    for (int s = lv->npad >> 1; s > 0; s >>= 1) {
        p += (m[p + s - 1] < w) ? s : 0;
    }
    p += m[p] < w;
    return lv->order[p];
}

// Solve G alpha = b by LDL^T in the order of section 6.3(a); keeps alpha if singular/non-finite.
static void atd_ldl_update(int n, double G[ATD_MAX_PLANES][ATD_MAX_PLANES], const double * rhs, double * alpha) {
    double D[ATD_MAX_PLANES], L[ATD_MAX_PLANES][ATD_MAX_PLANES];
    for (int j = 0; j < n; ++j) {
        double acc = G[j][j];
        for (int k = 0; k < j; ++k) {
            acc = acc - (L[j][k] * L[j][k]) * D[k];
        }
        if (!(G[j][j] > 0.0 && acc > ATD_SING_RTOL * G[j][j])) {
            return; // an empty or duplicate plane
        }
        D[j] = acc;
        for (int i = j + 1; i < n; ++i) {
            double a = G[j][i];
            for (int k = 0; k < j; ++k) {
                a = a - (L[i][k] * L[j][k]) * D[k];
            }
            L[i][j] = a / D[j];
        }
    }
    double z[ATD_MAX_PLANES], sol[ATD_MAX_PLANES];
    for (int i = 0; i < n; ++i) {
        double acc = rhs[i];
        for (int k = 0; k < i; ++k) {
            acc = acc - L[i][k] * z[k];
        }
        z[i] = acc;
    }
    for (int i = n - 1; i >= 0; --i) {
        double acc = z[i] / D[i];
        for (int k = i + 1; k < n; ++k) {
            acc = acc - L[k][i] * sol[k];
        }
        sol[i] = acc;
    }
    for (int i = 0; i < n; ++i) {
        if (!isfinite(sol[i])) return;
    }
    for (int i = 0; i < n; ++i) {
        alpha[i] = sol[i];
    }
}

// Step 3: scales to fp16; returns 0 on overflow. clamp: store +-65504 instead and go on
// (ggml entry points); else the overflowing scale is stored as inf and the block is left there.
static int atd_round_scales(int n, const double * alpha, uint16_t * d16, float * d32, int clamp) {
    int ok = 1;
    for (int i = 0; i < n; ++i) {
        uint16_t h = atd_fp32_to_fp16((float)alpha[i]);
        if (!atd_half_is_finite(h)) {
            ok = 0;
            if (clamp) h = (uint16_t)((h & 0x8000u) | 0x7bffu);
        }
        if ((h & 0x7fffu) == 0) h = 0; // canonical +0.0
        d16[i] = h;
        d32[i] = atd_fp16_to_fp32(h);
    }
    return ok;
}

// Write one block: scales, then codes[i][e] (0..2) as base-3 bytes (element e of plane i is digit
// e / S of byte e % S; padding slots get code 0).
static void atd_pack_block(int n, int B, const uint16_t * d16, const uint8_t * codes /* [n][B] */, uint8_t * out) {
    const int S = ATD_PLANE_BYTES(B);
    for (int i = 0; i < n; ++i) {
        out[2*i + 0] = (uint8_t)(d16[i] & 0xff); // little endian
        out[2*i + 1] = (uint8_t)(d16[i] >> 8);
    }
    uint8_t * qs = out + 2*n;
    for (int i = 0; i < n; ++i) {
        const uint8_t * c = codes + i*B;
        for (int j = 0; j < S; ++j) {
            int v = 0;
            for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) {
                const int e = S*k + j;
                v = 3*v + (e < B ? c[e] : 0);
            }
            qs[i*S + j] = atd_encode_byte(v);
        }
    }
}

static void atd_write_zero_block(int n, int B, uint8_t * out) {
    static const uint16_t zero_d[ATD_MAX_PLANES] = { 0, 0, 0, 0 }; // +0.0 scales
    uint8_t codes[ATD_MAX_PLANES * QK_ATD];
    memset(codes, 1, sizeof(codes));                                 // every trit 0
    atd_pack_block(n, B, zero_d, codes, out);
}

// final reassignment against the decoder's float32 levels; dead planes (scale 0) get t = 0
static void atd_final_codes(int n, int B, const double * w, int wstride, const uint16_t * d16, const float * d32,
                            uint8_t * codes /* [n][B] */) {
    atd_levels lv;
    uint8_t order[ATD_MAX_LEVELS];
    atd_identity_order(order, atd_pow3[n]);
    atd_sort_levels(n, NULL, d32, order, &lv);
    for (int j = 0; j < B; ++j) {
        const int c = atd_nearest_combo(&lv, w[j * wstride]);
        for (int i = 0; i < n; ++i) {
            codes[i*B + j] = (uint8_t)(d16[i] == 0 ? 1 : atd_combo_trit(c, i, n) + 1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the scalar reference: one block, section 6 line by line

// x: B weights; h: B importance values or NULL. Returns 0 if a scale overflowed fp16.
static int atd_fit_block_scalar(const float * x, const float * imp, int n, int B, int clamp, uint8_t * out) {
    double w[QK_ATD], h[QK_ATD];
    int8_t t[ATD_MAX_PLANES][QK_ATD];
    const int M = (atd_pow3[n] - 1) / 2;

    int use_h = 0;
    if (imp) {
        for (int j = 0; j < B; ++j) use_h |= imp[j] != 0.0f; // all-zero importance: unweighted
    }
    double amax = 0.0;
    for (int j = 0; j < B; ++j) {
        w[j] = (double)x[j];
        h[j] = use_h ? (double)imp[j] : 1.0; // 1.0 * x == x: same bits as the unweighted formulas
        if (fabs(w[j]) > amax) amax = fabs(w[j]);
    }
    if (amax == 0.0) {
        atd_write_zero_block(n, B, out);
        return 1;
    }

    // step 1: grid start
    const double base = amax / (double)M;
    double best_err = INFINITY, best_d = 0.0, best_dk = base * atd_grid_factor(0);
    for (int k = 0; k < ATD_K; ++k) {
        const double dk = base * atd_grid_factor(k);
        double q[QK_ATD];
        double swq = 0.0, sqq = 0.0;
        for (int j = 0; j < B; ++j) {
            double v = nearbyint(w[j] / dk);
            v = v > M ? M : (v < -M ? -M : v);
            q[j] = v;
            swq += (h[j] * w[j]) * v;
            sqq += (h[j] * v) * v;
        }
        const double ds = sqq > 0.0 ? swq / sqq : dk;
        double err = 0.0;
        for (int j = 0; j < B; ++j) {
            const double e = w[j] - ds * q[j];
            err += (h[j] * e) * e;
        }
        if (err < best_err) { best_err = err; best_d = ds; best_dk = dk; }
    }
    for (int j = 0; j < B; ++j) {
        double v = nearbyint(w[j] / best_dk);
        v = v > M ? M : (v < -M ? -M : v);
        int u = (int)v + M; // balanced ternary digits, plane 0 most significant
        for (int i = n - 1; i >= 0; --i) { t[i][j] = (int8_t)(u % 3 - 1); u /= 3; }
    }
    double alpha[ATD_MAX_PLANES];
    for (int i = 0; i < n; ++i) alpha[i] = (double)atd_pow3[n - 1 - i] * best_d;

    // step 2: alternate LS scales and nearest-level trits
    for (int it = 0; it < ATD_ITERS; ++it) {
        double G[ATD_MAX_PLANES][ATD_MAX_PLANES], rhs[ATD_MAX_PLANES];
        for (int a = 0; a < n; ++a) {
            for (int b = a; b < n; ++b) {
                double acc = 0.0;
                for (int j = 0; j < B; ++j) acc += (h[j] * t[a][j]) * t[b][j];
                G[a][b] = G[b][a] = acc;
            }
            double acc = 0.0;
            for (int j = 0; j < B; ++j) acc += (h[j] * w[j]) * t[a][j];
            rhs[a] = acc;
        }
        atd_ldl_update(n, G, rhs, alpha);
        atd_levels lv;
        uint8_t order[ATD_MAX_LEVELS];
        atd_identity_order(order, atd_pow3[n]);
        atd_sort_levels(n, alpha, NULL, order, &lv);
        for (int j = 0; j < B; ++j) {
            const int c = atd_nearest_combo(&lv, w[j]);
            for (int i = 0; i < n; ++i) t[i][j] = (int8_t)atd_combo_trit(c, i, n);
        }
    }

    // step 3: store
    uint16_t d16[ATD_MAX_PLANES];
    float    d32[ATD_MAX_PLANES];
    uint8_t  codes[ATD_MAX_PLANES * QK_ATD];
    const int ok = atd_round_scales(n, alpha, d16, d32, clamp);
    if (!ok && !clamp) {
        atd_write_zero_block(n, B, out);
        for (int i = 0; i < n; ++i) { out[2*i] = (uint8_t)(d16[i] & 0xff); out[2*i + 1] = (uint8_t)(d16[i] >> 8); }
        return 0;
    }
    atd_final_codes(n, B, w, 1, d16, d32, codes);
    atd_pack_block(n, B, d16, codes, out);
    return ok;
}

// ---------------------------------------------------------------------------------------------
// the 4-lane group fit: blocks b0..b3 in the lanes of one vector of doubles; position-major work
// arrays (w[j] holds element j of the 4 blocks), so every per-block sequential sum is a lane-wise
// add. 4 lanes = one ymm: native for AVX2 and AVX-512VL (on Zen 4 a zmm costs two ymm anyway, and
// the loop is bound by the divider, whose per-element rate is the same for ymm and zmm). GCC lowers
// wider-than-native vector types badly (loop-carried vectors go through memory), so no zmm type.

#if ATD_LANES

#define ATD_VL 4
typedef double    atd_vd __attribute__((vector_size(32)));
typedef long long atd_vl __attribute__((vector_size(32)));

typedef struct {
    atd_vd  w[QK_ATD];
    atd_vd  h[QK_ATD];                 // importance (1.0 in lanes without)
    atd_vd  hw[QK_ATD];                // h * w
    atd_vd  q[2][QK_ATD];              // grid candidates k and k-1
    atd_vd  t[ATD_MAX_PLANES][QK_ATD]; // trits as doubles
    double  ws[ATD_VL][QK_ATD];        // each lane's weights sorted ascending ...
    uint8_t wi[ATD_VL][QK_ATD];        // ... and their element indices
} atd_group;

// Sort one lane's weights: an LSD radix sort on the top 16 bits of the float32 patterns (mapped
// to unsigned order), then an insertion pass on the full key for the few weights that share those
// bits. -0.0 sorts before +0.0, which is harmless: equal weights always get the same level.
static void atd_sort_lane(atd_group * g, int l, int B) {
    uint32_t key[2][QK_ATD];
    uint8_t  idx[2][QK_ATD];
    uint16_t cnt[2][256];
    memset(cnt, 0, sizeof(cnt));
    for (int j = 0; j < B; ++j) {
        uint32_t u = atd_f32_bits((float)g->w[j][l]); // exact: w came from a float
        u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
        key[0][j] = u;
        idx[0][j] = (uint8_t)j;
        cnt[0][(u >> 16) & 0xff]++;
        cnt[1][u >> 24]++;
    }
    int src = 0;
    for (int d = 0; d < 2; ++d) {
        const int shift = 16 + 8*d;
        if (cnt[d][(key[src][0] >> shift) & 0xff] == B) continue; // all keys share this digit
        uint16_t pos[256];
        uint16_t sum = 0;
        for (int v = 0; v < 256; ++v) { pos[v] = sum; sum += cnt[d][v]; }
        for (int j = 0; j < B; ++j) {
            const uint32_t u = key[src][j];
            const int p = pos[(u >> shift) & 0xff]++;
            key[1 - src][p] = u;
            idx[1 - src][p] = idx[src][j];
        }
        src = 1 - src;
    }
    uint32_t * k = key[src];
    uint8_t  * x = idx[src];
    for (int j = 1; j < B; ++j) {
        const uint32_t u = k[j];
        const uint8_t  i = x[j];
        int m = j - 1;
        while (m >= 0 && k[m] > u) { k[m + 1] = k[m]; x[m + 1] = x[m]; --m; }
        k[m + 1] = u;
        x[m + 1] = i;
    }
    for (int j = 0; j < B; ++j) {
        g->wi[l][j] = x[j];
        g->ws[l][j] = g->w[x[j]][l];
    }
}

// Nearest level for every weight of lane l, by one sweep over the sorted weights and the sorted
// midpoints: the weights with mid_{k-1} < w <= mid_k are exactly those with k midpoints below,
// so this gives the same combo as atd_nearest_combo (the spec's count) for each weight.
// Calls EMIT(j, combo) for every element.
#define ATD_SWEEP_LANE(g, l, B, lv, L, EMIT) do {                                    \
        const double  * ws_ = (g)->ws[l];                                            \
        const uint8_t * wi_ = (g)->wi[l];                                            \
        int r_ = 0;                                                                  \
        for (int k_ = 0; k_ < (L); ++k_) {                                           \
            const double m_ = k_ < (L) - 1 ? (lv)->mid[k_] : (double)INFINITY;       \
            const int c_ = (lv)->order[k_];                                          \
            while (r_ < (B) && ws_[r_] <= m_) { const int j_ = wi_[r_++]; EMIT(j_, c_); } \
        }                                                                            \
    } while (0)

#define ATD_SEL(m, a, b) ((atd_vd)(((atd_vl)(a) & (m)) | ((atd_vl)(b) & ~(m))))

// q = clamp(rint(x), -M, M) without nearbyint (which does not vectorize):
// * |x| < 2^51: (x + 1.5*2^52) - 1.5*2^52 rounds to the nearest integer, ties to even, exactly
//   like nearbyint (only the sign of a zero result can differ, and q = -0.0 vs +0.0 changes none
//   of the sums). Here |x| = |w / d_k| <= M / 0.3 (+ rounding).
// * kmask (AVX2/AVX-512: a vector compare + blend is cheap): clamp first, then round; equal to
//   round-then-clamp because M is an integer.
// * otherwise (SSE2: GCC splits the 256-bit compares into scalar code): round, then clamp
//   the integer with min(q, M) = q - relu(q - M), relu(z) = (z + |z|) * 0.5 - all exact on
//   small integers, and |z| is a bit mask.
#define ATD_VABS(v) ((atd_vd)((atd_vl)(v) & 0x7fffffffffffffffLL))
#define ATD_V_RINT_CLAMP(dst, src, Mv, kmask) do {                                   \
        atd_vd x_ = (src);                                                           \
        if (kmask) {                                                                 \
            x_ = ATD_SEL(x_ > (Mv), (Mv), x_);                                       \
            x_ = ATD_SEL(x_ < -(Mv), -(Mv), x_);                                     \
            x_ = (x_ + 6755399441055744.0) - 6755399441055744.0;                     \
        } else {                                                                     \
            x_ = (x_ + 6755399441055744.0) - 6755399441055744.0;                     \
            atd_vd z_ = x_ - (Mv);                                                   \
            x_ = x_ - (z_ + ATD_VABS(z_)) * 0.5;                                     \
            z_ = -(Mv) - x_;                                                         \
            x_ = x_ + (z_ + ATD_VABS(z_)) * 0.5;                                     \
        }                                                                            \
        (dst) = x_;                                                                  \
    } while (0)

// The whole fit for the 4 lanes of g (unused lanes hold zero blocks). n, use_h and kmask are
// compile-time constants at every call site, so the accumulators below live in registers.
static inline __attribute__((always_inline)) int atd_fit_group_impl(atd_group * g, const int n, const int B,
                                                                     const int use_h, const int kmask, int clamp,
                                                                     uint8_t ** outs) {
    const int M = (atd_pow3[n] - 1) / 2;
    int ok_all = 1;

    const atd_vd vzero = {0};
    atd_vd amax = vzero;
    for (int l = 0; l < ATD_VL; ++l) { // max is order independent
        double m = 0.0;
        for (int j = 0; j < B; ++j) m = fabs(g->w[j][l]) > m ? fabs(g->w[j][l]) : m;
        amax[l] = m;
    }
    const atd_vl zero = amax == 0.0;
    const atd_vd one  = vzero + 1.0;
    const atd_vd vM   = vzero + (double)M;
    const atd_vd base = amax / (double)M;
    const int L = atd_pow3[n];
    double ctab[ATD_MAX_LEVELS][ATD_MAX_PLANES]; // trits of each combo, as doubles
    for (int c = 0; c < L; ++c) {
        for (int i = 0; i < n; ++i) ctab[c][i] = (double)atd_combo_trit(c, i, n);
    }
    for (int l = 0; l < ATD_VL; ++l) {
        if (!zero[l]) atd_sort_lane(g, l, B);
    }

    // step 1: grid start (the division-bound part: 32 * B divides per lane). Software-pipelined:
    // one pass over j computes candidate k's q and sums and candidate k-1's error (which needs
    // k-1's finished sums), so the two dependency chains overlap. Same operations, same order per
    // candidate; the candidates are still compared in order k = 0, 1, ...
    atd_vd best_err = vzero + INFINITY;
    atd_vd best_d   = vzero;
    atd_vd best_dk  = ATD_SEL(zero, one, base * atd_grid_factor(0));
    atd_vd prev_ds  = vzero, prev_dk = vzero;
    for (int k = 0; k <= ATD_K; ++k) {
        const int     cur  = k < ATD_K; // candidate k: q and sums
        const int     prev = k > 0;     // candidate k-1: error
        const atd_vd  dk   = ATD_SEL(zero, one, base * atd_grid_factor(cur ? k : 0));
        atd_vd      * qc   = g->q[k & 1];
        const atd_vd * qp  = g->q[(k & 1) ^ 1];
        atd_vd swq = vzero, sqq = vzero, err = vzero;
#define ATD_GRID_Q(j) do {                                                           \
            atd_vd v;                                                                \
            ATD_V_RINT_CLAMP(v, g->w[j] / dk, vM, kmask);                            \
            qc[j] = v;                                                               \
            if (use_h) {                                                             \
                swq += g->hw[j] * v;                                                 \
                sqq += (g->h[j] * v) * v;                                            \
            } else {                                                                 \
                swq += g->w[j] * v;                                                  \
                sqq += v * v;                                                        \
            }                                                                        \
        } while (0)
#define ATD_GRID_ERR(j) do {                                                         \
            const atd_vd e = g->w[j] - prev_ds * qp[j];                              \
            if (use_h) {                                                             \
                err += (g->h[j] * e) * e;                                            \
            } else {                                                                 \
                err += e * e;                                                        \
            }                                                                        \
        } while (0)
        if (cur && prev) {
            for (int j = 0; j < B; ++j) { ATD_GRID_Q(j); ATD_GRID_ERR(j); }
        } else if (cur) {
            for (int j = 0; j < B; ++j) { ATD_GRID_Q(j); }
        } else {
            for (int j = 0; j < B; ++j) { ATD_GRID_ERR(j); }
        }
#undef ATD_GRID_Q
#undef ATD_GRID_ERR
        if (prev) {
            const atd_vl better = err < best_err; // strict: the first candidate wins ties
            best_err = ATD_SEL(better, err, best_err);
            best_d   = ATD_SEL(better, prev_ds, best_d);
            best_dk  = ATD_SEL(better, prev_dk, best_dk);
        }
        if (cur) {
            const atd_vl pos = sqq > 0.0;
            atd_vd ds = ATD_SEL(pos, swq / ATD_SEL(pos, sqq, one), dk);
            prev_ds = ATD_SEL(zero, vzero, ds);
            prev_dk = dk;
        }
    }
    for (int j = 0; j < B; ++j) {
        atd_vd v;
        ATD_V_RINT_CLAMP(v, g->w[j] / best_dk, vM, kmask);
        for (int l = 0; l < ATD_VL; ++l) {
            const int u = (int)v[l] + M; // balanced ternary digits of q + M = combo u
            for (int i = 0; i < n; ++i) g->t[i][j][l] = ctab[u][i];
        }
    }
    double alpha[ATD_VL][ATD_MAX_PLANES];
    uint8_t lord[ATD_VL][ATD_MAX_LEVELS]; // each lane's level order, the next sort's starting guess
    for (int l = 0; l < ATD_VL; ++l) atd_identity_order(lord[l], L); // grid start: l_c = (c - M) * d*
    for (int l = 0; l < ATD_VL; ++l) {
        for (int i = 0; i < n; ++i) alpha[l][i] = (double)atd_pow3[n - 1 - i] * best_d[l];
    }

    // step 2
    for (int it = 0; it < ATD_ITERS; ++it) {
        atd_vd G[ATD_MAX_PLANES][ATD_MAX_PLANES], rhs[ATD_MAX_PLANES];
        for (int a = 0; a < n; ++a) {
            rhs[a] = vzero;
            for (int b = a; b < n; ++b) G[a][b] = vzero;
        }
        for (int j = 0; j < B; ++j) {
            atd_vd ta[ATD_MAX_PLANES];
            for (int a = 0; a < n; ++a) ta[a] = g->t[a][j];
            for (int a = 0; a < n; ++a) {
                const atd_vd ht = use_h ? g->h[j] * ta[a] : ta[a];
                for (int b = a; b < n; ++b) G[a][b] += ht * ta[b];
                rhs[a] += (use_h ? g->hw[j] : g->w[j]) * ta[a];
            }
        }
        for (int l = 0; l < ATD_VL; ++l) {
            if (zero[l]) continue; // zero blocks are written canonically below
            double Gl[ATD_MAX_PLANES][ATD_MAX_PLANES], rl[ATD_MAX_PLANES];
            for (int a = 0; a < n; ++a) {
                rl[a] = rhs[a][l];
                for (int b = a; b < n; ++b) Gl[a][b] = Gl[b][a] = G[a][b][l];
            }
            atd_ldl_update(n, Gl, rl, alpha[l]);
            atd_levels lv;
            atd_sort_levels(n, alpha[l], NULL, lord[l], &lv);
#define ATD_EMIT_T(j, c) do { for (int i = 0; i < n; ++i) g->t[i][j][l] = ctab[c][i]; } while (0)
            ATD_SWEEP_LANE(g, l, B, &lv, L, ATD_EMIT_T);
#undef ATD_EMIT_T
        }
    }

    // step 3
    for (int l = 0; l < ATD_VL; ++l) {
        if (!outs[l]) continue;
        if (zero[l]) { atd_write_zero_block(n, B, outs[l]); continue; }
        uint16_t d16[ATD_MAX_PLANES];
        float    d32[ATD_MAX_PLANES];
        uint8_t  codes[ATD_MAX_PLANES * QK_ATD];
        const int ok = atd_round_scales(n, alpha[l], d16, d32, clamp);
        if (!ok) ok_all = 0;
        if (!ok && !clamp) {
            atd_write_zero_block(n, B, outs[l]);
            for (int i = 0; i < n; ++i) { outs[l][2*i] = (uint8_t)(d16[i] & 0xff); outs[l][2*i + 1] = (uint8_t)(d16[i] >> 8); }
            continue;
        }
        atd_levels lv;
        atd_sort_levels(n, NULL, d32, lord[l], &lv);
#define ATD_EMIT_C(j, c) do { for (int i = 0; i < n; ++i) codes[i*B + (j)] = (uint8_t)(d16[i] == 0 ? 1 : ctab[c][i] + 1); } while (0)
        ATD_SWEEP_LANE(g, l, B, &lv, L, ATD_EMIT_C);
#undef ATD_EMIT_C
        atd_pack_block(n, B, d16, codes, outs[l]);
    }
    return ok_all;
}

#define ATD_GROUP_DISPATCH(g, n, B, use_h, kmask, clamp, outs)                              \
    switch ((n) * 2 + ((use_h) ? 1 : 0)) {                                                   \
        case 2: return atd_fit_group_impl(g, 1, B, 0, kmask, clamp, outs);                  \
        case 3: return atd_fit_group_impl(g, 1, B, 1, kmask, clamp, outs);                  \
        case 4: return atd_fit_group_impl(g, 2, B, 0, kmask, clamp, outs);                  \
        case 5: return atd_fit_group_impl(g, 2, B, 1, kmask, clamp, outs);                  \
        case 6: return atd_fit_group_impl(g, 3, B, 0, kmask, clamp, outs);                  \
        case 7: return atd_fit_group_impl(g, 3, B, 1, kmask, clamp, outs);                  \
        case 8: return atd_fit_group_impl(g, 4, B, 0, kmask, clamp, outs);                  \
        default: return atd_fit_group_impl(g, 4, B, 1, kmask, clamp, outs);                 \
    }

typedef int (*atd_group_fn)(atd_group *, int, int, int, int, uint8_t **);

static int atd_fit_group_generic(atd_group * g, int n, int B, int use_h, int clamp, uint8_t ** outs) {
    ATD_GROUP_DISPATCH(g, n, B, use_h, 0, clamp, outs)
}

#if defined(__x86_64__) || defined(__i386__)
// same code, wider registers (no FMA: -ffp-contract=off keeps every a*b+c rounded twice anyway)
__attribute__((target("avx2")))
static int atd_fit_group_avx2(atd_group * g, int n, int B, int use_h, int clamp, uint8_t ** outs) {
    ATD_GROUP_DISPATCH(g, n, B, use_h, 1, clamp, outs)
}
__attribute__((target("avx512f,avx512dq,avx512vl")))
static int atd_fit_group_avx512(atd_group * g, int n, int B, int use_h, int clamp, uint8_t ** outs) {
    ATD_GROUP_DISPATCH(g, n, B, use_h, 1, clamp, outs)
}
#endif

// best variant for this CPU; ATD_FIT_ISA=generic|avx2 (tests) caps it
static atd_group_fn atd_pick_group_fn(void) {
    const char * isa = getenv("ATD_FIT_ISA");
    if (isa && strcmp(isa, "generic") == 0) {
        return atd_fit_group_generic;
    }
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (!(isa && strcmp(isa, "avx2") == 0) && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
        return atd_fit_group_avx512;
    }
    if (__builtin_cpu_supports("avx2")) {
        return atd_fit_group_avx2;
    }
#endif
    return atd_fit_group_generic;
}

#endif // ATD_LANES

// ---------------------------------------------------------------------------------------------
// blocks -> bytes

typedef struct {
#if ATD_LANES
    atd_group * g;
    void      * mem;
    atd_group_fn fn;
#endif
    int scalar; // force atd_fit_block_scalar
} atd_fitter;

static int atd_fitter_init(atd_fitter * f, int scalar) {
    memset(f, 0, sizeof(*f));
    const char * isa = getenv("ATD_FIT_ISA"); // "scalar": block-by-block reference everywhere (tests)
    f->scalar = scalar || (isa && strcmp(isa, "scalar") == 0);
    scalar = f->scalar;
#if ATD_LANES
    if (!scalar) {
        f->mem = malloc(sizeof(atd_group) + 64);
        if (!f->mem) {
            f->scalar = 1; // still correct, just slower
            return 1;
        }
        f->g  = (atd_group *)(((uintptr_t)f->mem + 63) & ~(uintptr_t)63);
        f->fn = atd_pick_group_fn();
    }
#else
    f->scalar = 1;
#endif
    return 1;
}

static void atd_fitter_free(atd_fitter * f) {
#if ATD_LANES
    free(f->mem);
#endif
    (void)f;
}

static inline int atd_imp_nonzero(const float * h, int B) {
    for (int j = 0; j < B; ++j) {
        if (h[j] != 0.0f) return 1;
    }
    return 0;
}

// nb consecutive blocks starting at global block index b0 of rows with bpr blocks each
// (block b uses imatrix + (b % bpr) * B). Returns 0 if a scale overflowed fp16.
static int atd_fit_blocks(atd_fitter * f, const float * x, uint8_t * y, int64_t b0, int64_t nb, int64_t bpr,
                          const float * imatrix, int n, int B, int clamp) {
    const size_t bsz = atd_block_bytes(n, B);
    int ok = 1;
    if (f->scalar) {
        for (int64_t b = 0; b < nb; ++b) {
            const float * h = imatrix ? imatrix + ((b0 + b) % bpr) * B : NULL;
            ok &= atd_fit_block_scalar(x + b*B, h, n, B, clamp, y + b*bsz);
        }
        return ok;
    }
#if ATD_LANES
    atd_group * g = f->g;
    for (int64_t b = 0; b < nb; b += ATD_VL) {
        uint8_t * outs[ATD_VL];
        int use_h = 0;
        for (int l = 0; l < ATD_VL; ++l) {
            const int live = b + l < nb;
            const float * xs = x + (b + l)*B;
            const float * h  = imatrix && live ? imatrix + ((b0 + b + l) % bpr) * B : NULL;
            if (h && !atd_imp_nonzero(h, B)) h = NULL; // all-zero importance: unweighted
            use_h |= h != NULL;
            outs[l] = live ? y + (b + l)*bsz : NULL;
            for (int j = 0; j < B; ++j) {
                const double wv = live ? (double)xs[j] : 0.0; // padding lanes: zero blocks, skipped
                const double hv = h ? (double)h[j] : 1.0;
                g->w[j][l]  = wv;
                g->h[j][l]  = hv;
                g->hw[j][l] = hv * wv;
            }
        }
        ok &= f->fn(g, n, B, use_h, clamp, outs);
    }
#endif
    return ok;
}

// ---------------------------------------------------------------------------------------------
// generic entry points

void atd_quantize_row_ref(const float * x, void * y, int64_t k, int planes, int block, const float * imatrix) {
    if (!atd_type_ok(planes, block) || k % block != 0) return;
    atd_fitter f;
    atd_fitter_init(&f, 0);
    atd_fit_blocks(&f, x, (uint8_t *)y, 0, k / block, k / block, imatrix, planes, block, 1);
    atd_fitter_free(&f);
}

void atd_quantize_row_scalar(const float * x, void * y, int64_t k, int planes, int block, const float * imatrix) {
    if (!atd_type_ok(planes, block) || k % block != 0) return;
    atd_fitter f;
    atd_fitter_init(&f, 1);
    atd_fit_blocks(&f, x, (uint8_t *)y, 0, k / block, k / block, imatrix, planes, block, 1);
    atd_fitter_free(&f);
}

typedef struct {
    const float * x;
    uint8_t     * y;
    const float * imatrix;
    int64_t       nrows, bpr, rows_per_chunk, nchunks;
    int64_t       next;   // next chunk (atomic)
    int           failed; // a scale overflowed (atomic)
    int           n, B;
} atd_rows_job;

static void atd_rows_work(atd_rows_job * job) {
    atd_fitter f;
    atd_fitter_init(&f, 0);
    const size_t bsz = atd_block_bytes(job->n, job->B);
    for (;;) {
#if ATD_THREADS
        const int64_t c = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
#else
        const int64_t c = job->next++;
#endif
        if (c >= job->nchunks) break;
        const int64_t r0 = c * job->rows_per_chunk;
        const int64_t r1 = r0 + job->rows_per_chunk < job->nrows ? r0 + job->rows_per_chunk : job->nrows;
        const int64_t b0 = r0 * job->bpr;
        const int64_t nb = (r1 - r0) * job->bpr;
        if (!atd_fit_blocks(&f, job->x + b0 * job->B, job->y + b0 * bsz, b0, nb, job->bpr, job->imatrix,
                            job->n, job->B, 0)) {
#if ATD_THREADS
            __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
#else
            job->failed = 1;
#endif
        }
    }
    atd_fitter_free(&f);
}

#if ATD_THREADS
static void * atd_rows_thread(void * arg) {
    atd_rows_work((atd_rows_job *)arg);
    return NULL;
}
#endif

size_t atd_quantize_rows(const float * x, void * y, int64_t nrows, int64_t n_per_row, int planes, int block,
                         const float * imatrix, int n_threads) {
    if (!atd_type_ok(planes, block) || n_per_row <= 0 || n_per_row % block != 0 || nrows < 0) return 0;
    atd_rows_job job;
    job.x = x;
    job.y = (uint8_t *)y;
    job.imatrix = imatrix;
    job.nrows = nrows;
    job.bpr = n_per_row / block;
    // whole rows per chunk, about 64 blocks (16 lane groups) each: any split gives the same bytes
    job.rows_per_chunk = (64 + job.bpr - 1) / job.bpr;
    job.nchunks = (nrows + job.rows_per_chunk - 1) / job.rows_per_chunk;
    job.next = 0;
    job.failed = 0;
    job.n = planes;
    job.B = block;
#if ATD_THREADS
    if (n_threads <= 0) {
#ifdef _SC_NPROCESSORS_ONLN
        const long nc = sysconf(_SC_NPROCESSORS_ONLN);
#else
        const long nc = 1;
#endif
        n_threads = nc > 0 ? (int)nc : 1;
    }
    if (n_threads > 256) n_threads = 256;
    if ((int64_t)n_threads > job.nchunks) n_threads = job.nchunks > 0 ? (int)job.nchunks : 1;
    pthread_t tid[256];
    int started = 0;
    for (int i = 1; i < n_threads; ++i) {
        if (pthread_create(&tid[started], NULL, atd_rows_thread, &job) != 0) break; // fewer threads: same bytes
        ++started;
    }
    atd_rows_work(&job);
    for (int i = 0; i < started; ++i) pthread_join(tid[i], NULL);
#else
    (void)n_threads;
    atd_rows_work(&job);
#endif
    if (job.failed) return 0;
    return (size_t)nrows * (size_t)job.bpr * atd_block_bytes(planes, block);
}

// codes[e] (0..2) of the B elements of one plane (padding slots are not returned)
static inline void atd_unpack_plane(const uint8_t * qs, int B, uint8_t * codes) {
    const int S = ATD_PLANE_BYTES(B);
    for (int j = 0; j < S; ++j) {
        uint32_t x = qs[j];
        for (int k = 0, e = j; k < ATD_TRITS_PER_BYTE && e < B; ++k, e += S) {
            codes[e] = (uint8_t)((x * 3u) >> 8);
            x = (x * 3u) & 0xffu;
        }
    }
}

void atd_dequantize_row(const void * vx, float * y, int64_t k, int planes, int block) {
    if (!atd_type_ok(planes, block) || k % block != 0) return;
    const uint8_t * x   = (const uint8_t *)vx;
    const size_t    bsz = atd_block_bytes(planes, block);
    const int       S   = ATD_PLANE_BYTES(block);
    for (int64_t b = 0; b < k / block; ++b, x += bsz, y += block) {
        float   d[ATD_MAX_PLANES];
        uint8_t codes[ATD_MAX_PLANES][QK_ATD];
        for (int i = 0; i < planes; ++i) {
            d[i] = atd_fp16_to_fp32((uint16_t)(x[2*i] | x[2*i + 1] << 8));
            atd_unpack_plane(x + 2*planes + i*S, block, codes[i]);
        }
        for (int e = 0; e < block; ++e) {
            float v = 0.0f;
            for (int i = 0; i < planes; ++i) {
                v = v + d[i] * (float)((int)codes[i][e] - 1); // float32, planes in order 0..N-1
            }
            y[e] = v;
        }
    }
}

// ---- the r2 layout (atd.h) ----------------------------------------------------------------------

size_t atd_r2_row_size(int planes, int block, int64_t n) {
    if (!atd_type_ok(planes, block) || n <= 0 || n % block != 0) return 0;
    return (size_t)(n / block) * ATD_R2_TYPE_SIZE(planes, block);
}

// the scalar reference of atd_repack_r2 (atd-mm.c has the SIMD path: ggml-base has no SIMD flags)
size_t atd_repack_r2_ref(const void * src, void * dst, int64_t nrows, int64_t n, int planes, int block) {
    const size_t rsz = atd_r2_row_size(planes, block, n);
    if (rsz == 0 || nrows < 0) return 0;
    const int       S = ATD_PLANE_BYTES(block), S2 = ATD_R2_PLANE_BYTES(block);
    const uint8_t * x = (const uint8_t *)src;
    for (int64_t r = 0; r < nrows; ++r) {
        const atd_row_view v = atd_r2_row(dst, nrows, r, rsz, planes, block);
        for (int64_t b = 0; b < n / block; ++b, x += ATD_TYPE_SIZE(planes, block)) {
            uint8_t * y = (uint8_t *)v.blk + (size_t)b * v.step;
            memcpy(y, x, 2 * (size_t)planes);
            for (int i = 0; i < planes; ++i) {
                uint8_t codes[QK_ATD];
                atd_unpack_plane(x + 2 * planes + i * S, block, codes);
                uint8_t * out = y + v.poff + i * v.pstep;
                for (int j = 0; j < S2; ++j) {  // element S2 k + j in bits 2k, 2k+1
                    out[j] = (uint8_t)(codes[j] | codes[S2 + j] << 2 | codes[2 * S2 + j] << 4 | codes[3 * S2 + j] << 6);
                }
            }
        }
    }
    return (size_t)nrows * rsz;
}

// per block of 64 and scale group (atd.h): d = max|x| / 127, q = nearest int of x / d (atd_quantize_group)
void quantize_row_atd_q8_64r2(const float * x, void * vy, int64_t k) {
    block_atd_q8_64r2 * y = (block_atd_q8_64r2 *)vy;
    for (int64_t b = 0; b < k / QK_ATD_64; ++b) {
        for (int c = 0; c < ATD_Q8_64R2_GROUPS; ++c) {
            float  g[16];
            int8_t q[16];
            for (int e = 0; e < 16; ++e) g[e] = x[b * QK_ATD_64 + 16 * (e / 4) + 4 * c + e % 4];
            y[b].d[c] = atd_quantize_group(g, 16, q, &y[b].sum[c]);
            for (int e = 0; e < 16; ++e) y[b].qs[16 * (e / 4) + 4 * c + e % 4] = q[e];
        }
    }
}

// per byte value: bit 0 = canonical (what atd_encode_byte writes for the digits it decodes to),
// bit 1 = its last digit is 0 (required where that digit is a padding slot)
static void atd_byte_checks(uint8_t * tab) {
    for (int b = 0; b < 256; ++b) {
        int v = 0;
        for (int k = 0; k < ATD_TRITS_PER_BYTE; ++k) v = 3*v + atd_byte_digit((uint8_t)b, k);
        tab[b] = (uint8_t)((atd_encode_byte(v) == b) | (atd_byte_digit((uint8_t)b, ATD_TRITS_PER_BYTE - 1) == 0) << 1);
    }
}

int atd_validate_row(const void * vx, int64_t k, int planes, int block) {
    if (!atd_type_ok(planes, block) || k < 0 || k % block != 0) return 0;
    uint8_t tab[256];
    atd_byte_checks(tab);
    const uint8_t * x   = (const uint8_t *)vx;
    const size_t    bsz = atd_block_bytes(planes, block);
    const int       S   = ATD_PLANE_BYTES(block);
    const int       pad = block - S * (ATD_TRITS_PER_BYTE - 1); // bytes j >= pad hold a padding slot
    for (int64_t b = 0; b < k / block; ++b, x += bsz) {
        for (int i = 0; i < planes; ++i) {
            if (!atd_half_is_finite((uint16_t)(x[2*i] | x[2*i + 1] << 8))) return 0;
            const uint8_t * qs = x + 2*planes + i*S;
            for (int j = 0; j < S; ++j) {
                const uint8_t need = j < pad ? 1 : 3;
                if ((tab[qs[j]] & need) != need) return 0;
            }
        }
    }
    return 1;
}

// the 64 family's activations (ggml-base: the from_float_ref of its type traits)
// atd_q8_64: per scale group (atd.h: element 13k + j has group j / 4) d = max|x| / 127 and q = nearest
// int of x / d (|q| <= 127), stored by digit (qs[k][j] = element 13k + j), zero elsewhere; sum[g] = the
// sum of group g's q.
void quantize_row_atd_q8_64(const float * x, void * vy, int64_t k) {
    block_atd_q8_64 * y = (block_atd_q8_64 *)vy;
    for (int64_t b = 0; b < k / QK_ATD_64; ++b) {
        memset(&y[b], 0, sizeof(y[b]));
        for (int g = 0; g < ATD_Q8_64_GROUPS; ++g) {
            float  v[QK_ATD_64];
            int8_t q[QK_ATD_64];
            int    e[QK_ATD_64], n = 0;
            for (int i = 0; i < QK_ATD_64; ++i) {
                if (atd_q8_64_group(i) == g) {
                    e[n]   = i;
                    v[n++] = x[b * QK_ATD_64 + i];
                }
            }
            y[b].d[g] = atd_quantize_group(v, n, q, &y[b].sum[g]);
            for (int i = 0; i < n; ++i) {
                y[b].qs[atd_q8_64_digit(e[i])][atd_q8_64_lane(e[i])] = q[i];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ggml-style per-type entry points. ggml quantizers cannot fail: a scale that overflows fp16
// is stored clamped to +-65504 (the trits are then refitted to the clamped levels).

#define ATD_DEFINE(name, N, B)                                                                      \
    void quantize_row_##name##_ref(const float * x, block_##name * y, int64_t k) {                 \
        atd_quantize_row_ref(x, y, k, N, B, NULL);                                                  \
    }                                                                                               \
    size_t quantize_##name(const float * src, void * dst, int64_t nrows, int64_t n_per_row,        \
                           const float * imatrix) {                                                \
        if (n_per_row % (B) != 0) return 0;                                                         \
        atd_fitter f;                                                                               \
        atd_fitter_init(&f, 0);                                                                     \
        atd_fit_blocks(&f, src, (uint8_t *)dst, 0, nrows * (n_per_row / (B)), n_per_row / (B),      \
                       imatrix, N, B, 1);                                                           \
        atd_fitter_free(&f);                                                                        \
        return (size_t)nrows * (size_t)(n_per_row / (B)) * sizeof(block_##name);                    \
    }                                                                                               \
    void dequantize_row_##name(const block_##name * x, float * y, int64_t k) {                      \
        atd_dequantize_row(x, y, k, N, B);                                                          \
    }

ATD_DEFINE(atd1, 1, QK_ATD)
ATD_DEFINE(atd2, 2, QK_ATD)
ATD_DEFINE(atd3, 3, QK_ATD)
ATD_DEFINE(atd4, 4, QK_ATD)
ATD_DEFINE(atd1_64, 1, QK_ATD_64)
ATD_DEFINE(atd2_64, 2, QK_ATD_64)
ATD_DEFINE(atd3_64, 3, QK_ATD_64)
ATD_DEFINE(atd4_64, 4, QK_ATD_64)
#undef ATD_DEFINE
