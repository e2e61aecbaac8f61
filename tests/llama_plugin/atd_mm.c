// One ggml mul_mat of an ATD weight tensor from a GGUF by a batch of activation rows, on the patched
// ggml-cpu (the path llama.cpp takes):
//   atd_mm MODEL.gguf TENSOR NCOLS THREADS OUT_PREFIX
// The activations are deterministic pseudo-random floats (written to OUT_PREFIX.x.f32, ne0 x NCOLS),
// the product goes to OUT_PREFIX.y.f32 (ne1 x NCOLS, one column per activation row). Prints the
// number of calls of the batched ATD kernels (ggml-ext/atd-mm.c) the mul_mat made:
//   "batched_calls <n>"
// Built and run by tests/test_llama_plugin.py (ATD_BATCHED_MM=0 in the environment turns the batched
// path off).
#include "ggml.h"
#include "ggml-cpu.h"
#include "gguf.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

uint64_t atd_mul_mat_calls(void);  // ggml-ext/atd-mm.c, in libggml-cpu

static int write_f32(const char * prefix, const char * suffix, const float * v, size_t n) {
    char path[4096];
    snprintf(path, sizeof path, "%s%s", prefix, suffix);
    FILE * f = fopen(path, "wb");
    if (f == NULL || fwrite(v, sizeof(float), n, f) != n) {
        fprintf(stderr, "cannot write %s\n", path);
        return 1;
    }
    fclose(f);
    return 0;
}

int main(int argc, char ** argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s MODEL.gguf TENSOR NCOLS THREADS OUT_PREFIX\n", argv[0]);
        return 2;
    }
    const int ncols = atoi(argv[3]), nthreads = atoi(argv[4]);
    struct ggml_context * meta = NULL;
    struct gguf_init_params gp = { /*.no_alloc =*/ false, /*.ctx =*/ &meta };
    struct gguf_context * g = gguf_init_from_file(argv[1], gp);
    if (g == NULL) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    struct ggml_tensor * w = ggml_get_tensor(meta, argv[2]);
    if (w == NULL || ncols < 1 || nthreads < 1) {
        fprintf(stderr, "no tensor %s (or bad NCOLS/THREADS)\n", argv[2]);
        return 1;
    }
    const int64_t k = w->ne[0], m = w->ne[1];
    struct ggml_init_params ip = { /*.mem_size =*/ (size_t) 64 * 1024 * 1024 + (size_t) (k + m) * ncols * 8,
                                   /*.mem_buffer =*/ NULL, /*.no_alloc =*/ false };
    struct ggml_context * ctx = ggml_init(ip);
    struct ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, ncols);
    float * xv = (float *) x->data;
    uint64_t s = 0x9E3779B97F4A7C15ull;
    for (int64_t i = 0; i < k * ncols; ++i) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        xv[i] = (float) ((double) (s >> 11) / 9007199254740992.0 - 0.5) * (1.0f + (float) (i % 5));
    }
    struct ggml_tensor * y = ggml_mul_mat(ctx, w, x);
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, y);
    const uint64_t before = atd_mul_mat_calls();
    if (ggml_graph_compute_with_ctx(ctx, gf, nthreads) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "graph compute failed\n");
        return 1;
    }
    printf("batched_calls %llu\n", (unsigned long long) (atd_mul_mat_calls() - before));
    if (write_f32(argv[5], ".x.f32", xv, (size_t) (k * ncols)) || write_f32(argv[5], ".y.f32", (const float *) y->data, (size_t) (m * ncols))) {
        return 1;
    }
    ggml_free(ctx);
    gguf_free(g);
    ggml_free(meta);
    return 0;
}
