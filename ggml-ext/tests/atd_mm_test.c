// Test driver for ggml-ext/atd-mm.c, the batched ATD matmul: random ATD rows (packed here from
// docs/atd-format.md §2, independent of atd-quants.c) times several activation rows.
//   - every available path (and variant) == the scalar path, bit for bit, over the whole output;
//   - the scalar path == this file's own transcription of the documented formula (levels of §3,
//     int8 steps A/127, the fused float combination), bit for bit;
//   - each path's decoder == that transcription, byte for byte;
//   - the result is within the stated bound of the exact double dot of the decoded weights and
//     activations: sum_b (A_b / 254) sum_e |x_e| + float rounding, and of the one-row vec_dot (plus,
//     for the 64 family, the difference of the two activation quantizations: per 32 / per scale group);
//   - nothing outside the output (strided columns, canaries) is written; the scratch is enough (ASan).
// Prints "N passed, M failed"; exit status 1 if anything failed.
//
//   gcc -std=c11 -O1 -g -fsanitize=address,undefined -Iggml-ext ggml-ext/*.c ggml-ext/tests/atd_mm_test.c -lm
#include "atd.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int  atd_dot_set_variant(int path, int variant);  // internal test hooks (atd-dot.c, atd-mm.c)
void atd_mm_decode_row(const void * row, int planes, int block, int nb, int b0, int nblk, uint8_t * u, float * s,
                       int path);
#define MAX_VARIANTS 3

#define ATD_TEST_SEED 0x2545F4914F6CDD1Dull
#include "atd_test_util.h"
static uint16_t rand_half(void) {
    const uint32_t r = (uint32_t)(rng_u64() % 16);
    if (r == 0) return 0x0000;                                      // +0
    if (r == 1) return (uint16_t)(0x8000u | (rng_u64() & 0x3ffu));  // negative subnormal
    if (r == 2) return 0x7bffu;                                     // 65504
    uint16_t h = (uint16_t)((uint16_t)(8 + rng_u64() % 10) << 10 | (rng_u64() & 0x3ffu));  // 2^-7 .. 2^2
    if (rng_u64() & 1) h |= 0x8000u;
    return h;
}

// ---- ATD packer (docs/atd-format.md §2) ------------------------------------------------------------
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

// kind: 0 random, 1 extreme scales, 2 sparse codes, 3 some all-zero blocks
static uint8_t * make_rows(int N, int B, int n, int nr, int kind, uint16_t * alpha, uint8_t * codes_out) {
    const int    nb  = n / B;
    const size_t bsz = (size_t)ATD_TYPE_SIZE(N, B);
    uint8_t *    x   = malloc(bsz * nb * nr + 1);
    static uint8_t codes[ATD_MAX_PLANES][256];
    for (int r = 0; r < nr; ++r) {
        for (int b = 0; b < nb; ++b) {
            const int zero = kind == 3 && rng_u64() % 3 == 0;
            uint16_t  d[ATD_MAX_PLANES];
            for (int i = 0; i < N; ++i) {
                d[i] = zero ? 0 : kind == 1 ? (uint16_t)((rng_u64() & 1 ? 0x8000u : 0) | 0x7800u | (rng_u64() & 0x3ffu))
                                            : rand_half();
                for (int e = 0; e < B; ++e) {
                    codes[i][e] = zero ? 1 : kind == 2 ? ((rng_u64() % 10 == 0) ? (uint8_t)(rng_u64() % 3) : 1)
                                                       : (uint8_t)(rng_u64() % 3);
                }
                alpha[((size_t)r * nb + b) * ATD_MAX_PLANES + i] = d[i];
                memcpy(codes_out + (((size_t)r * nb + b) * ATD_MAX_PLANES + i) * B, codes[i], B);
            }
            pack_block(x + ((size_t)r * nb + b) * bsz, N, B, d, codes);
        }
    }
    return x;
}

// ---- the formula, transcribed ---------------------------------------------------------------------
// levels L = fma chain over the planes (exact products), A = sum |alpha|, u = rint(L * 127 / A)
static void own_decode(const uint16_t * alpha, const uint8_t * codes, int N, int B, int8_t * w, float * s) {
    float a[ATD_MAX_PLANES], A = 0.0f;
    for (int i = 0; i < N; ++i) {
        a[i] = (float)h2d(alpha[i]);
        A    = A + fabsf(a[i]);
    }
    if (!(A > 0.0f)) {
        *s = 0.0f;
        memset(w, 0, B);
        return;
    }
    const float inv = 127.0f / A;
    *s = A / 127.0f;
    for (int e = 0; e < B; ++e) {
        float L = 0.0f;
        for (int i = 0; i < N; ++i) L = fmaf(a[i], (float)((int)codes[i * B + e] - 1), L);
        int v = (int)rintf(L * inv);
        w[e] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
    }
}

typedef struct {
    int      N, B, n, nr, nc;
    uint8_t *x;                 // packed rows
    uint16_t *alpha;            // [nr][nb][4]
    uint8_t *codes;             // [nr][nb][4][B]
    float *  xf;                // float activations [nc][n]
    void *   yk;                // q8_K or atd_q8_64mm rows
    void *   yv;                // the vec_dot activations (q8_K or atd_q8_64)
    size_t   by, byv;
    double * act;               // dequantized activations [nc][n]
    double * act_vd;            // the same of the vec_dot activations
} case_t;

static void make_case(case_t * t, int N, int B, int n, int nr, int nc, int kind) {
    memset(t, 0, sizeof *t);
    t->N = N; t->B = B; t->n = n; t->nr = nr; t->nc = nc;
    const int nb = n / B;
    t->alpha = calloc((size_t)nr * nb * ATD_MAX_PLANES, sizeof(uint16_t));
    t->codes = calloc((size_t)nr * nb * ATD_MAX_PLANES * B, 1);
    t->x     = make_rows(N, B, n, nr, kind, t->alpha, t->codes);
    t->xf    = malloc(sizeof(float) * n * nc);
    t->act   = malloc(sizeof(double) * n * nc);
    t->act_vd = malloc(sizeof(double) * n * nc);
    for (int c = 0; c < nc; ++c) {
        const double scale = exp(rng_gauss() * 2.0);
        for (int e = 0; e < n; ++e) t->xf[(size_t)c * n + e] = (float)(rng_gauss() * scale);
        if (kind == 1) t->xf[(size_t)c * n + (int)(rng_u64() % n)] = 1e4f;  // an outlier
    }
    if (B == QK_ATD) {
        t->by = t->byv = sizeof(block_q8_K) * (n / QK_K);
        t->yk = malloc(t->by * nc);
        for (int c = 0; c < nc; ++c) atd_quantize_row_q8_K_ref(t->xf + (size_t)c * n, (block_q8_K *)((char *)t->yk + c * t->by), n);
        t->yv = t->yk;
        for (int c = 0; c < nc; ++c) {
            const block_q8_K * y = (const block_q8_K *)((char *)t->yk + c * t->by);
            for (int e = 0; e < n; ++e)
                t->act[(size_t)c * n + e] = t->act_vd[(size_t)c * n + e] = (double)y[e / 256].d * y[e / 256].qs[e % 256];
        }
    } else {
        t->by  = sizeof(block_atd_q8_64mm) * (n / 64);
        t->byv = sizeof(block_atd_q8_64) * (n / 64);
        t->yk  = malloc(t->by * nc);
        t->yv  = malloc(t->byv * nc);
        for (int c = 0; c < nc; ++c) {
            quantize_row_atd_q8_64mm(t->xf + (size_t)c * n, (char *)t->yk + c * t->by, n);
            quantize_row_atd_q8_64(t->xf + (size_t)c * n, (char *)t->yv + c * t->byv, n);
        }
        int ok = 1;
        for (int c = 0; c < nc; ++c) {
            const block_atd_q8_64mm * y  = (const block_atd_q8_64mm *)((char *)t->yk + c * t->by);
            const block_atd_q8_64 *   yv = (const block_atd_q8_64 *)((char *)t->yv + c * t->byv);
            const float *             xc = t->xf + (size_t)c * n;
            for (int b = 0; b < n / 64; ++b) {
                for (int h = 0; h < 2; ++h) {  // per 32, natural order: d = max |x| / 127, bias = -128 sum q
                    float amax = 0.0f;
                    int   sum  = 0;
                    for (int e = 32 * h; e < 32 * h + 32; ++e) amax = fmaxf(amax, fabsf(xc[64 * b + e]));
                    for (int e = 32 * h; e < 32 * h + 32; ++e) {
                        ok &= fabs((double)y[b].d[h] * y[b].qs[e] - xc[64 * b + e]) <= y[b].d[h] * 0.5001 + 1e-30;
                        sum += y[b].qs[e];
                    }
                    ok &= y[b].d[h] == amax / 127.0f && y[b].bias[h] == -128 * sum;
                }
                for (int e = 0; e < 64; ++e) {
                    t->act[(size_t)c * n + 64 * b + e]    = (double)y[b].d[e / 32] * y[b].qs[e];
                    t->act_vd[(size_t)c * n + 64 * b + e] = (double)yv[b].d[(e % 13) / 4] * yv[b].qs[e / 13][e % 13];
                }
            }
        }
        CHECK(ok, "atd_q8_64mm: a scale per 32 in natural order, bias = -128 sum q");
    }
}

static void free_case(case_t * t) {
    free(t->x); free(t->alpha); free(t->codes); free(t->xf); free(t->act); free(t->act_vd);
    if (t->yv != t->yk) free(t->yv);
    free(t->yk);
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

// dst: nc columns of ldd floats, rows [0, nr) written, the rest canaries
static float * run(const case_t * t, int path, size_t ldd, void * scratch) {
    float * dst = malloc(sizeof(float) * ldd * t->nc);
    for (size_t i = 0; i < ldd * t->nc; ++i) dst[i] = -7.25f;
    const size_t bx = (size_t)ATD_TYPE_SIZE(t->N, t->B) * (t->n / t->B);
    atd_mul_mat_path(t->n, t->N, t->B, t->x, bx, t->nr, t->yk, t->by, t->nc, dst, ldd, scratch, path);
    return dst;
}

static void test_case(int N, int B, int n, int nr, int nc, int kind, void * scratch) {
    case_t t;
    make_case(&t, N, B, n, nr, nc, kind);
    const int    nb  = n / B;
    const size_t ldd = (size_t)nr + 3;  // strided columns

    // the formula, transcribed: decoded weights and the fused combination
    int8_t * w = malloc((size_t)nr * n);
    float *  s = malloc(sizeof(float) * nr * nb);
    for (int r = 0; r < nr; ++r)
        for (int b = 0; b < nb; ++b)
            own_decode(t.alpha + ((size_t)r * nb + b) * ATD_MAX_PLANES, t.codes + ((size_t)r * nb + b) * ATD_MAX_PLANES * B,
                       N, B, w + (size_t)r * n + b * B, &s[r * nb + b]);
    float * own = malloc(sizeof(float) * nr * nc);
    for (int c = 0; c < nc; ++c) {
        for (int r = 0; r < nr; ++r) {
            float out = 0.0f;
            for (int b = 0; b < nb; ++b) {
                float t0 = 0.0f;
                if (B == QK_ATD) {
                    const block_q8_K * y = (const block_q8_K *)((char *)t.yk + c * t.by) + b;
                    int32_t isum = 0;
                    for (int e = 0; e < 256; ++e) isum += w[(size_t)r * n + b * B + e] * y->qs[e];
                    t0 = fmaf(y->d, (float)isum, 0.0f);
                } else {
                    const block_atd_q8_64mm * y = (const block_atd_q8_64mm *)((char *)t.yk + c * t.by) + b;
                    for (int h = 0; h < 2; ++h) {
                        int32_t isum = 0;
                        for (int e = 32 * h; e < 32 * h + 32; ++e) isum += w[(size_t)r * n + b * B + e] * y->qs[e];
                        t0 = fmaf(y->d[h], (float)isum, t0);
                    }
                }
                out = fmaf(t0, s[r * nb + b], out);
            }
            own[(size_t)c * nr + r] = out;
        }
    }

    float * ref = run(&t, ATD_PATH_SCALAR, ldd, scratch);
    int     eq = 1, canary = 1;
    for (int c = 0; c < nc; ++c) {
        for (size_t r = 0; r < ldd; ++r) {
            const float v = ref[c * ldd + r];
            if (r < (size_t)nr) eq &= memcmp(&v, &own[(size_t)c * nr + r], sizeof v) == 0;
            else canary &= v == -7.25f;
        }
    }
    CHECK(eq, "N=%d B=%d n=%d nr=%d nc=%d kind=%d: scalar path != the transcribed formula", N, B, n, nr, nc, kind);
    CHECK(canary, "N=%d B=%d n=%d nr=%d nc=%d: scalar path wrote outside the output", N, B, n, nr, nc);

    // bound against the one-row vec_dot and against the exact dot of decoded weights and activations
    int within = 1;
    double worst = 0.0;
    for (int c = 0; c < nc; ++c) {
        for (int r = 0; r < nr; ++r) {
            const size_t bx = (size_t)ATD_TYPE_SIZE(N, B) * nb;
            float        vd;
            atd_vec_dot_path(n, &vd, t.x + r * bx, (const char *)t.yv + c * t.byv, N, B, ATD_PATH_SCALAR);
            double exact = 0.0, mag = 0.0, bound = 0.0, act_diff = 0.0;
            for (int b = 0; b < nb; ++b) {
                double A = 0.0, xs = 0.0;
                for (int i = 0; i < N; ++i) A += fabs(h2d(t.alpha[((size_t)r * nb + b) * ATD_MAX_PLANES + i]));
                for (int e = 0; e < B; ++e) {
                    double wv = 0.0;
                    for (int i = 0; i < N; ++i)
                        wv += h2d(t.alpha[((size_t)r * nb + b) * ATD_MAX_PLANES + i]) *
                              ((int)t.codes[(((size_t)r * nb + b) * ATD_MAX_PLANES + i) * B + e] - 1);
                    const double xv = t.act[(size_t)c * n + b * B + e];
                    exact += wv * xv;
                    act_diff += fabs(wv) * fabs(xv - t.act_vd[(size_t)c * n + b * B + e]);
                    mag += fabs(wv * xv) + A * fabs(xv);
                    xs += fabs(xv);
                }
                bound += A / 254.0 * xs;
            }
            const double tol = bound * (1.0 + 1e-5) + 2e-6 * mag + 1e-30;
            const double got = ref[c * ldd + r];
            within &= fabs(got - exact) <= tol && fabs(got - (double)vd) <= tol + act_diff * (1.0 + 1e-5) + 2e-6 * mag;
            if (bound > 0) worst = fmax(worst, fabs(got - exact) / bound);
        }
    }
    CHECK(within, "N=%d B=%d n=%d nr=%d nc=%d kind=%d: outside the stated bound (worst %.3f of it)", N, B, n, nr, nc,
          kind, worst);

    // every path and variant == scalar
    for (int p = ATD_PATH_AVX2; p <= ATD_PATH_NEON; ++p) {
        if (!atd_path_available(p)) continue;
        for (int v = 1; v <= MAX_VARIANTS; ++v) {
            if (!atd_dot_set_variant(p, v)) continue;
            float * got = run(&t, p, ldd, scratch);
            const int same = memcmp(got, ref, sizeof(float) * ldd * nc) == 0;
            CHECK(same, "N=%d B=%d n=%d nr=%d nc=%d kind=%d: path %s.%d != scalar", N, B, n, nr, nc, kind, path_name(p), v);
            free(got);
            // the path's decoder == the transcription
            uint8_t u[1024];
            float   su[64];
            int     dec = 1;
            for (int r = 0; r < nr && r < 3; ++r) {
                for (int b0 = 0; b0 < nb; b0 += 1024 / B) {
                    const int m = nb - b0 < 1024 / B ? nb - b0 : 1024 / B;
                    atd_mm_decode_row(t.x + (size_t)r * ATD_TYPE_SIZE(N, B) * nb, N, B, nb, b0, m, u, su, p);
                    for (int b = 0; b < m; ++b) {
                        dec &= memcmp(&su[b], &s[r * nb + b0 + b], sizeof(float)) == 0;
                        for (int e = 0; e < B; ++e) dec &= u[b * B + e] == (uint8_t)(w[(size_t)r * n + (b0 + b) * B + e] + 128);
                    }
                }
            }
            CHECK(dec, "N=%d B=%d n=%d: decoder of path %s.%d != the transcription", N, B, n, path_name(p), v);
        }
        atd_dot_set_variant(p, 0);
    }
    float * autop = run(&t, ATD_PATH_AUTO, ldd, scratch);
    CHECK(memcmp(autop, ref, sizeof(float) * ldd * nc) == 0, "N=%d B=%d: auto path != scalar", N, B);
    free(autop);

    // the r2 layout (an exact-size buffer): every path == the file layout's scalar result
    {
        const size_t rsz = atd_r2_row_size(N, B, n);
        uint8_t *    r2  = malloc(rsz * nr);
        uint8_t *    r2r = malloc(rsz * nr);  // the scalar reference's bytes; every path writes the same
        CHECK(atd_repack_r2_ref(t.x, r2r, nr, n, N, B) == rsz * nr, "N=%d B=%d n=%d nr=%d: repack_r2_ref", N, B, n, nr);
        for (int p = ATD_PATH_SCALAR; p <= ATD_PATH_NEON; ++p) {
            if (!atd_path_available(p)) continue;
            memset(r2, 0xA5, rsz * nr);
            CHECK(atd_repack_r2_path(t.x, r2, nr, n, N, B, p) == rsz * nr && memcmp(r2, r2r, rsz * nr) == 0,
                  "N=%d B=%d n=%d nr=%d: repack_r2 path %s != the reference", N, B, n, nr, path_name(p));
        }
        free(r2r);
        CHECK(atd_repack_r2(t.x, r2, nr, n, N, B) == rsz * nr, "N=%d B=%d n=%d nr=%d: repack_r2", N, B, n, nr);
        for (int p = ATD_PATH_SCALAR; p <= ATD_PATH_NEON; ++p) {
            if (!atd_path_available(p)) continue;
            for (int v = 1; v <= MAX_VARIANTS; ++v) {
                if (!atd_dot_set_variant(p, v)) continue;
                float * got = malloc(sizeof(float) * ldd * nc);
                for (size_t i = 0; i < ldd * nc; ++i) got[i] = -7.25f;
                atd_mul_mat_r2_path(n, N, B, r2, nr, t.yk, t.by, nc, got, ldd, scratch, p);
                CHECK(memcmp(got, ref, sizeof(float) * ldd * nc) == 0, "N=%d B=%d n=%d nr=%d nc=%d: r2 path %s.%d != scalar",
                      N, B, n, nr, nc, path_name(p), v);
                free(got);
            }
            atd_dot_set_variant(p, 0);
        }
        free(r2);
    }
    free(ref); free(own); free(w); free(s);
    free_case(&t);
}

int main(int argc, char ** argv) {
    const int reps = argc > 1 ? atoi(argv[1]) : 1;
    void *    scratch = malloc(atd_mul_mat_scratch_size());
    const uint64_t calls0 = atd_mul_mat_calls();
    for (int rep = 0; rep < reps; ++rep) {
        for (int N = 1; N <= ATD_MAX_PLANES; ++N) {
            // row counts around the tiles (8, 16, 32), odd activation counts, chunks of 1024 weights
            static const int shapes256[][3] = { { 1, 1, 2 }, { 3, 5, 3 }, { 4, 17, 7 }, { 5, 33, 5 }, { 9, 40, 9 }, { 1, 64, 4 } };
            static const int shapes64[][3]  = { { 1, 1, 2 }, { 9, 7, 3 }, { 16, 16, 5 }, { 17, 35, 7 }, { 33, 9, 2 }, { 2, 31, 9 } };
            for (size_t i = 0; i < sizeof shapes256 / sizeof shapes256[0]; ++i) {
                test_case(N, QK_ATD, shapes256[i][0] * QK_ATD, shapes256[i][1], shapes256[i][2], (int)(i % 4), scratch);
            }
            for (size_t i = 0; i < sizeof shapes64 / sizeof shapes64[0]; ++i) {
                test_case(N, QK_ATD_64, shapes64[i][0] * QK_ATD_64, shapes64[i][1], shapes64[i][2], (int)(i % 4), scratch);
            }
        }
    }
    CHECK(atd_mul_mat_calls() > calls0, "atd_mul_mat_calls counts the calls");
    free(scratch);
    printf("paths:");
    for (int p = ATD_PATH_SCALAR; p <= ATD_PATH_NEON; ++p)
        if (atd_path_available(p)) printf(" %s", path_name(p));
    printf("\n%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
