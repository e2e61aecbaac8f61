// The "CPU_ATD_R2" buffer type of the patched ggml-cpu: an extra buffer type, like ggml's CPU_REPACK, that
// holds ATD weights in the r2 layout of atd.h (2 bits per trit). llama.cpp offers it to every weight of a
// mul_mat; the weights it takes are repacked as they are loaded (set_tensor), at 66/54 (ATD1..ATD4) or
// 18/15 (ATD1_64..ATD4_64) of the file's bytes in memory, and their mul_mats run the r2 kernels
// (ggml_compute_forward_mul_mat_atd_r2 in ggml-cpu.c). ATD_REPACK=0 in the environment, or llama.cpp's --no-repack, keeps the file layout.
// Only compiled into ggml-cpu (the cffi extension takes the *.c files).
#define GGML_COMMON_DECL_CPP  // ggml-common.h's block types, for atd.h
#include "atd.h"

#include "ggml-backend-impl.h"
#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "traits.h"

#include <algorithm>
#include <cstdlib>
#include <thread>
#include <vector>

// ggml-cpu.c
extern "C" bool ggml_compute_forward_mul_mat_atd_r2(const struct ggml_compute_params * params, struct ggml_tensor * dst);

ggml_backend_buffer_type_t ggml_backend_cpu_atd_r2_buffer_type(void);

// planes of an ATD matrix whose rows the r2 kernels take (and in *block its block size), else 0
static int atd_r2_planes(const struct ggml_tensor * t, int * block) {
    if (t->type < GGML_TYPE_ATD1 || t->type > GGML_TYPE_ATD4_64 || t->ne[0] > INT32_MAX || t->ne[1] > INT32_MAX ||
        t->ne[2] != 1 || t->ne[3] != 1) {
        return 0;
    }
    *block = t->type <= GGML_TYPE_ATD4 ? QK_ATD : QK_ATD_64;
    return t->ne[0] % *block == 0 ? (int) (t->type - GGML_TYPE_ATD1) % 4 + 1 : 0;
}

static bool atd_r2_in_buffer(const struct ggml_tensor * t) {
    return t->buffer != nullptr && t->buffer->buft == ggml_backend_cpu_atd_r2_buffer_type();
}

// rows [r0, r0 + nr) of the file layout -> the same rows in r2; the rows start at a group boundary and are
// whole groups or end the matrix (atd.h), so each piece has the layout of the whole. Large matrices are
// split over threads: the repack runs once, as the model loads.
static void atd_r2_buffer_set_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor, const void * data,
                                     size_t offset, size_t size) {
    GGML_UNUSED(buffer);
    int           block  = 0;
    const int     planes = atd_r2_planes(tensor, &block);
    const size_t  row    = tensor->nb[1];
    const int64_t r0     = (int64_t) (offset / row), nr = (int64_t) (size / row);
    if (planes == 0 || offset % row != 0 || size % row != 0 || r0 % ATD_R2_GROUP != 0 ||
        (nr % ATD_R2_GROUP != 0 && r0 + nr != tensor->ne[1])) {
        GGML_ABORT("%s: %s: only whole groups of rows of ATD matrices can be written", __func__, tensor->name);
    }
    const size_t r2_row = atd_r2_row_size(planes, block, tensor->ne[0]);
    char *       dst    = (char *) tensor->data + r0 * r2_row;
    const int64_t ngroups = (nr + ATD_R2_GROUP - 1) / ATD_R2_GROUP;
    const int64_t nth     = std::max<int64_t>(1, std::min<int64_t>(std::thread::hardware_concurrency(),
                                                                   (int64_t) (size >> 22)));  // 4 MB or more each
    std::vector<std::thread> threads;
    for (int64_t t = 0; t < nth; ++t) {
        const int64_t a = ngroups * t / nth * ATD_R2_GROUP, b = std::min(nr, ngroups * (t + 1) / nth * ATD_R2_GROUP);
        auto work = [=] { atd_repack_r2((const char *) data + a * row, dst + a * r2_row, b - a, tensor->ne[0], planes, block);
        };
        if (t + 1 < nth) {
            threads.emplace_back(work);
        } else {
            work();
        }
    }
    for (auto & th : threads) {
        th.join();
    }
}

static const char * atd_r2_buffer_type_get_name(ggml_backend_buffer_type_t buft) {
    GGML_UNUSED(buft);
    return "CPU_ATD_R2";
}

static ggml_backend_buffer_t atd_r2_buffer_type_alloc_buffer(ggml_backend_buffer_type_t buft, size_t size) {
    ggml_backend_buffer_t buffer = ggml_backend_buft_alloc_buffer(ggml_backend_cpu_buffer_type(), size);
    if (buffer == nullptr) {
        return nullptr;
    }
    buffer->buft             = buft;
    buffer->iface.set_tensor = atd_r2_buffer_set_tensor;
    buffer->iface.get_tensor = nullptr;  // not the file's bytes any more (as CPU_REPACK)
    buffer->iface.cpy_tensor = nullptr;
    return buffer;
}

static size_t atd_r2_buffer_type_get_alignment(ggml_backend_buffer_type_t buft) {
    GGML_UNUSED(buft);
    return 64;
}

static size_t atd_r2_buffer_type_get_alloc_size(ggml_backend_buffer_type_t buft, const struct ggml_tensor * tensor) {
    GGML_UNUSED(buft);
    int       block  = 0;
    const int planes = atd_r2_planes(tensor, &block);
    return planes ? (size_t) tensor->ne[1] * atd_r2_row_size(planes, block, tensor->ne[0]) : ggml_nbytes(tensor);
}

namespace atd_r2 {

class tensor_traits : public ggml::cpu::tensor_traits {
    // ggml-cpu's own MUL_MAT size (the q8_K rows and the ATD scratch) fits
    bool work_size(int, const struct ggml_tensor *, size_t &) override { return false; }

    bool compute_forward(struct ggml_compute_params * params, struct ggml_tensor * op) override {
        return op->op == GGML_OP_MUL_MAT && ggml_compute_forward_mul_mat_atd_r2(params, op);
    }
};

class extra_buffer_type : public ggml::cpu::extra_buffer_type {
    bool supports_op(ggml_backend_dev_t, const struct ggml_tensor * op) override {
        const struct ggml_tensor * w = op->src[0];
        const struct ggml_tensor * x = op->src[1];
        int        block = 0;
        return op->op == GGML_OP_MUL_MAT && atd_r2_in_buffer(w) && atd_r2_planes(w, &block) != 0 &&
               x->type == GGML_TYPE_F32 && (x->buffer == nullptr || ggml_backend_buft_is_host(x->buffer->buft));
    }

    ggml::cpu::tensor_traits * get_tensor_traits(const struct ggml_tensor * op) override {
        static tensor_traits traits;
        return op->op == GGML_OP_MUL_MAT && atd_r2_in_buffer(op->src[0]) ? &traits : nullptr;
    }
};

}  // namespace atd_r2

ggml_backend_buffer_type_t ggml_backend_cpu_atd_r2_buffer_type(void) {
    static struct ggml_backend_buffer_type buft = {
        /* .iface   = */ {
            /* .get_name       = */ atd_r2_buffer_type_get_name,
            /* .alloc_buffer   = */ atd_r2_buffer_type_alloc_buffer,
            /* .get_alignment  = */ atd_r2_buffer_type_get_alignment,
            /* .get_max_size   = */ nullptr,
            /* .get_alloc_size = */ atd_r2_buffer_type_get_alloc_size,
            /* .is_host        = */ nullptr,
        },
        /* .device  = */ ggml_backend_reg_dev_get(ggml_backend_cpu_reg(), 0),
        /* .context = */ new atd_r2::extra_buffer_type(),
    };
    // only where an x86 SIMD path runs the r2 kernels (elsewhere they are the scalar reference)
    static const bool enabled = [] {
        const char * env = std::getenv("ATD_REPACK");
        return (env == nullptr || std::atoi(env) != 0) &&
               (atd_path_available(ATD_PATH_AVX512) || atd_path_available(ATD_PATH_AVX2));
    }();
    return enabled ? &buft : nullptr;
}
