// ATD (Adaptive Ternary Decomposition) tensor types for ggml: block layout and entry points.
//
// One block of B weights holds N ternary planes, each with one fp16 scale:
//     w[e] = sum_{i<N} d[i] * t[i][e],   t in {-1,0,+1} stored as the 2-bit code t+1.
// Byte j of plane i holds elements j, j+B/4, j+2B/4, j+3B/4 in bits 0-1, 2-3, 4-5, 6-7,
// so (qs[i][j] >> 2k) & 3 over j = 0..B/4-1 gives natural-order elements k*B/4 ... .
// The byte-exact spec is docs/atd-format.md; gguf_types/atd.py is the Python mirror and
// tests/test_ggml_ext.py checks that both agree.
//
// Compiled two ways from the same files:
//   - standalone (cffi extension gguf_types._atd_c): the ggml types below are declared here
//     with ggml's layout;
//   - inside ggml-cpu (patched llama.cpp, ATD_IN_GGML defined): they come from ggml-common.h.
// ggml-ext/build_ffi.py runs this header through the C preprocessor with ATD_CFFI_CDEF defined:
// the expanded declarations are the cffi cdef, so the layout is written down only here.
#pragma once

#ifndef ATD_CFFI_CDEF
#include <stddef.h>
#include <stdint.h>
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define QK_ATD    256  // weights per block, ATD1..ATD4 (rows that are multiples of 256; q8_K activations)
#define QK_ATD_64 64   // weights per block, ATD1_64..ATD4_64 (rows that are multiples of 64; q8_0 activations)
#define ATD_MAX_PLANES 4

#define ATD_TYPE_ID_BASE 200  // ggml type ids: ATD1..ATD4 = 200..203, ATD1_64..ATD4_64 = 204..207

#ifdef ATD_IN_GGML
#include "ggml-common.h"
#else
typedef uint16_t ggml_half;
#ifndef QK_K
#define QK_K 256
#endif
#define QK8_0 32
// ggml's activation blocks, same layout (ggml/src/ggml-common.h)
typedef struct {
    float   d;              // delta
    int8_t  qs[QK_K];       // quants
    int16_t bsums[QK_K/16]; // sum of quants in groups of 16
} block_q8_K;
typedef struct {
    ggml_half d;            // delta
    int8_t    qs[QK8_0];    // quants
} block_q8_0;
#endif

#define ATD_BLOCK(N, B) struct { ggml_half d[N]; uint8_t qs[N][(B)/4]; }
typedef ATD_BLOCK(1, QK_ATD)    block_atd1;
typedef ATD_BLOCK(2, QK_ATD)    block_atd2;
typedef ATD_BLOCK(3, QK_ATD)    block_atd3;
typedef ATD_BLOCK(4, QK_ATD)    block_atd4;
typedef ATD_BLOCK(1, QK_ATD_64) block_atd1_64;
typedef ATD_BLOCK(2, QK_ATD_64) block_atd2_64;
typedef ATD_BLOCK(3, QK_ATD_64) block_atd3_64;
typedef ATD_BLOCK(4, QK_ATD_64) block_atd4_64;
#undef ATD_BLOCK

// bytes of one block: N fp16 scales + N planes of B/4 bytes (the formula gguf_types uses)
#define ATD_TYPE_SIZE(N, B) ((N) * (sizeof(ggml_half) + (B) / 4))

#if defined(ATD_CFFI_CDEF)
#define ATD_STATIC_ASSERT(cond, msg)  // cffi's parser has no static asserts
#elif defined(__cplusplus)
#define ATD_STATIC_ASSERT static_assert
#else
#define ATD_STATIC_ASSERT _Static_assert
#endif
ATD_STATIC_ASSERT(sizeof(block_atd1) == ATD_TYPE_SIZE(1, QK_ATD), "wrong atd1 block size/padding");
ATD_STATIC_ASSERT(sizeof(block_atd2) == ATD_TYPE_SIZE(2, QK_ATD), "wrong atd2 block size/padding");
ATD_STATIC_ASSERT(sizeof(block_atd3) == ATD_TYPE_SIZE(3, QK_ATD), "wrong atd3 block size/padding");
ATD_STATIC_ASSERT(sizeof(block_atd4) == ATD_TYPE_SIZE(4, QK_ATD), "wrong atd4 block size/padding");
ATD_STATIC_ASSERT(sizeof(block_atd1_64) == ATD_TYPE_SIZE(1, QK_ATD_64), "wrong atd1_64 block size/padding");
ATD_STATIC_ASSERT(sizeof(block_atd2_64) == ATD_TYPE_SIZE(2, QK_ATD_64), "wrong atd2_64 block size/padding");
ATD_STATIC_ASSERT(sizeof(block_atd3_64) == ATD_TYPE_SIZE(3, QK_ATD_64), "wrong atd3_64 block size/padding");
ATD_STATIC_ASSERT(sizeof(block_atd4_64) == ATD_TYPE_SIZE(4, QK_ATD_64), "wrong atd4_64 block size/padding");
ATD_STATIC_ASSERT(sizeof(block_q8_K) == sizeof(float) + QK_K + QK_K/16*sizeof(int16_t), "wrong q8_K block size");

// ---- generic entry points (planes N = 1..4, block B = QK_ATD or QK_ATD_64) -------------------------

// fp16 <-> fp32, IEEE round-to-nearest-even like GGML_FP32_TO_FP16 (standalone builds)
float     atd_fp16_to_fp32(ggml_half h);
ggml_half atd_fp32_to_fp16(float f);

// The reference grid fit of docs/atd-format.md section 6 for one row of k weights (k % B == 0);
// imatrix: per-column importance of length k, or NULL. Bytes equal gguf_types.quantize().
void   atd_quantize_row_ref(const float * x, void * y, int64_t k, int planes, int block, const float * imatrix);
// the same fit block by block, a plain transcription of section 6 (tests check that both paths agree)
void   atd_quantize_row_scalar(const float * x, void * y, int64_t k, int planes, int block, const float * imatrix);
// nrows rows of n_per_row weights, split over n_threads threads (0: all cores); returns bytes written.
size_t atd_quantize_rows(const float * x, void * y, int64_t nrows, int64_t n_per_row, int planes, int block,
                         const float * imatrix, int n_threads);
// section 3: float32, planes added in order 0..N-1
void   atd_dequantize_row(const void * x, float * y, int64_t k, int planes, int block);
// 1 if every code is 0..2 and every scale finite (for ggml_validate_row_data), else 0
int    atd_validate_row(const void * x, int64_t k, int planes, int block);

// Dot of one ATD row with q8 activations: B = QK_ATD against block_q8_K, B = QK_ATD_64 against
// block_q8_0. n weights. Integer math per plane, one float scale per block.
enum atd_kernel_path { ATD_PATH_AUTO = 0, ATD_PATH_SCALAR, ATD_PATH_AVX2, ATD_PATH_AVX512, ATD_PATH_NEON };
void atd_vec_dot(int n, float * s, const void * vx, const void * vy, int planes, int block);
void atd_vec_dot_path(int n, float * s, const void * vx, const void * vy, int planes, int block, int path);
// 1 if this build and CPU can run the path
int  atd_path_available(int path);
// the path atd_vec_dot uses (tests may force one with atd_set_path; ATD_PATH_AUTO restores the best)
int  atd_selected_path(void);
void atd_set_path(int path);

// Reference activation quantizers (standalone builds: tests and benchmarks; ggml has its own)
void atd_quantize_row_q8_K_ref(const float * x, block_q8_K * y, int64_t k);
void atd_quantize_row_q8_0_ref(const float * x, block_q8_0 * y, int64_t k);

// ---- ggml-style per-type entry points (the trait tables of the llama.cpp patch point at these) ----
#define ATD_DECLARE(name, N, B, vtype)                                                                   \
    void   quantize_row_##name##_ref(const float * x, block_##name * y, int64_t k);                     \
    size_t quantize_##name(const float * src, void * dst, int64_t nrows, int64_t n_per_row,            \
                           const float * imatrix);                                                     \
    void   dequantize_row_##name(const block_##name * x, float * y, int64_t k);                         \
    void   ggml_vec_dot_##name##_##vtype(int n, float * s, size_t bs, const void * vx, size_t bx,       \
                                         const void * vy, size_t by, int nrc);
ATD_DECLARE(atd1, 1, QK_ATD, q8_K)
ATD_DECLARE(atd2, 2, QK_ATD, q8_K)
ATD_DECLARE(atd3, 3, QK_ATD, q8_K)
ATD_DECLARE(atd4, 4, QK_ATD, q8_K)
ATD_DECLARE(atd1_64, 1, QK_ATD_64, q8_0)
ATD_DECLARE(atd2_64, 2, QK_ATD_64, q8_0)
ATD_DECLARE(atd3_64, 3, QK_ATD_64, q8_0)
ATD_DECLARE(atd4_64, 4, QK_ATD_64, q8_0)
#undef ATD_DECLARE

#ifdef __cplusplus
}
#endif
