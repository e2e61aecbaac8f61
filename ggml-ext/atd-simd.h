// Internal to ggml-ext (atd-dot.c, atd-mm.c): which SIMD paths this build has, and how they are compiled.
#pragma once

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
#if defined(__AVX512VBMI__)
#define ATD_HAVE_AVX512VBMI 1
#if defined(__GFNI__)
#define ATD_HAVE_AVX512GFNI 1
#endif
#endif
#endif
#endif
#define ATD_TARGET_AVX2
#define ATD_TARGET_AVXVNNI
#define ATD_TARGET_AVX512
#define ATD_TARGET_AVX512VBMI
#define ATD_TARGET_AVX512GFNI
#elif defined(ATD_X86) && (defined(__GNUC__) || defined(__clang__))
#define ATD_RUNTIME_DISPATCH 1
#define ATD_HAVE_AVX2    1
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define ATD_HAVE_AVXVNNI 1  // the avxvnni target needs gcc 11 / clang 12
#endif
#define ATD_HAVE_AVX512  1
#define ATD_HAVE_AVX512VBMI 1
#define ATD_HAVE_AVX512GFNI 1
#define ATD_TARGET_AVX2    __attribute__((target("avx2,fma,f16c")))
#define ATD_TARGET_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define ATD_TARGET_AVX512  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define ATD_TARGET_AVX512VBMI \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))
#define ATD_TARGET_AVX512GFNI \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni")))
#else
#define ATD_RUNTIME_DISPATCH 0
#endif


#if defined(__ARM_NEON) && !defined(ATD_X86)
#define ATD_HAVE_NEON 1
#endif

#if defined(ATD_HAVE_AVX2)
#include <immintrin.h>
#endif
#if defined(ATD_HAVE_NEON)
#include <arm_neon.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define ATD_INLINE static inline __attribute__((always_inline))
#define ATD_UNROLL _Pragma("GCC unroll 8")
#else
#define ATD_INLINE static inline
#define ATD_UNROLL
#endif

#if defined(_MSC_VER)
#define ATD_ALIGN64 __declspec(align(64))
#else
#define ATD_ALIGN64 __attribute__((aligned(64)))
#endif

// Dispatch state is probed lazily and may be touched by several ggml threads at once: relaxed
// atomics where the compiler has them (every thread computes and stores the same values).
#if defined(__GNUC__) || defined(__clang__)
#define ATD_LOAD(v)     __atomic_load_n(&(v), __ATOMIC_RELAXED)
#define ATD_STORE(v, x) __atomic_store_n(&(v), (x), __ATOMIC_RELAXED)
#define ATD_INC(v)      __atomic_fetch_add(&(v), 1, __ATOMIC_RELAXED)
#else
#define ATD_LOAD(v)     (v)
#define ATD_STORE(v, x) ((v) = (x))
#define ATD_INC(v)      ((v)++)
#endif

// from atd-dot.c: CPU feature probe ("avx2", "avx512", "avx512vbmi", "gfni", "avxvnni"; 1 = compiled in ggml
// builds), the variant a path runs (the forced one, else the best), and exact fp16 -> fp32
int   atd_cpu_has(const char * feature);
int   atd_dot_variant_of(int path);

#if defined(ATD_HAVE_AVX512)
// the digit tables of the VBMI decoders (atd-dot.c): digits 0..3 of a byte in 2-bit fields, and digit 4
extern const uint8_t atd_lut_c0123[256];
extern const uint8_t atd_lut_c4[256];
#endif

#if defined(ATD_HAVE_AVX512VBMI)
ATD_TARGET_AVX512VBMI ATD_INLINE void atd_tables512_lut(__m512i * tab) {
    ATD_UNROLL for (int t = 0; t < 4; ++t) {
        tab[t]     = _mm512_loadu_si512((const void *)(atd_lut_c0123 + 64 * t));
        tab[4 + t] = _mm512_loadu_si512((const void *)(atd_lut_c4 + 64 * t));
    }
}

// the 256-entry table of tab[t0..t0+3] at the bytes of P: vpermi2b on the low 7 bits, the top bit picks
ATD_TARGET_AVX512VBMI ATD_INLINE __m512i atd_lookup512(__m512i P, __mmask64 top, const __m512i * tab) {
    return _mm512_mask_mov_epi8(_mm512_permutex2var_epi8(tab[0], P, tab[1]), top,
                                _mm512_permutex2var_epi8(tab[2], P, tab[3]));
}

// the codes of digits 0..4 of the 64 bytes of P (lut decoder); tab: the two tables
// (atd_lut_c0123, atd_lut_c4) in 8 zmm
ATD_TARGET_AVX512VBMI ATD_INLINE void atd_codes512_lut(__m512i P, const __m512i * tab, __m512i * c) {
    const __mmask64 top   = _mm512_movepi8_mask(P);
    const __m512i   three = _mm512_set1_epi8(3);
    const __m512i   u     = atd_lookup512(P, top, tab);
    c[4] = atd_lookup512(P, top, tab + 4);
    c[0] = _mm512_and_si512(u, three);
    c[1] = _mm512_and_si512(_mm512_srli_epi16(u, 2), three);
    c[2] = _mm512_and_si512(_mm512_srli_epi16(u, 4), three);
    c[3] = _mm512_and_si512(_mm512_srli_epi16(u, 6), three);
}
#endif

#if defined(ATD_HAVE_AVX512GFNI)
#define atd_tables512_gfni atd_tables512_lut

// the lut decoder with one GF(2) affine map per 2-bit field instead of a shift and an and: output bits
// 0 and 1 of a byte are input bits 2k and 2k + 1 (matrix row 7 - i makes output bit i)
ATD_TARGET_AVX512GFNI ATD_INLINE void atd_codes512_gfni(__m512i P, const __m512i * tab, __m512i * c) {
    const __mmask64 top = _mm512_movepi8_mask(P);
    const __m512i   u   = atd_lookup512(P, top, tab);
    c[4] = atd_lookup512(P, top, tab + 4);
    c[0] = _mm512_and_si512(u, _mm512_set1_epi8(3));
    ATD_UNROLL for (int k = 1; k < 4; ++k) {
        const uint64_t field = (1ull << (2 * k) << 56) | (1ull << (2 * k + 1) << 48);
        c[k] = _mm512_gf2p8affine_epi64_epi8(u, _mm512_set1_epi64((long long)field), 0);
    }
}
#endif
