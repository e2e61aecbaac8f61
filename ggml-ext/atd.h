// ATD (Adaptive Ternary Decomposition) tensor types for ggml: block layout and entry points
// (format version 2).
//
// One block of B weights holds N ternary planes, each with one fp16 scale:
//     w[e] = sum_{i<N} d[i] * t[i][e],   t in {-1,0,+1} stored as the code c = t+1.
// A plane is S = ceil(B/5) base-3 bytes (52 for B = 256, 13 for B = 64): digit k of byte j
// (k = 0 most significant) is the code of element S*k + j; slots S*k + j >= B are padding and
// hold code 0. A byte stores its base-3 value v = sum_k c_k 3^(4-k) as the fixed-point fraction
// ceil(256 v / 243), so digit k is ((x_k * 3) >> 8) with x_0 = byte, x_{k+1} = x_k * 3 mod 256.
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
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define QK_ATD    256  // weights per block, ATD1..ATD4 (rows that are multiples of 256; q8_K activations)
#define QK_ATD_64 64   // weights per block, ATD1_64..ATD4_64 (rows that are multiples of 64; atd_q8_64 activations)
#define ATD_MAX_PLANES 4
#define ATD_TRITS_PER_BYTE 5                                           // 3^5 = 243 <= 256
#define ATD_PLANE_BYTES(B) (((B) + ATD_TRITS_PER_BYTE - 1) / ATD_TRITS_PER_BYTE)  // 52, 13
#define ATD_FORMAT_VERSION 2

#define ATD_TYPE_ID_BASE 1000  // ggml type ids: ATD1..ATD4 = 1000..1003, ATD1_64..ATD4_64 = 1004..1007
#define ATD_ACT_TYPE_ID  1008  // the 64 family's activation type (runtime only, never in a file)

#ifdef ATD_IN_GGML
#include "ggml-common.h"
#else
typedef uint16_t ggml_half;
#ifndef QK_K
#define QK_K 256
#endif
// ggml's activation block, same layout (ggml/src/ggml-common.h)
typedef struct {
    float   d;              // delta
    int8_t  qs[QK_K];       // quants
    int16_t bsums[QK_K/16]; // sum of quants in groups of 16
} block_q8_K;
#endif

// Scales as little-endian byte pairs: alignment 1, so the 15*N-byte blocks of the 64 family need
// no padding.
#define ATD_BLOCK(N, B) struct { uint8_t d[N][2]; uint8_t qs[N][ATD_PLANE_BYTES(B)]; }
typedef ATD_BLOCK(1, QK_ATD)    block_atd1;
typedef ATD_BLOCK(2, QK_ATD)    block_atd2;
typedef ATD_BLOCK(3, QK_ATD)    block_atd3;
typedef ATD_BLOCK(4, QK_ATD)    block_atd4;
typedef ATD_BLOCK(1, QK_ATD_64) block_atd1_64;
typedef ATD_BLOCK(2, QK_ATD_64) block_atd2_64;
typedef ATD_BLOCK(3, QK_ATD_64) block_atd3_64;
typedef ATD_BLOCK(4, QK_ATD_64) block_atd4_64;
#undef ATD_BLOCK

// Activations of the 64 family: int8, stored by digit: qs[k][j] pairs with digit k of plane byte j, i.e.
// element 13k + j (lanes 13..15 and element 64 = qs[4][12] are zero). Scale groups follow the 4-byte
// columns of that layout: element 13k + j has group j / 4 (20, 20, 20 and 4 elements, at most 20 per
// scale, finer than q8_0's 32). The int32 lanes of a vpdpbusd over one 16-byte digit group are then
// exactly the four groups' sums: one accumulator per plane and no reduction.
#define ATD_Q8_64_GROUPS 4
typedef struct {
    float   d[ATD_Q8_64_GROUPS];    // x ~= d[g] * q for the elements of group g
    int32_t sum[ATD_Q8_64_GROUPS];  // sum of the q of group g
    int8_t  qs[ATD_TRITS_PER_BYTE][16];
} block_atd_q8_64;

// Activations of the 64 family for the batched kernels (atd-mm.c): natural order, a scale per 32 (as
// ggml's q8_0: a k-group of 4 consecutive weights never spans two scales), and bias[h] = -128 * (sum
// of the 32 q of half h): the kernels multiply the weights as unsigned bytes w + 128.
typedef struct {
    float   d[2];
    int32_t bias[2];
    int8_t  qs[QK_ATD_64];
} block_atd_q8_64mm;

// bytes of one block: N fp16 scales + N planes of ceil(B/5) bytes (the formula gguf_types uses)
#define ATD_TYPE_SIZE(N, B) ((N) * (2 + ATD_PLANE_BYTES(B)))

// The r2 layout: runtime only (the patched ggml-cpu repacks ATD weights into it as it loads them; never in
// a file). Each trit takes 2 bits, so a kernel gets a plane's codes with a shift and an and instead of the
// base-3 digit decoding. A block of B weights keeps its N fp16 scales and has B/4 bytes per plane; bits 2k,
// 2k+1 of plane byte j hold the code (t + 1) of element (B/4) k + j. Rows go in groups of ATD_R2_GROUP,
// interleaved block by block, so a kernel that takes a group's rows together reads one stream; rows after
// the last whole group stay single (each block: scales, then planes). A group takes the bytes of as many
// rows, so row r's group or single row starts at r * row size either way. Within a group, block b:
//   - B = 256 (66/54 of the file's bytes): the four rows' blocks one after the other (scales, then planes);
//   - B = 64 (18/15 of the file's bytes): the 4N scales (row by row), then plane by plane the four rows'
//     16 bytes, so one 64-byte load holds a plane of the four rows.
#define ATD_R2_PLANE_BYTES(B) ((B) / 4)
#define ATD_R2_TYPE_SIZE(N, B) ((N) * (2 + ATD_R2_PLANE_BYTES(B)))
#define ATD_R2_GROUP 4

// Activations of the 64 family's r2 gemv: natural order, four scale groups that follow the 4-byte columns
// of the r2 planes: element 16k + 4c + m (k, m < 4) is in group c (16 elements, finer than vec_dot's 20),
// with d[c] = max|x| / 127 of the group (as atd_quantize_group) and sum[c] its sum of q. The int32 lanes of
// a vpdpbusd over a plane's 16 bytes are then the groups' sums.
#define ATD_Q8_64R2_GROUPS 4
typedef struct {
    float   d[ATD_Q8_64R2_GROUPS];
    int32_t sum[ATD_Q8_64R2_GROUPS];
    int8_t  qs[QK_ATD_64];
} block_atd_q8_64r2;

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
ATD_STATIC_ASSERT(sizeof(block_atd_q8_64) == 2*ATD_Q8_64_GROUPS*4 + ATD_TRITS_PER_BYTE*16, "wrong atd_q8_64 block size");
ATD_STATIC_ASSERT(sizeof(block_atd_q8_64mm) == 4*sizeof(int32_t) + QK_ATD_64, "wrong atd_q8_64mm block size");
ATD_STATIC_ASSERT(ATD_R2_TYPE_SIZE(2, QK_ATD) == 132 && ATD_R2_TYPE_SIZE(3, QK_ATD_64) == 54, "wrong r2 block size");
ATD_STATIC_ASSERT(sizeof(block_atd_q8_64r2) == 32 + QK_ATD_64, "wrong atd_q8_64r2 block size");
ATD_STATIC_ASSERT(sizeof(block_q8_K) == sizeof(float) + QK_K + QK_K/16*sizeof(int16_t), "wrong q8_K block size");

#ifndef ATD_CFFI_CDEF
// digit, lane and scale group of element e (0..63) in block_atd_q8_64
static inline int atd_q8_64_digit(int e) { return e / ATD_PLANE_BYTES(QK_ATD_64); }
static inline int atd_q8_64_lane(int e) { return e % ATD_PLANE_BYTES(QK_ATD_64); }
static inline int atd_q8_64_group(int e) { return atd_q8_64_lane(e) / 4; }

// The 64 family's activation rule, per scale group (atd_q8_64) or per 32 values (the batched kernels):
// n values: d = max|x| / 127, q = nearest int of x / d (|q| <= 127); returns d, *sum = the sum of q
static inline float atd_quantize_group(const float * x, int n, int8_t * q, int32_t * sum) {
    float amax = 0.0f;
    for (int j = 0; j < n; ++j) {
        const float a = fabsf(x[j]);
        amax = a > amax ? a : amax;
    }
    const float d  = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int32_t     s  = 0;
    for (int j = 0; j < n; ++j) {
        int v = (int)nearbyintf(x[j] * id);
        v = v > 127 ? 127 : (v < -127 ? -127 : v);
        q[j] = (int8_t)v;
        s += v;
    }
    *sum = s;
    return d;
}

// The base-3 byte (one fact, used by the codec and the kernels)
// stored byte of the base-3 value v = sum_k c_k 3^(4-k), 0 <= v < 243
static inline uint8_t atd_encode_byte(int v) { return (uint8_t)((v * 256 + 242) / 243); }
// Where one row's blocks are: block b's scales at blk + b * step, its plane i at blk + b * step + poff +
// i * pstep; r2: planes of 2-bit codes (else base-3 bytes)
typedef struct {
    const uint8_t * blk;
    size_t          step;
    int             poff, pstep, r2;
} atd_row_view;

// a row of the file layout
static inline atd_row_view atd_file_row(const void * row, int planes, int block) {
    const atd_row_view v = { (const uint8_t *)row, (size_t)ATD_TYPE_SIZE(planes, block), 2 * planes,
                             ATD_PLANE_BYTES(block), 0 };
    return v;
}

// row r of nr rows of the r2 layout that start at a group boundary (row_size: bytes of a row)
static inline atd_row_view atd_r2_row(const void * base, int64_t nr, int64_t r, size_t row_size, int planes,
                                      int block) {
    const size_t    bsz = ATD_R2_TYPE_SIZE(planes, block);
    const uint8_t * p   = (const uint8_t *)base;
    atd_row_view    v   = { p + (size_t)r * row_size, bsz, 2 * planes, ATD_R2_PLANE_BYTES(block), 1 };
    if (r < nr / ATD_R2_GROUP * ATD_R2_GROUP) {
        const uint8_t * g = p + (size_t)(r / ATD_R2_GROUP) * ATD_R2_GROUP * row_size;
        const int       m = (int)(r % ATD_R2_GROUP);
        v.step = ATD_R2_GROUP * bsz;
        if (block == QK_ATD) {
            v.blk = g + (size_t)m * bsz;
        } else {
            v.blk   = g + 2 * planes * m;
            v.poff  = 2 * planes * (ATD_R2_GROUP - m) + ATD_R2_PLANE_BYTES(block) * m;
            v.pstep = ATD_R2_GROUP * ATD_R2_PLANE_BYTES(block);
        }
    }
    return v;
}

// code (0..2) of digit k of a stored byte
static inline int atd_byte_digit(uint8_t b, int k) {
    uint32_t x = b;
    for (int i = 0; i < k; ++i) x = (x * 3u) & 0xffu;
    return (int)((x * 3u) >> 8);
}
#endif

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
// 1 if every byte is a canonical base-3 byte, every padding slot holds code 0 and every scale is
// finite (for ggml_validate_row_data), else 0
int    atd_validate_row(const void * x, int64_t k, int planes, int block);

// Dot of one ATD row with q8 activations: B = QK_ATD against block_q8_K, B = QK_ATD_64 against
// block_atd_q8_64. n weights. Integer math per plane, one float scale per block.
enum atd_kernel_path { ATD_PATH_AUTO = 0, ATD_PATH_SCALAR, ATD_PATH_AVX2, ATD_PATH_AVX512, ATD_PATH_NEON };
void atd_vec_dot(int n, float * s, const void * vx, const void * vy, int planes, int block);
void atd_vec_dot_path(int n, float * s, const void * vx, const void * vy, int planes, int block, int path);
// 1 if this build and CPU can run the path
int  atd_path_available(int path);
// the path atd_vec_dot uses (tests may force one with atd_set_path; ATD_PATH_AUTO restores the best)
int  atd_selected_path(void);
void atd_set_path(int path);

// One activation row against nr weight rows (stride bx bytes): out[r] = atd_vec_dot of row r, bit for
// bit (four rows per step on AVX-512; two rows of the 64 family on AVX2).
void atd_gemv(int n, int planes, int block, const void * vx, size_t bx, int nr, const void * vy, float * out);

// Activation quantizers: q8_K (standalone builds: tests and benchmarks; ggml has its own) and the
// 64 family's atd_q8_64 (the reference: ggml-base's from_float_ref): per scale group, d = max|x| / 127,
// q = nearest int of x / d.
void atd_quantize_row_q8_K_ref(const float * x, block_q8_K * y, int64_t k);
void quantize_row_atd_q8_64(const float * x, void * y, int64_t k);
// the same bytes with SIMD where the CPU has it (ggml-cpu's from_float)
void atd_quantize_row_q8_64(const float * x, void * y, int64_t k);

// ---- the r2 layout (runtime repacking) -----------------------------------------------------------------
//
// nrows rows of n weights (n % block == 0; file layout) into the r2 layout (groups from the first row);
// returns the bytes written, 0 for an invalid shape, plane count or block. The kernels below take nr rows
// of r2 that start at a group boundary and are laid out as atd_repack_r2 writes nr rows (whole groups, then
// single rows).
size_t atd_r2_row_size(int planes, int block, int64_t n);
size_t atd_repack_r2(const void * src, void * dst, int64_t nrows, int64_t n, int planes, int block);
// the same bytes on a given path (SIMD decoding of the base-3 bytes), and the scalar reference
size_t atd_repack_r2_path(const void * src, void * dst, int64_t nrows, int64_t n, int planes, int block, int path);
size_t atd_repack_r2_ref(const void * src, void * dst, int64_t nrows, int64_t n, int planes, int block);
// atd_gemv on r2 rows. B = 256: out[r] = atd_vec_dot of the original row r (q8_K activations), bit for bit.
// B = 64: against block_atd_q8_64r2 activations (quantize_row_atd_q8_64r2); every path gives the bits of
// the scalar path, which sums each plane's codes times q exactly in integers per scale group c (less the
// group's sum of q) and combines in float: acc[c] = fma(isum, alpha * d[c], acc[c]) over blocks, then
// planes, and out = (acc[0] + acc[1]) + (acc[2] + acc[3]).
// atd_gemv_r2_path forces a path (ATD_PATH_AUTO: the selected one).
void atd_gemv_r2(int n, int planes, int block, const void * vx, int nr, const void * vy, float * out);
void atd_gemv_r2_path(int n, int planes, int block, const void * vx, int nr, const void * vy, float * out, int path);
void quantize_row_atd_q8_64r2(const float * x, void * y, int64_t k);
// atd_mul_mat on r2 rows: the same bits as atd_mul_mat on the original rows
void atd_mul_mat_r2_path(int n, int planes, int block, const void * vx, int nr, const void * vy, size_t by, int nc,
                         float * dst, size_t ldd, void * scratch, int path);

// ---- batched matmul (atd-mm.c): more than one activation row ----------------------------------------
//
// dst[c * ldd + r] = row r of the weights (nr rows of n weights, stride bx bytes) . activation row c
// (nc rows, stride by bytes: q8_K for B = QK_ATD, block_atd_q8_64mm for B = QK_ATD_64). Each weight
// block is decoded once into int8 (a scale per block) and used for every activation row: the result
// differs from the exact dot of the weights and these activations x by at most
// sum_blocks (sum_i |alpha_i| / 254) * sum_e |x_e| plus float rounding (from atd_vec_dot's, for the 64
// family, also by the other rounding of its activations). scratch: atd_mul_mat_scratch_size() bytes,
// one per concurrent call. Every path returns the same bits; atd_mul_mat_path forces one (ATD_PATH_AUTO:
// the selected path).
size_t   atd_mul_mat_scratch_size(void);
void     atd_mul_mat(int n, int planes, int block, const void * vx, size_t bx, int nr, const void * vy, size_t by,
                     int nc, float * dst, size_t ldd, void * scratch);
void     atd_mul_mat_path(int n, int planes, int block, const void * vx, size_t bx, int nr, const void * vy,
                          size_t by, int nc, float * dst, size_t ldd, void * scratch, int path);
// bytes of one activation row of n values for the batched kernels, and the 64 family's quantizer
size_t   atd_mm_act_row_size(int block, int64_t n);
void     quantize_row_atd_q8_64mm(const float * x, void * y, int64_t k);
// how many times atd_mul_mat has run (tests: the batched path is really taken)
uint64_t atd_mul_mat_calls(void);

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
ATD_DECLARE(atd1_64, 1, QK_ATD_64, atd_q8_64)
ATD_DECLARE(atd2_64, 2, QK_ATD_64, atd_q8_64)
ATD_DECLARE(atd3_64, 3, QK_ATD_64, atd_q8_64)
ATD_DECLARE(atd4_64, 4, QK_ATD_64, atd_q8_64)
#undef ATD_DECLARE

#ifdef __cplusplus
}
#endif
