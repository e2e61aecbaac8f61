// Test driver for ggml-ext/atd-dot.c: random ATD rows (packed here from docs/atd-format.md §2,
// independent of atd-quants.c) against q8 activations.
//   - every available kernel path == scalar path, bit for bit;
//   - scalar path == double-precision dot of the decoded weights and activations, within tolerance;
//   - the ggml-style wrappers == atd_vec_dot;
//   - atd_gemv (several rows, one activation row) == atd_vec_dot row by row, on every path and variant;
//     so does atd_gemv_r2 on the rows repacked by atd_repack_r2 (256 family); for the 64 family (its own
//     activations) every path of atd_gemv_r2 == its scalar path, which == the double-precision dot.
// Prints "N passed, M failed"; exit status 1 if anything failed.
//
//   gcc -std=c11 -O1 -g -fsanitize=address,undefined -Iggml-ext ggml-ext/*.c ggml-ext/tests/atd_dot_test.c -lm
#include "atd.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// internal test hook of atd-dot.c (not part of atd.h): force a variant inside a path, 0 = best.
// AVX2: 1 maddubs, 2 AVX-VNNI, 3 AVX512-VL vpdpbusd on ymm (stand-in for 2).
// Returns 1 if this build and CPU can run it.
int atd_dot_set_variant(int path, int variant);
#define MAX_VARIANTS 3

#define ATD_TEST_SEED 0x9E3779B97F4A7C15ull
#include "atd_test_util.h"
// random finite fp16: mostly "typical" scales, sometimes zero, negative, subnormal or large
static uint16_t rand_half(int mode) {
    if (mode == 1) return (uint16_t)(rng_u64() & 0x7bffu) | (uint16_t)(rng_u64() & 0x8000u);  // any finite-ish
    const uint32_t r = (uint32_t)(rng_u64() % 16);
    if (r == 0) return 0x0000;                       // +0
    if (r == 1) return (uint16_t)(0x8000u | (rng_u64() & 0x3ffu));  // negative subnormal
    if (r == 2) return 0x7bffu;                      // 65504
    uint16_t e = (uint16_t)(8 + rng_u64() % 10);     // 2^-7 .. 2^2
    uint16_t h = (uint16_t)((e << 10) | (rng_u64() & 0x3ffu));
    if (rng_u64() & 1) h |= 0x8000u;
    return h;
}

// ---- ATD packer (docs/atd-format.md §2) --------------------------------------------------------
// codes[i][e] in 0..2, element e of plane i; writes one block of N planes x B weights. Base-3 bytes
// from the spec's formula: digit k of byte j is element S*k + j, padding slots code 0, the byte is
// ceil(256 v / 243) of v = sum_k c_k 3^(4-k) (computed here, not with the library's helpers).
static void pack_block(uint8_t * dst, int N, int B, const uint16_t * d, const uint8_t codes[][256]) {
    for (int i = 0; i < N; ++i) {
        dst[2 * i]     = (uint8_t)(d[i] & 0xff);
        dst[2 * i + 1] = (uint8_t)(d[i] >> 8);
    }
    const int S = (B + 4) / 5;
    for (int i = 0; i < N; ++i) {
        for (int j = 0; j < S; ++j) {
            int v = 0;
            for (int k = 0; k < 5; ++k) v = 3 * v + (S * k + j < B ? codes[i][S * k + j] : 0);
            dst[2 * N + i * S + j] = (uint8_t)((v * 256 + 242) / 243);
        }
    }
}

// block_atd_q8_64, read by this test's own formulas: element e sits at qs[e / 13][e % 13] and has the
// scale group (e % 13) / 4
static int scale64(int e) {
    return (e % 13) / 4;
}

// ---- one row -----------------------------------------------------------------------------------
typedef struct {
    int       N, B, n;
    uint8_t * x;        // packed row
    void *    y;        // q8 blocks
    double *  w;        // decoded weights (double)
    double *  a;        // decoded activations (double)
} row_t;

// kind: 0 random, 1 extreme (codes all 2 / all 0 with q = +-127/-128), 2 sparse codes, 3 all-zero
static row_t make_row(int N, int B, int n, int kind) {
    row_t r = { N, B, n, NULL, NULL, NULL, NULL };
    const int    nb  = n / B;
    const size_t bsz = (size_t)ATD_TYPE_SIZE(N, B);
    r.x = malloc(bsz * nb);
    r.w = calloc(n, sizeof(double));
    r.a = calloc(n, sizeof(double));
    static uint8_t codes[ATD_MAX_PLANES][256];
    for (int b = 0; b < nb; ++b) {
        uint16_t d[ATD_MAX_PLANES];
        for (int i = 0; i < N; ++i) {
            d[i] = kind == 3 ? 0 : rand_half(kind == 1 ? 0 : (rng_u64() % 8 == 0));
            const int fill = (int)(rng_u64() % 3);
            for (int e = 0; e < B; ++e) {
                uint8_t c;
                if (kind == 1) c = (uint8_t)(b & 1 ? fill : 2 * (int)(rng_u64() & 1));
                else if (kind == 2) c = (rng_u64() % 10 == 0) ? (uint8_t)(rng_u64() % 3) : 1;
                else if (kind == 3) c = 1;
                else c = (uint8_t)(rng_u64() % 3);
                codes[i][e] = c;
            }
        }
        pack_block(r.x + b * bsz, N, B, d, codes);
        for (int e = 0; e < B; ++e) {
            double v = 0.0;
            for (int i = 0; i < N; ++i) v += h2d(d[i]) * ((int)codes[i][e] - 1);
            r.w[b * B + e] = v;
        }
    }
    // activations: float -> library q8 quantizer, or raw extreme int8 blocks built here
    float * f = malloc(sizeof(float) * n);
    const double scale = exp(rng_gauss() * 3.0);
    for (int e = 0; e < n; ++e) f[e] = (float)(rng_gauss() * scale);
    if (B == QK_ATD) {
        block_q8_K * y = malloc(sizeof(block_q8_K) * (n / QK_K));
        atd_quantize_row_q8_K_ref(f, y, n);
        if (kind == 1) {
            for (int b = 0; b < n / QK_K; ++b) {
                const int sgn = (int)(rng_u64() % 3);
                for (int e = 0; e < QK_K; ++e) {
                    y[b].qs[e] = (int8_t)(sgn == 0 ? 127 : sgn == 1 ? -128 : ((rng_u64() & 1) ? 127 : -128));
                }
                for (int g = 0; g < QK_K / 16; ++g) {
                    int sum = 0;
                    for (int e = 0; e < 16; ++e) sum += y[b].qs[g * 16 + e];
                    y[b].bsums[g] = (int16_t)sum;
                }
            }
        }
        for (int b = 0; b < n / QK_K; ++b)
            for (int e = 0; e < QK_K; ++e) r.a[b * QK_K + e] = (double)y[b].d * y[b].qs[e];
        r.y = y;
    } else {
        block_atd_q8_64 * y = malloc(sizeof(block_atd_q8_64) * (n / QK_ATD_64));
        quantize_row_atd_q8_64(f, y, n);
        if (kind == 1) {
            for (int b = 0; b < n / QK_ATD_64; ++b) {
                const int sgn = (int)(rng_u64() % 3);
                for (int g = 0; g < 4; ++g) y[b].sum[g] = 0;
                for (int e = 0; e < QK_ATD_64; ++e) {
                    const int8_t q = (int8_t)(sgn == 0 ? 127 : sgn == 1 ? -128 : ((rng_u64() & 1) ? 127 : -128));
                    y[b].qs[e / 13][e % 13] = q;
                    y[b].sum[scale64(e)] += q;
                }
                for (int g = 0; g < 4; ++g) y[b].d[g] = (float)h2d(rand_half(0));
            }
        }
        // the digit layout, read back by this test's own index formulas
        for (int b = 0; b < n / QK_ATD_64; ++b)
            for (int e = 0; e < QK_ATD_64; ++e)
                r.a[b * QK_ATD_64 + e] = (double)y[b].d[scale64(e)] * y[b].qs[e / 13][e % 13];
        r.y = y;
    }
    free(f);
    return r;
}

static void free_row(row_t * r) {
    free(r->x);
    free(r->y);
    free(r->w);
    free(r->a);
}

static const char * path_name(int p) {
    switch (p) {
        case ATD_PATH_SCALAR: return "scalar";
        case ATD_PATH_AVX2: return "avx2";
        case ATD_PATH_AVX512: return "avx512";
        case ATD_PATH_NEON: return "neon";
        default: return "auto";
    }
}

typedef void (*ggml_vec_dot_t)(int, float *, size_t, const void *, size_t, const void *, size_t, int);
static ggml_vec_dot_t wrapper(int N, int B) {
    static const ggml_vec_dot_t w256[4] = { ggml_vec_dot_atd1_q8_K, ggml_vec_dot_atd2_q8_K, ggml_vec_dot_atd3_q8_K,
                                            ggml_vec_dot_atd4_q8_K };
    static const ggml_vec_dot_t w64[4]  = { ggml_vec_dot_atd1_64_atd_q8_64, ggml_vec_dot_atd2_64_atd_q8_64,
                                            ggml_vec_dot_atd3_64_atd_q8_64, ggml_vec_dot_atd4_64_atd_q8_64 };
    return B == QK_ATD ? w256[N - 1] : w64[N - 1];
}

static void test_row(int N, int B, int n, int kind) {
    row_t r = make_row(N, B, n, kind);
    float ref;
    atd_vec_dot_path(n, &ref, r.x, r.y, N, B, ATD_PATH_SCALAR);

    // scalar vs double dequantize . dot; the kernel rounds each block's float sum once, so the
    // error is bounded by a few float ulps of sum |w||a|
    double dot = 0.0, mag = 0.0;
    for (int e = 0; e < n; ++e) {
        dot += r.w[e] * r.a[e];
        mag += fabs(r.w[e] * r.a[e]);
    }
    const double tol = 4e-7 * mag + 1e-30;
    CHECK(fabs((double)ref - dot) <= tol, "N=%d B=%d n=%d kind=%d: scalar %.9g vs double %.9g (tol %.3g)", N, B, n,
          kind, (double)ref, dot, tol);

    for (int p = ATD_PATH_AVX2; p <= ATD_PATH_NEON; ++p) {
        if (!atd_path_available(p)) continue;
        for (int v = 1; v <= MAX_VARIANTS; ++v) {
            if (!atd_dot_set_variant(p, v)) continue;
            float got = NAN;
            atd_vec_dot_path(n, &got, r.x, r.y, N, B, p);
            CHECK(memcmp(&got, &ref, sizeof got) == 0, "N=%d B=%d n=%d kind=%d path %s (variant %d): %.9g != scalar %.9g",
                  N, B, n, kind, path_name(p), v, (double)got, (double)ref);
        }
        atd_dot_set_variant(p, 0);
    }
    float viaw = NAN, auto_ = NAN;
    wrapper(N, B)(n, &viaw, 0, r.x, 0, r.y, 0, 1);
    atd_vec_dot(n, &auto_, r.x, r.y, N, B);
    CHECK(memcmp(&viaw, &ref, sizeof ref) == 0 && memcmp(&auto_, &ref, sizeof ref) == 0,
          "N=%d B=%d n=%d: wrapper %.9g / auto %.9g != scalar %.9g", N, B, n, (double)viaw, (double)auto_, (double)ref);
    free_row(&r);
}

// atd_gemv over nr rows == atd_vec_dot of each row, every path and variant (the gemv follows the
// selected path)
static void test_gemv(int N, int B, int n, int nr) {
    row_t          rows[16];
    const size_t   bx = (size_t)ATD_TYPE_SIZE(N, B) * (n / B);
    uint8_t *      x  = malloc(bx * nr);
    for (int r = 0; r < nr; ++r) {
        rows[r] = make_row(N, B, n, r % 4 == 3 ? 2 : 0);
        memcpy(x + r * bx, rows[r].x, bx);
    }
    uint8_t * r2 = malloc(atd_r2_row_size(N, B, n) * nr);
    CHECK(atd_repack_r2(x, r2, nr, n, N, B) == atd_r2_row_size(N, B, n) * nr, "repack_r2 N=%d B=%d n=%d nr=%d", N, B, n, nr);
    // the 64 family's r2 activations, and its r2 gemv on the scalar path against the double-precision dot
    block_atd_q8_64r2 * y64 = NULL;
    float               ref64[16];
    if (B == QK_ATD_64) {
        float * f = malloc(sizeof(float) * n);
        for (int e = 0; e < n; ++e) f[e] = (float)rng_gauss();
        y64 = malloc(sizeof(block_atd_q8_64r2) * (n / QK_ATD_64));
        quantize_row_atd_q8_64r2(f, y64, n);
        free(f);
        atd_gemv_r2_path(n, N, B, r2, nr, y64, ref64, ATD_PATH_SCALAR);
        int close = 1;
        for (int r = 0; r < nr; ++r) {
            double exact = 0.0, mag = 0.0;
            for (int e = 0; e < n; ++e) {
                const int    j = e % QK_ATD_64;  // scale group (j % 16) / 4 by this test's own formula
                const double a = (double)y64[e / QK_ATD_64].d[(j % 16) / 4] * y64[e / QK_ATD_64].qs[j];
                exact += rows[r].w[e] * a;
                mag += fabs(rows[r].w[e] * a);
            }
            close &= fabs((double)ref64[r] - exact) <= 1e-5 * mag + 1e-30;
        }
        CHECK(close, "gemv_r2 scalar N=%d n=%d nr=%d != the double-precision dot", N, n, nr);
    }
    const void * y = rows[0].y;  // one activation row for all
    for (int p = ATD_PATH_SCALAR; p <= ATD_PATH_NEON; ++p) {
        if (!atd_path_available(p)) continue;
        atd_set_path(p);
        for (int v = 1; v <= MAX_VARIANTS; ++v) {
            if (!atd_dot_set_variant(p, v)) continue;
            float out[16], ref;
            atd_gemv(n, N, B, x, bx, nr, y, out);
            int same = 1;
            for (int r = 0; r < nr; ++r) {
                atd_vec_dot_path(n, &ref, x + r * bx, y, N, B, ATD_PATH_SCALAR);
                same &= memcmp(&ref, &out[r], sizeof ref) == 0;
            }
            CHECK(same, "gemv N=%d B=%d n=%d nr=%d path %s.%d != vec_dot row by row", N, B, n, nr, path_name(p), v);
            if (B == QK_ATD_64) {
                atd_gemv_r2_path(n, N, B, r2, nr, y64, out, p);
                CHECK(memcmp(out, ref64, sizeof(float) * nr) == 0, "gemv_r2 N=%d B=64 n=%d nr=%d path %s.%d != scalar",
                      N, n, nr, path_name(p), v);
            } else {
                // the r2 layout (exact-size buffer: ASan sees any read past it)
                atd_gemv_r2_path(n, N, B, r2, nr, y, out, p);
                same = 1;
                for (int r = 0; r < nr; ++r) {
                    atd_vec_dot_path(n, &ref, x + r * bx, y, N, B, ATD_PATH_SCALAR);
                    same &= memcmp(&ref, &out[r], sizeof ref) == 0;
                }
                CHECK(same, "gemv_r2 N=%d n=%d nr=%d path %s.%d != vec_dot row by row", N, n, nr, path_name(p), v);
            }
        }
        atd_dot_set_variant(p, 0);
    }
    atd_set_path(ATD_PATH_AUTO);
    for (int r = 0; r < nr; ++r) free_row(&rows[r]);
    free(x);
    free(r2);
    free(y64);
}

static void test_quantizers(void) {
    // q8_K: bsums are the sums of 16 and d*q reproduces x within d/2
    enum { K = 512 };
    float x[K];
    for (int e = 0; e < K; ++e) x[e] = (float)rng_gauss();
    x[7] = -5.0f;  // the signed max
    block_q8_K yk[K / QK_K];
    atd_quantize_row_q8_K_ref(x, yk, K);
    int ok = 1;
    for (int b = 0; b < K / QK_K; ++b) {
        for (int g = 0; g < 16; ++g) {
            int sum = 0;
            for (int e = 0; e < 16; ++e) sum += yk[b].qs[g * 16 + e];
            ok &= sum == yk[b].bsums[g];
        }
        for (int e = 0; e < QK_K; ++e) ok &= fabs(yk[b].d * yk[b].qs[e] - x[b * QK_K + e]) <= fabs(yk[b].d) * 0.5001;
    }
    CHECK(ok && yk[0].qs[7] == -127, "q8_K reference quantizer");
    block_atd_q8_64 y6[K / QK_ATD_64];
    quantize_row_atd_q8_64(x, y6, K);
    ok = 1;
    for (int b = 0; b < K / QK_ATD_64; ++b) {
        int     sum[4] = { 0 }, used[5][16] = { { 0 } };
        float   amax[4] = { 0.0f };
        for (int e = 0; e < QK_ATD_64; ++e) {
            const double d = y6[b].d[scale64(e)];
            const int    q = y6[b].qs[e / 13][e % 13];
            used[e / 13][e % 13] = 1;
            ok &= fabs(d * q - x[b * QK_ATD_64 + e]) <= d * 0.5001 + 1e-6;
            sum[scale64(e)] += q;
            amax[scale64(e)] = fmaxf(amax[scale64(e)], fabsf(x[b * QK_ATD_64 + e]));
        }
        for (int k = 0; k < 5; ++k)
            for (int j = 0; j < 16; ++j) ok &= used[k][j] || y6[b].qs[k][j] == 0;  // lanes no element meets
        for (int g = 0; g < 4; ++g) ok &= sum[g] == y6[b].sum[g] && y6[b].d[g] == amax[g] / 127.0f;
    }
    CHECK(ok, "atd_q8_64 quantizer (four scale groups, digit layout, zero lanes, sums)");
    float z[QK_K] = { 0 };
    atd_quantize_row_q8_K_ref(z, yk, QK_K);
    CHECK(yk[0].d == 0.0f && yk[0].qs[0] == 0 && yk[0].bsums[0] == 0, "q8_K of zeros");
}

static void test_dispatch(void) {
    CHECK(atd_path_available(ATD_PATH_SCALAR) == 1, "scalar path must always be available");
    const int best = atd_selected_path();
    CHECK(best != ATD_PATH_AUTO && atd_path_available(best), "selected path %d must be available", best);
    for (int p = ATD_PATH_SCALAR; p <= ATD_PATH_NEON; ++p) {
        atd_set_path(p);
        if (atd_path_available(p)) CHECK(atd_selected_path() == p, "atd_set_path(%s)", path_name(p));
        else CHECK(atd_selected_path() == best, "atd_set_path(unavailable %s) keeps the best", path_name(p));
    }
    atd_set_path(ATD_PATH_AUTO);
    CHECK(atd_selected_path() == best, "ATD_PATH_AUTO restores the best path");
    printf("paths:");
    for (int p = ATD_PATH_SCALAR; p <= ATD_PATH_NEON; ++p)
        if (atd_path_available(p)) printf(" %s", path_name(p));
    printf(" (selected %s); variants:", path_name(best));
    for (int p = ATD_PATH_SCALAR; p <= ATD_PATH_NEON; ++p) {
        for (int v = 1; v <= MAX_VARIANTS; ++v)
            if (atd_dot_set_variant(p, v)) printf(" %s.%d", path_name(p), v);
        atd_dot_set_variant(p, 0);
    }
    printf("\n");
}

int main(int argc, char ** argv) {
    const int reps = argc > 1 ? atoi(argv[1]) : 3;
    test_dispatch();
    test_quantizers();
    for (int rep = 0; rep < reps; ++rep) {
        for (int N = 1; N <= ATD_MAX_PLANES; ++N) {
            // block counts 1..9 exercise every group/tail split; 16 and 21 longer rows
            static const int nbs[] = { 1, 2, 3, 4, 5, 7, 8, 9, 16, 21 };
            for (size_t t = 0; t < sizeof nbs / sizeof nbs[0]; ++t) {
                for (int kind = 0; kind < 4; ++kind) {
                    test_row(N, QK_ATD, nbs[t] * QK_ATD, kind);
                    test_row(N, QK_ATD_64, nbs[t] * QK_ATD_64, kind);
                }
            }
            test_row(N, QK_ATD, 4096, 0);
            test_row(N, QK_ATD_64, 576, 0);
            test_row(N, QK_ATD_64, 64 * 67, 0);
            // row counts around the 4-row steps, short and long rows
            static const int gemv_rows[] = { 1, 3, 4, 7, 9, 16 };
            for (size_t t = 0; t < sizeof gemv_rows / sizeof gemv_rows[0]; ++t) {
                test_gemv(N, QK_ATD_64, 64 * (int)(1 + 4 * t), gemv_rows[t]);
                test_gemv(N, QK_ATD, 256 * (int)(1 + t), gemv_rows[t]);
            }
            test_gemv(N, QK_ATD_64, 576, 13);
        }
    }
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
