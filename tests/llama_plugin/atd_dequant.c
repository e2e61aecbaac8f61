// Dequantizes every ATD tensor of a GGUF file with ggml's own type traits (the patched libggml):
//   atd_dequant MODEL.gguf OUT_DIR
// writes OUT_DIR/<tensor name>.f32 (float32, ggml_get_type_traits(type)->to_float) and prints one
// line per ATD tensor: "name type_name blck_size type_size n_elements valid" (valid: ggml_validate_row_data).
// Built and run by tests/test_llama_plugin.py.
#include "ggml.h"
#include "gguf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char ** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL.gguf OUT_DIR\n", argv[0]);
        return 2;
    }
    struct ggml_context * meta = NULL;
    struct gguf_init_params params = { /*.no_alloc =*/ false, /*.ctx =*/ &meta };
    struct gguf_context * g = gguf_init_from_file(argv[1], params);
    if (g == NULL) {
        fprintf(stderr, "%s: cannot load %s\n", argv[0], argv[1]);
        return 1;
    }
    int n_atd = 0;
    for (int64_t i = 0; i < gguf_get_n_tensors(g); ++i) {
        const char * name = gguf_get_tensor_name(g, i);
        struct ggml_tensor * t = ggml_get_tensor(meta, name);
        if (t->type < GGML_TYPE_ATD1 || t->type > GGML_TYPE_ATD4_64) {
            continue;
        }
        const struct ggml_type_traits * tr = ggml_get_type_traits(t->type);
        const int64_t n = ggml_nelements(t);
        float * y = malloc(n * sizeof(float));
        tr->to_float(t->data, y, n);
        const int valid = ggml_validate_row_data(t->type, t->data, ggml_nbytes(t));
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s.f32", argv[2], name);
        FILE * f = fopen(path, "wb");
        if (f == NULL || fwrite(y, sizeof(float), n, f) != (size_t) n) {
            fprintf(stderr, "%s: cannot write %s\n", argv[0], path);
            return 1;
        }
        fclose(f);
        free(y);
        printf("%s %s %lld %zu %lld %d\n", name, tr->type_name, (long long) tr->blck_size, tr->type_size,
               (long long) n, valid);
        ++n_atd;
    }
    gguf_free(g);
    ggml_free(meta);
    fprintf(stderr, "%d ATD tensors\n", n_atd);
    return 0;
}
