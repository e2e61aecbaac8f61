// Runs one forward pass of a GGUF model through libllama and writes the logits of every position:
//   atd_logits MODEL.gguf OUT.f32 N_THREADS TOKEN_ID...
// OUT.f32 holds n_tokens x n_vocab float32 (row-major). Exit status 1 with a message on failure.
// Built against the stock and the patched llama.cpp by tests/test_llama_plugin.py.
#include "llama.h"

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL.gguf OUT.f32 N_THREADS TOKEN_ID...\n", argv[0]);
        return 2;
    }
    const int n_threads = atoi(argv[3]);
    const int n_tokens = argc - 4;

    llama_backend_init();
    struct llama_model_params mparams = llama_model_default_params();
    struct llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (model == NULL) {
        fprintf(stderr, "%s: failed to load %s\n", argv[0], argv[1]);
        return 1;
    }
    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = 512;
    cparams.n_batch = 512;
    cparams.n_ubatch = 512;
    cparams.n_threads = n_threads;
    cparams.n_threads_batch = n_threads;
    struct llama_context * ctx = llama_init_from_model(model, cparams);
    if (ctx == NULL) {
        fprintf(stderr, "%s: failed to create a context\n", argv[0]);
        return 1;
    }
    struct llama_batch batch = llama_batch_init(n_tokens, 0, 1);
    for (int i = 0; i < n_tokens; ++i) {
        batch.token[i] = atoi(argv[4 + i]);
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n_tokens;
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "%s: llama_decode failed\n", argv[0]);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * f = fopen(argv[2], "wb");
    if (f == NULL) {
        fprintf(stderr, "%s: cannot write %s\n", argv[0], argv[2]);
        return 1;
    }
    for (int i = 0; i < n_tokens; ++i) {
        fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, f);
    }
    fclose(f);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
