"""cffi (API mode) builder for gguf_types._atd_c: every ggml-ext/*.c file, compiled at install time.

setup.py names it as `cffi_modules=["ggml-ext/build_ffi.py:ffibuilder"]`; it can also be run
directly (`python ggml-ext/build_ffi.py`) to build the module in place next to gguf_types/.
The same .c files compile unchanged into the patched llama.cpp (with ATD_IN_GGML defined).
"""

from __future__ import annotations

import glob
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# the part of atd.h that Python uses (cffi cannot parse the header's macros)
CDEF = """
typedef uint16_t ggml_half;

typedef struct { ggml_half d[1]; uint8_t qs[1][64]; } block_atd1;
typedef struct { ggml_half d[2]; uint8_t qs[2][64]; } block_atd2;
typedef struct { ggml_half d[3]; uint8_t qs[3][64]; } block_atd3;
typedef struct { ggml_half d[4]; uint8_t qs[4][64]; } block_atd4;
typedef struct { ggml_half d[1]; uint8_t qs[1][16]; } block_atd1_64;
typedef struct { ggml_half d[2]; uint8_t qs[2][16]; } block_atd2_64;
typedef struct { ggml_half d[3]; uint8_t qs[3][16]; } block_atd3_64;
typedef struct { ggml_half d[4]; uint8_t qs[4][16]; } block_atd4_64;

typedef struct { float d; int8_t qs[256]; int16_t bsums[16]; } block_q8_K;
typedef struct { ggml_half d; int8_t qs[32]; } block_q8_0;

float     atd_fp16_to_fp32(ggml_half h);
ggml_half atd_fp32_to_fp16(float f);

void   atd_quantize_row_ref(const float * x, void * y, int64_t k, int planes, int block, const float * imatrix);
void   atd_quantize_row_scalar(const float * x, void * y, int64_t k, int planes, int block, const float * imatrix);
size_t atd_quantize_rows(const float * x, void * y, int64_t nrows, int64_t n_per_row, int planes, int block,
                         const float * imatrix, int n_threads);
void   atd_dequantize_row(const void * x, float * y, int64_t k, int planes, int block);
int    atd_validate_row(const void * x, int64_t k, int planes, int block);

enum atd_kernel_path { ATD_PATH_AUTO = 0, ATD_PATH_SCALAR, ATD_PATH_AVX2, ATD_PATH_AVX512, ATD_PATH_NEON };
void atd_vec_dot(int n, float * s, const void * vx, const void * vy, int planes, int block);
void atd_vec_dot_path(int n, float * s, const void * vx, const void * vy, int planes, int block, int path);
int  atd_path_available(int path);
int  atd_selected_path(void);
void atd_set_path(int path);

void atd_quantize_row_q8_K_ref(const float * x, block_q8_K * y, int64_t k);
void atd_quantize_row_q8_0_ref(const float * x, block_q8_0 * y, int64_t k);
"""

_TYPES = [(f"atd{n}", n) for n in range(1, 5)] + [(f"atd{n}_64", n) for n in range(1, 5)]
for _name, _n in _TYPES:
    CDEF += f"""
void   quantize_row_{_name}_ref(const float * x, block_{_name} * y, int64_t k);
size_t quantize_{_name}(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
void   dequantize_row_{_name}(const block_{_name} * x, float * y, int64_t k);
"""

# exactness: no FMA contraction, no fast-math; no -march=native (the wheel must run anywhere;
# the SIMD paths are chosen at run time)
EXTRA_COMPILE_ARGS = ["-std=gnu11", "-O3", "-ffp-contract=off", "-fno-fast-math", "-pthread"]


def _sources() -> list[str]:
    # relative to the project root (setuptools rejects absolute source paths in some versions)
    found = sorted(glob.glob(os.path.join(HERE, "*.c")))
    return [os.path.relpath(p, ROOT) if os.getcwd() == ROOT else p for p in found]


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "gguf_types._atd_c",
    '#include "atd.h"\n',
    sources=_sources(),
    include_dirs=[HERE],
    extra_compile_args=EXTRA_COMPILE_ARGS,
    extra_link_args=["-pthread"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    import shutil

    os.chdir(ROOT)
    so = ffibuilder.compile(tmpdir=os.path.join(ROOT, "build", "cffi"), verbose=True)
    shutil.copy2(so, os.path.join(ROOT, "gguf_types", os.path.basename(so)))
