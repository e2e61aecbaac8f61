// Shared by the C test drivers in this folder: pass/fail counting, a seeded xorshift rng and an
// fp16 decoder of their own (independent of the library). Define ATD_TEST_SEED before including.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>

static int n_pass = 0, n_fail = 0;

#define CHECK(cond, ...)                                             \
    do {                                                             \
        if (cond) {                                                  \
            n_pass++;                                                \
        } else {                                                     \
            n_fail++;                                                \
            if (n_fail <= 30) {                                      \
                fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
                fprintf(stderr, __VA_ARGS__);                        \
                fprintf(stderr, "\n");                               \
            }                                                        \
        }                                                            \
    } while (0)

// ---- rng ---------------------------------------------------------------------------------------
static uint64_t rng_state = ATD_TEST_SEED;
static uint64_t rng_u64(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static double rng_unif(void) { return (double)(rng_u64() >> 11) * (1.0 / 9007199254740992.0); }
static double rng_gauss(void) {
    double u1 = rng_unif(), u2 = rng_unif();
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

// ---- fp16 ----------------------------------------------------------------------------------------
static double h2d(uint16_t h) {
    const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double    v;
    if (e == 0) v = ldexp((double)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = ldexp((double)(m | 1024), e - 25);
    return s ? -v : v;
}
