// Self-checks for ggml-ext/atd-quants.c, meant to run under ASan/UBSan:
//
//   gcc -std=c11 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -ffp-contract=off
//       -Iggml-ext ggml-ext/tests/atd_quants_test.c ggml-ext/*.c -lm -pthread -o atd_quants_test
//   ./atd_quants_test [--vectors FILE]
//
// Checks: fp16 conversions (against F16C where the CPU has it), the 8-lane fit against the scalar
// transcription on random and adversarial blocks, thread-count independence, the per-type ggml
// entry points, dequantize against the closed form, validate, the overflow rule. With --vectors,
// also compares against test vectors written by tests/test_ggml_ext.py (float input + the numpy
// reference bytes). Prints "N passed, 0 failed" and exits 0 when everything holds.
#include "atd.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_F16C_TEST 1
#endif

static int n_pass = 0, n_fail = 0;

#define CHECK(cond, ...) do {                                           \
        if (cond) { ++n_pass; }                                         \
        else { ++n_fail; fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
               fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); } \
    } while (0)

// ---- deterministic random numbers (xorshift64*, Box-Muller)

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng_u64(void) {
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dull;
}
static double rng_unif(void) { return ((rng_u64() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
static double rng_gauss(void) {
    return sqrt(-2.0 * log(rng_unif())) * cos(6.283185307179586 * rng_unif());
}

static size_t type_size(int n, int B) { return (size_t)n * (2 + (B + 4) / 5); }
// the spec's base-3 byte (docs/atd-format.md §2), written here independently of the library
static uint8_t spec_byte(int v) { return (uint8_t)((v * 256 + 242) / 243); }
// the canonical zero plane byte j of a plane with S bytes and B elements: all codes 1, padding 0
static uint8_t zero_plane_byte(int j, int S, int B) {
    int v = 0;
    for (int k = 0; k < 5; ++k) v = 3 * v + (S * k + j < B ? 1 : 0);
    return spec_byte(v);
}

static float f32_of_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t bits_of_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

// ---- fp16

#ifdef HAVE_F16C_TEST
__attribute__((target("f16c"))) static uint16_t hw_f32_to_f16(float f) { return (uint16_t)_cvtss_sh(f, 0); }
__attribute__((target("f16c"))) static float hw_f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
#endif

static void test_fp16(void) {
    static const struct { float f; uint16_t h; } known[] = {
        { 0.0f, 0x0000 }, { -0.0f, 0x8000 }, { 1.0f, 0x3c00 }, { -2.0f, 0xc000 }, { 65504.0f, 0x7bff },
        { 65519.996f, 0x7bff }, { 65520.0f, 0x7c00 }, { 1e10f, 0x7c00 }, { -1e10f, 0xfc00 },
        { 5.9604645e-8f, 0x0001 },   // smallest subnormal 2^-24
        { 2.9802322e-8f, 0x0000 },   // 2^-25: tie, rounds to even (zero)
        { 2.9802326e-8f, 0x0001 },   // just above 2^-25
        { 8.940697e-8f, 0x0002 },    // 1.5 * 2^-24: tie, rounds to even (2)
        { 6.097555e-5f, 0x03ff },    // largest subnormal
        { 6.1035156e-5f, 0x0400 },   // smallest normal
        { 1.00048828125f, 0x3c00 },  // 1 + 2^-11: tie, to even
        { 1.00146484375f, 0x3c02 },  // 1 + 3 * 2^-11: tie, to even (up)
        { 0.333333343f, 0x3555 },
    };
    for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); ++i) {
        const uint16_t h = atd_fp32_to_fp16(known[i].f);
        CHECK(h == known[i].h, "fp32_to_fp16(%a) = 0x%04x, want 0x%04x", known[i].f, h, known[i].h);
    }
    CHECK(atd_fp32_to_fp16(INFINITY) == 0x7c00 && atd_fp32_to_fp16(-INFINITY) == 0xfc00, "inf");
    CHECK((atd_fp32_to_fp16(NAN) & 0x7c00) == 0x7c00 && (atd_fp32_to_fp16(NAN) & 0x3ff) != 0, "nan");

    // every half: fp16 -> fp32 -> fp16 is the identity (NaNs stay NaNs)
    int bad = 0;
    for (uint32_t h = 0; h < 0x10000; ++h) {
        const float f = atd_fp16_to_fp32((uint16_t)h);
        const int is_nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        if (is_nan) { bad += !isnan(f); continue; }
        bad += atd_fp32_to_fp16(f) != h;
#ifdef HAVE_F16C_TEST
        if (__builtin_cpu_supports("f16c")) bad += bits_of_f32(hw_f16_to_f32((uint16_t)h)) != bits_of_f32(f);
#endif
    }
    CHECK(bad == 0, "fp16 roundtrip: %d mismatches", bad);

#ifdef HAVE_F16C_TEST
    if (__builtin_cpu_supports("f16c")) {
        // a strided sweep over all float bit patterns, and every pattern around the rounding
        // boundaries of a few exponents, against the hardware conversion
        bad = 0;
        for (uint64_t u = 0; u < 0x100000000ull; u += 4099) {
            const float f = f32_of_bits((uint32_t)u);
            if (isnan(f)) continue;
            bad += atd_fp32_to_fp16(f) != hw_f32_to_f16(f);
        }
        for (uint32_t e = 100; e <= 145; ++e) {
            for (uint32_t m = 0; m < (1u << 15); ++m) {
                const uint32_t mant = (m & 0x7fff) << 8 | (m & 0xff); // high and low mantissa bits
                for (uint32_t s = 0; s < 2; ++s) {
                    const float f = f32_of_bits(s << 31 | e << 23 | (mant & 0x7fffff));
                    bad += atd_fp32_to_fp16(f) != hw_f32_to_f16(f);
                }
            }
        }
        CHECK(bad == 0, "fp32_to_fp16 vs F16C: %d mismatches", bad);
    }
#endif
}

// ---- test blocks

enum { KIND_GAUSS, KIND_HEAVY, KIND_TIES, KIND_SPARSE, KIND_GRID3, KIND_TWO, KIND_ZERO, KIND_TINY, KIND_BIG,
       KIND_CONST, KIND_ONE_NONZERO, KIND_COUNT };

static void fill_block(float * x, int B, int kind) {
    for (int j = 0; j < B; ++j) {
        const double g = rng_gauss();
        double v;
        switch (kind) {
            case KIND_GAUSS:  v = g; break;
            case KIND_HEAVY:  v = g / (fabs(rng_gauss()) + 0.05); break;
            case KIND_TIES:   v = nearbyint(g * 2) / 2; break;
            case KIND_SPARSE: v = rng_unif() < 0.9 ? 0.0 : g; break;
            case KIND_GRID3:  v = 3.0 * (double)((int)(rng_u64() % 3) - 1); break;
            case KIND_TWO:    v = j < B / 2 ? 0.25 : -0.25; break;
            case KIND_ZERO:   v = (j & 1) ? -0.0 : 0.0; break;
            case KIND_TINY:   v = g * 1e-30; break;
            case KIND_BIG:    v = g * 1e4; break;
            case KIND_CONST:  v = 0.7; break;
            default:          v = j == B / 3 ? -1.5 : 0.0; break;
        }
        x[j] = (float)v;
    }
}

// importance: 0 = none, 1 = positive, 2 = with zeros, 3 = all zero in the first block
static float * make_importance(int cols, int B, int mode) {
    if (mode == 0) return NULL;
    float * h = malloc(sizeof(float) * cols);
    for (int j = 0; j < cols; ++j) {
        h[j] = (float)exp(2.0 * rng_gauss());
        if (mode >= 2 && rng_unif() < 0.2) h[j] = 0.0f;
        if (mode == 3 && j < B) h[j] = 0.0f;
    }
    return h;
}

static void test_fast_vs_scalar(void) {
    const int blocks[2] = { QK_ATD, QK_ATD_64 };
    for (int bi = 0; bi < 2; ++bi) {
        const int B = blocks[bi];
        for (int n = 1; n <= 4; ++n) {
            for (int mode = 0; mode < 4; ++mode) {
                // one row holding every kind (and a few more Gaussians, so lane groups are mixed)
                const int nb = KIND_COUNT + 6, cols = nb * B;
                float * x = malloc(sizeof(float) * cols);
                for (int b = 0; b < nb; ++b) fill_block(x + b*B, B, b < KIND_COUNT ? b : KIND_GAUSS);
                float * h = make_importance(cols, B, mode);
                const size_t bytes = nb * type_size(n, B);
                uint8_t * a = malloc(bytes), * s = malloc(bytes);
                memset(a, 0xAA, bytes); memset(s, 0x55, bytes);
                atd_quantize_row_ref(x, a, cols, n, B, h);
                atd_quantize_row_scalar(x, s, cols, n, B, h);
                CHECK(memcmp(a, s, bytes) == 0, "fast != scalar: N=%d B=%d importance mode %d", n, B, mode);
                CHECK(atd_validate_row(a, cols, n, B), "invalid output N=%d B=%d", n, B);
                // the zero / tiny blocks are canonical zeros
                for (int kind = KIND_ZERO; kind <= KIND_TINY; ++kind) {
                    const uint8_t * blk = a + kind * type_size(n, B);
                    int canon = 1;
                    for (int i = 0; i < 2*n; ++i) canon &= blk[i] == 0;
                    const int S = (B + 4) / 5;
                    for (size_t i = 2*n; i < type_size(n, B); ++i) canon &= blk[i] == zero_plane_byte((int)(i - 2*n) % S, S, B);
                    CHECK(canon, "kind %d not a canonical zero block (N=%d B=%d)", kind, n, B);
                }
                free(a); free(s); free(h); free(x);
            }
        }
    }
}

static double rel_rmse(const float * x, const float * y, int64_t k) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < k; ++i) { const double d = (double)x[i] - y[i]; num += d*d; den += (double)x[i]*x[i]; }
    return sqrt(num / den);
}

// the per-type entry points behind one signature (wrappers, not casts: calling through a cast
// function pointer type is undefined)
typedef size_t (*quantize_fn)(const float *, void *, int64_t, int64_t, const float *);
typedef void   (*row_fn)(const float *, void *, int64_t);
typedef void   (*dequant_fn)(const void *, float *, int64_t);
#define WRAP(name)                                                                                      \
    static void row_##name(const float * x, void * y, int64_t k) { quantize_row_##name##_ref(x, (block_##name *)y, k); } \
    static void deq_##name(const void * x, float * y, int64_t k) { dequantize_row_##name((const block_##name *)x, y, k); }
WRAP(atd1) WRAP(atd2) WRAP(atd3) WRAP(atd4) WRAP(atd1_64) WRAP(atd2_64) WRAP(atd3_64) WRAP(atd4_64)
#undef WRAP

static void test_rows_and_threads(void) {
    static const quantize_fn qf[2][4] = {
        { quantize_atd1, quantize_atd2, quantize_atd3, quantize_atd4 },
        { quantize_atd1_64, quantize_atd2_64, quantize_atd3_64, quantize_atd4_64 },
    };
    static const row_fn rf[2][4] = {
        { row_atd1, row_atd2, row_atd3, row_atd4 }, { row_atd1_64, row_atd2_64, row_atd3_64, row_atd4_64 },
    };
    static const dequant_fn df[2][4] = {
        { deq_atd1, deq_atd2, deq_atd3, deq_atd4 }, { deq_atd1_64, deq_atd2_64, deq_atd3_64, deq_atd4_64 },
    };
    static const double max_err[4] = { 0.45, 0.18, 0.07, 0.03 };
    const int blocks[2] = { QK_ATD, QK_ATD_64 };
    for (int bi = 0; bi < 2; ++bi) {
        const int B = blocks[bi];
        const int rows = 13, cols = B == QK_ATD ? 3 * B : 9 * B; // 576 wide for B = 64
        float * x = malloc(sizeof(float) * rows * cols);
        for (int i = 0; i < rows * cols; ++i) x[i] = (float)rng_gauss();
        for (int n = 1; n <= 4; ++n) {
            const size_t rb = cols / B * type_size(n, B), bytes = rows * rb;
            uint8_t * ref = malloc(bytes), * y = malloc(bytes);
            for (int mode = 0; mode < 3; ++mode) {
                float * h = make_importance(cols, B, mode);
                size_t got = atd_quantize_rows(x, ref, rows, cols, n, B, h, 1);
                CHECK(got == bytes, "atd_quantize_rows returned %zu, want %zu", got, bytes);
                const int threads[4] = { 2, 3, 0, 64 };
                for (int t = 0; t < 4; ++t) {
                    memset(y, 0, bytes);
                    got = atd_quantize_rows(x, y, rows, cols, n, B, h, threads[t]);
                    CHECK(got == bytes && memcmp(y, ref, bytes) == 0, "threads=%d differs (N=%d B=%d)", threads[t], n, B);
                }
                memset(y, 0, bytes);
                got = qf[bi][n - 1](x, y, rows, cols, h);
                CHECK(got == bytes && memcmp(y, ref, bytes) == 0, "quantize_atd%d%s differs", n, B == 64 ? "_64" : "");
                memset(y, 0, bytes);
                for (int r = 0; r < rows; ++r) atd_quantize_row_ref(x + (size_t)r*cols, y + r*rb, cols, n, B, h);
                CHECK(memcmp(y, ref, bytes) == 0, "row-by-row differs (N=%d B=%d)", n, B);
                free(h);
            }
            // quantize_row_*_ref = no importance
            memset(y, 0, bytes);
            atd_quantize_rows(x, ref, rows, cols, n, B, NULL, 2);
            rf[bi][n - 1](x, y, (int64_t)rows * cols);
            CHECK(memcmp(y, ref, bytes) == 0, "quantize_row_atd%d_ref differs", n);
            // roundtrip quality, and the per-type dequantize equals the generic one
            float * d1 = malloc(sizeof(float) * rows * cols), * d2 = malloc(sizeof(float) * rows * cols);
            atd_dequantize_row(ref, d1, (int64_t)rows * cols, n, B);
            df[bi][n - 1](ref, d2, (int64_t)rows * cols);
            CHECK(memcmp(d1, d2, sizeof(float) * rows * cols) == 0, "dequantize_row_atd%d differs", n);
            const double e = rel_rmse(x, d1, (int64_t)rows * cols);
            CHECK(e < max_err[n - 1], "N=%d B=%d rel. RMSE %.4f >= %.3f", n, B, e, max_err[n - 1]);
            free(d1); free(d2); free(ref); free(y);
        }
        free(x);
    }
}

static void test_dequantize_closed_form(void) {
    const int blocks[2] = { QK_ATD, QK_ATD_64 };
    for (int bi = 0; bi < 2; ++bi) {
        const int B = blocks[bi], S = (B + 4) / 5, nb = 5;
        for (int n = 1; n <= 4; ++n) {
            const size_t ts = type_size(n, B);
            uint8_t * data = calloc(nb, ts);
            int8_t  * t = malloc((size_t)nb * n * B);
            uint16_t  d[5][4];
            for (int b = 0; b < nb; ++b) {
                uint8_t * blk = data + b * ts;
                for (int i = 0; i < n; ++i) {
                    uint16_t h;
                    do { h = (uint16_t)rng_u64(); } while ((h & 0x7c00) == 0x7c00); // any finite half
                    d[b][i] = h;
                    blk[2*i] = (uint8_t)(h & 0xff); blk[2*i + 1] = (uint8_t)(h >> 8);
                    for (int e = 0; e < B; ++e) t[((size_t)b*n + i)*B + e] = (int8_t)((int)(rng_u64() % 3) - 1);
                    for (int j = 0; j < S; ++j) {
                        int v = 0;
                        for (int k = 0; k < 5; ++k) {
                            const int e = S*k + j;
                            v = 3 * v + (e < B ? t[((size_t)b*n + i)*B + e] + 1 : 0);
                        }
                        blk[2*n + i*S + j] = spec_byte(v);
                    }
                }
            }
            float * y = malloc(sizeof(float) * nb * B);
            atd_dequantize_row(data, y, (int64_t)nb * B, n, B);
            int bad = 0;
            for (int b = 0; b < nb; ++b) {
                for (int e = 0; e < B; ++e) {
                    float v = 0.0f;
                    for (int i = 0; i < n; ++i) v = v + atd_fp16_to_fp32(d[b][i]) * (float)t[((size_t)b*n + i)*B + e];
                    bad += bits_of_f32(v) != bits_of_f32(y[b*B + e]);
                }
            }
            CHECK(bad == 0, "dequantize closed form N=%d B=%d: %d mismatches", n, B, bad);
            CHECK(atd_validate_row(data, (int64_t)nb * B, n, B) == 1, "valid data rejected");
            // a byte the encoder never writes, a nonzero padding digit, an inf or NaN scale: invalid
            uint8_t * bad3 = malloc(nb * ts);
            static const uint8_t noncanonical[] = { 1, 20, 40, 60, 79, 99, 119, 138, 158, 178, 197, 217, 237 };
            for (int trial = 0; trial < 8; ++trial) {
                memcpy(bad3, data, nb * ts);
                const size_t byte = (rng_u64() % nb) * ts + 2*n + rng_u64() % (n * S);
                bad3[byte] = noncanonical[rng_u64() % sizeof noncanonical];
                CHECK(atd_validate_row(bad3, (int64_t)nb * B, n, B) == 0, "non-canonical byte accepted");
                memcpy(bad3, data, nb * ts);
                // the last byte of a plane holds a padding slot (digit 4): make it code 1 or 2
                const size_t last = (rng_u64() % nb) * ts + 2*n + (rng_u64() % n) * S + S - 1;
                int v = 0;
                for (int k = 0; k < 4; ++k) v = 3 * v + (int)(rng_u64() % 3);
                bad3[last] = spec_byte(3 * v + 1 + (int)(rng_u64() % 2));
                CHECK(atd_validate_row(bad3, (int64_t)nb * B, n, B) == 0, "nonzero padding accepted");
            }
            const uint16_t bad_scales[3] = { 0x7c00, 0xfc00, 0x7e01 };
            for (int k = 0; k < 3; ++k) {
                memcpy(bad3, data, nb * ts);
                const size_t at = (nb - 1) * ts + 2 * (n - 1);
                bad3[at] = (uint8_t)(bad_scales[k] & 0xff); bad3[at + 1] = (uint8_t)(bad_scales[k] >> 8);
                CHECK(atd_validate_row(bad3, (int64_t)nb * B, n, B) == 0, "scale 0x%04x accepted", bad_scales[k]);
            }
            CHECK(atd_validate_row(data, (int64_t)nb * B, 5, B) == 0, "planes=5 accepted");
            CHECK(atd_validate_row(data, (int64_t)nb * B + 1, n, B) == 0, "ragged k accepted");
            free(bad3); free(y); free(t); free(data);
        }
    }
}

static void test_overflow(void) {
    const int B = QK_ATD, n = 2, rows = 3, cols = 2 * B;
    float * x = malloc(sizeof(float) * rows * cols);
    for (int i = 0; i < rows * cols; ++i) x[i] = (float)rng_gauss();
    for (int j = 0; j < B; ++j) x[cols + B + j] = (float)(rng_gauss() * 1e30); // row 1, block 1
    const size_t bytes = rows * 2 * type_size(n, B);
    uint8_t * y = malloc(bytes);
    CHECK(atd_quantize_rows(x, y, rows, cols, n, B, NULL, 2) == 0, "overflow not reported");
    const uint8_t * blk = y + 3 * type_size(n, B);
    const uint16_t d0 = (uint16_t)(blk[0] | blk[1] << 8);
    CHECK((d0 & 0x7fff) == 0x7c00, "overflowing scale stored as 0x%04x, want inf", d0);
    CHECK(atd_validate_row(y, (int64_t)rows * cols, n, B) == 0, "overflow marker block validates");
    // ggml entry point: clamped to 65504, valid
    CHECK(quantize_atd2(x, y, rows, cols, NULL) == bytes, "quantize_atd2 size");
    const uint16_t c0 = (uint16_t)(blk[0] | blk[1] << 8);
    CHECK((c0 & 0x7fff) == 0x7bff, "clamped scale 0x%04x, want +-65504", c0);
    CHECK(atd_validate_row(y, (int64_t)rows * cols, n, B) == 1, "clamped output invalid");
    free(y); free(x);
}

static void test_sizes(void) {
    // format 2: N * (2 + 52) and N * (2 + 13) bytes (docs/atd-format.md §1)
    CHECK(sizeof(block_atd1) == 54 && sizeof(block_atd2) == 108 && sizeof(block_atd3) == 162 && sizeof(block_atd4) == 216,
          "block sizes (256)");
    CHECK(sizeof(block_atd1_64) == 15 && sizeof(block_atd2_64) == 30 && sizeof(block_atd3_64) == 45 &&
          sizeof(block_atd4_64) == 60, "block sizes (64)");
    CHECK(sizeof(block_atd_q8_64) == 112, "atd_q8_64 block size");  // d[2], sum[2], qs[6][16]
    CHECK(atd_quantize_rows(NULL, NULL, 1, 100, 2, QK_ATD, NULL, 1) == 0, "ragged row accepted");
    CHECK(atd_quantize_rows(NULL, NULL, 1, 256, 5, QK_ATD, NULL, 1) == 0, "planes=5 accepted");
    CHECK(atd_quantize_rows(NULL, NULL, 1, 256, 2, 128, NULL, 1) == 0, "block 128 accepted");
}

// ---- test vectors from Python: see tests/test_ggml_ext.py (write_vectors)

static int read_exact(FILE * f, void * p, size_t n) { return fread(p, 1, n, f) == n; }

static void test_vectors(const char * path) {
    FILE * f = fopen(path, "rb");
    CHECK(f != NULL, "cannot open %s", path);
    if (!f) return;
    char magic[8];
    uint32_t count = 0;
    if (!read_exact(f, magic, 8) || memcmp(magic, "ATDVEC01", 8) != 0 || !read_exact(f, &count, 4)) {
        CHECK(0, "%s: bad header", path);
        fclose(f);
        return;
    }
    for (uint32_t rec = 0; rec < count; ++rec) {
        int32_t hdr[6]; // planes, block, rows, cols, has_importance, expect_ok
        if (!read_exact(f, hdr, sizeof(hdr))) { CHECK(0, "record %u: truncated header", rec); break; }
        const int n = hdr[0], B = hdr[1], rows = hdr[2], cols = hdr[3], has_h = hdr[4], expect_ok = hdr[5];
        if (n < 1 || n > 4 || (B != 64 && B != 256) || rows < 0 || cols <= 0 || cols % B) {
            CHECK(0, "record %u: bad header", rec);
            break;
        }
        const size_t bytes = (size_t)rows * (cols / B) * type_size(n, B);
        float * x = malloc(sizeof(float) * (size_t)rows * cols + 1);
        float * h = has_h ? malloc(sizeof(float) * cols) : NULL;
        uint8_t * want = malloc(bytes + 1), * got = malloc(bytes + 1), * got2 = malloc(bytes + 1);
        int ok = read_exact(f, x, sizeof(float) * (size_t)rows * cols);
        if (has_h) ok &= read_exact(f, h, sizeof(float) * cols);
        if (expect_ok) ok &= read_exact(f, want, bytes);
        CHECK(ok, "record %u: truncated", rec);
        if (ok) {
            const size_t r1 = atd_quantize_rows(x, got, rows, cols, n, B, h, 1);
            const size_t r2 = atd_quantize_rows(x, got2, rows, cols, n, B, h, 2);
            if (expect_ok) {
                CHECK(r1 == bytes && memcmp(got, want, bytes) == 0, "record %u (N=%d B=%d %dx%d h=%d): bytes differ from numpy",
                      rec, n, B, rows, cols, has_h);
                CHECK(r2 == bytes && memcmp(got2, want, bytes) == 0, "record %u: 2 threads differ from numpy", rec);
                for (int r = 0; r < rows; ++r) {
                    atd_quantize_row_scalar(x + (size_t)r * cols, got + r * (bytes / rows), cols, n, B, h);
                }
                CHECK(memcmp(got, want, bytes) == 0, "record %u: scalar path differs from numpy", rec);
            } else {
                CHECK(r1 == 0 && r2 == 0, "record %u: overflow not reported", rec);
            }
        }
        free(x); free(h); free(want); free(got); free(got2);
        if (!ok) break;
    }
    fclose(f);
}

int main(int argc, char ** argv) {
    const char * vectors = NULL;
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--vectors") == 0 && i + 1 < argc) vectors = argv[++i];
        else { fprintf(stderr, "usage: %s [--vectors FILE]\n", argv[0]); return 2; }
    }
    test_sizes();
    test_fp16();
    test_fast_vs_scalar();
    test_rows_and_threads();
    test_dequantize_closed_form();
    test_overflow();
    if (vectors) test_vectors(vectors);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
