#!/usr/bin/env python3
"""Benchmark the ATD vec_dot kernels (ggml-ext/atd-dot.c) against ggml's own TQ1_0, TQ2_0 and Q4_0,
and against the format-1 ATD kernels (2-bit trits) of an earlier commit, in the same run.

Single thread, one activation row (q8_K for B=256, TQ1_0 and TQ2_0; atd_q8_64 for B=64; q8_0 for
Q4_0 and the format-1 B=64 kernels):

* in cache: one row of 4096 weights, dotted many times; best of many short runs;
* DRAM: a matrix of >= 512 MB of weight bytes (rows of 4096), one pass over all rows per run,
  the whole pass timed; best of a few runs.

Rates are Gweights/s of the weight row (and per plane = rate x N for ATD). ggml's kernels come
from the pinned llama.cpp source (scripts/llama_cpp_source.py), built once with cmake into
build/ggml-bench/ (shared libraries, no -march=native) and called through ctypes
(ggml_get_type_traits_cpu(type)->vec_dot / from_float). The ATD kernels are compiled here
from ggml-ext/*.c into build/ggml-bench/libatd-bench.so together with a small timing loop,
so the loop overhead is the same C call per row for both. The format-1 kernels are compiled the same
way from `git show V1_COMMIT:ggml-ext/...` (a commit of this repository) into libatd-v1-bench.so.

Usage:
    .venv/bin/python scripts/bench_kernels.py                 # full run, writes docs/bench-kernels.md
    .venv/bin/python scripts/bench_kernels.py --quick         # in-cache only, no file written
    .venv/bin/python scripts/bench_kernels.py --dram-mb 1024 --out /tmp/x.md
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gguf_types  # noqa: E402

BUILD = ROOT / "build" / "ggml-bench"
EXT = ROOT / "ggml-ext"

# the project's x86 flags (no -march=native: AMX is reported here but faults). GGML_AVX_VNNI only
# where the CPU has AVX-VNNI: with it ggml emits VEX vpdpbusd (Q4_0), a SIGILL on e.g. Zen 4.
GGML_CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
    "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON",
    "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_BACKEND_DL=OFF", "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_OPENMP=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF",
]

GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, GGML_TYPE_Q8_K, GGML_TYPE_TQ1_0, GGML_TYPE_TQ2_0 = 2, 8, 15, 34, 35
# the last commit with format-1 ATD kernels (2 bits per trit, ids 200..207)
V1_COMMIT = "fee6ba8"
PATH_SCALAR, PATH_AVX2, PATH_AVX512, PATH_NEON = 1, 2, 3, 4
PATH_NAMES = {PATH_SCALAR: "scalar", PATH_AVX2: "AVX2", PATH_AVX512: "AVX-512", PATH_NEON: "NEON"}
VARIANT_NAMES = {(PATH_AVX2, 1): "maddubs", (PATH_AVX2, 2): "AVX-VNNI", (PATH_AVX2, 3): "VL-VNNI ymm",
                 (PATH_AVX512, 1): "mulhi decoder", (PATH_AVX512, 2): "VBMI tables",
                 (PATH_AVX512, 3): "VBMI tables + GFNI"}

ROW = 4096

# timing loops in C: the same per-row call overhead for ATD and ggml kernels
HELPER_C = r"""
#include "atd.h"
#include <time.h>
typedef void (*vec_dot_t)(int, float *, size_t, const void *, size_t, const void *, size_t, int);
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

// rows x row_bytes weights (stride row_bytes), reps passes; returns seconds, sum of results in *out
double bench_atd(int n, const void * x, size_t row_bytes, long nrows, const void * y, int planes, int block,
                 int path, long reps, float * out) {
    float acc = 0.0f, s;
    double t0 = now();
    for (long r = 0; r < reps; ++r)
        for (long i = 0; i < nrows; ++i) {
            atd_vec_dot_path(n, &s, (const char *)x + i * row_bytes, y, planes, block, path);
            acc += s;
        }
    double t = now() - t0;
    *out = acc;
    return t;
}

#if defined(ATD_BENCH_BATCHED)  // format 2 only
// atd_gemv: one activation row against nrows weight rows (4 rows per step for the 64 family on AVX-512)
double bench_gemv(int n, const void * x, size_t row_bytes, long nrows, const void * y, int planes, int block,
                  long reps, float * out) {
    double t0 = now();
    for (long r = 0; r < reps; ++r) atd_gemv(n, planes, block, x, row_bytes, (int)nrows, y, out);
    return now() - t0;
}

// the batched kernels: nrows weight rows x ncols activation rows
double bench_mm(int n, const void * x, size_t row_bytes, int nrows, const void * y, size_t by, int ncols, int planes,
                int block, int path, long reps, float * out, void * scratch) {
    double t0 = now();
    for (long r = 0; r < reps; ++r)
        atd_mul_mat_path(n, planes, block, x, row_bytes, nrows, y, by, ncols, out, (size_t)nrows, scratch, path);
    return now() - t0;
}
#endif

double bench_ggml(void * fn, int n, const void * x, size_t row_bytes, long nrows, const void * y, long reps,
                  float * out) {
    vec_dot_t f = (vec_dot_t)fn;
    float acc = 0.0f, s;
    double t0 = now();
    for (long r = 0; r < reps; ++r)
        for (long i = 0; i < nrows; ++i) {
            f(n, &s, 0, (const char *)x + i * row_bytes, 0, y, 0, 1);
            acc += s;
        }
    double t = now() - t0;
    *out = acc;
    return t;
}
"""


# ------------------------------------------------------------------------------------ builds


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def ggml_cmake_flags() -> list[str]:
    return GGML_CMAKE_FLAGS + [f"-DGGML_AVX_VNNI={'ON' if 'avx_vnni' in cpu_flags() else 'OFF'}"]


def ggml_libs() -> Path:
    """build/ggml-bench/bin with libggml-base/libggml-cpu (built once from the pinned source)."""
    lib = BUILD / "bin" / "libggml-cpu.so"
    stamp = BUILD / "ggml-flags.txt"
    flags = ggml_cmake_flags()
    if lib.is_file() and stamp.is_file() and stamp.read_text() == "\n".join(flags):
        return lib.parent
    src = Path(subprocess.run([sys.executable, str(ROOT / "scripts" / "llama_cpp_source.py")], check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1])
    BUILD.mkdir(parents=True, exist_ok=True)
    print(f"building ggml from {src} into {BUILD} ...", file=sys.stderr)
    with open(BUILD / "build.log", "w") as log:  # ggml's compiler warnings go here
        subprocess.run(["cmake", "-S", str(src), "-B", str(BUILD), *flags], check=True, stdout=log, stderr=log)
        subprocess.run(["cmake", "--build", str(BUILD), "-j", str(os.cpu_count() or 2), "--target", "ggml-base",
                        "ggml-cpu", "ggml"], check=True, stdout=log, stderr=log)
    stamp.write_text("\n".join(flags))
    return lib.parent


def _build_lib(src_dir: Path, out: Path, defines: tuple[str, ...] = ()) -> Path:
    """src_dir/*.c (+ atd.h) and the timing loops as one shared library (rebuilt when a source is newer)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    helper = BUILD / "atd_bench_helper.c"
    if not helper.is_file() or helper.read_text() != HELPER_C:
        helper.write_text(HELPER_C)
    sources = sorted(src_dir.glob("*.c")) + [helper]
    newest = max(p.stat().st_mtime for p in sources + list(src_dir.glob("*.h")))
    if not out.is_file() or out.stat().st_mtime < newest:
        # the flags of ggml-ext/build_ffi.py; no -march (paths are chosen at run time)
        cmd = ["gcc", "-std=gnu11", "-O3", "-ffp-contract=off", "-fno-fast-math", "-pthread", "-shared", "-fPIC",
               *(f"-D{d}" for d in defines), "-I", str(src_dir), *map(str, sources), "-o", str(out), "-lm"]
        subprocess.run(cmd, check=True)
    return out


def atd_lib() -> Path:
    return _build_lib(EXT, BUILD / "libatd-bench.so", ("ATD_BENCH_BATCHED",))


def atd_v1_lib() -> Path | None:
    """The format-1 kernels from V1_COMMIT (None if git or the commit is not available)."""
    src = BUILD / f"ggml-ext-{V1_COMMIT}"
    if not (src / "atd.h").is_file():
        src.mkdir(parents=True, exist_ok=True)
        for name in ("atd.h", "atd-dot.c", "atd-quants.c"):
            proc = subprocess.run(["git", "-C", str(ROOT), "show", f"{V1_COMMIT}:ggml-ext/{name}"],
                                  capture_output=True)
            if proc.returncode != 0:
                return None
            (src / name).write_bytes(proc.stdout)
    return _build_lib(src, BUILD / "libatd-v1-bench.so")


# ------------------------------------------------------------------------------------ ctypes


class TypeTraitsCpu(ctypes.Structure):
    # ggml/include/ggml-cpu.h: struct ggml_type_traits_cpu
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


FromFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class Libs:
    def __init__(self):
        bindir = ggml_libs()
        self.base = ctypes.CDLL(str(bindir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        self.cpu = ctypes.CDLL(str(bindir / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
        self.cpu.ggml_cpu_init()
        self.cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(TypeTraitsCpu)
        self.cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        self.base.ggml_row_size.restype = ctypes.c_size_t
        self.base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        self.base.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                  ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.atd = self._atd(atd_lib())
        self.atd.quantize_row_atd_q8_64.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        v1 = atd_v1_lib()
        self.v1 = self._atd(v1) if v1 else None
        if self.v1 is not None:
            self.v1.atd_quantize_row_q8_0_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]

    @staticmethod
    def _atd(path: Path):
        lib = ctypes.CDLL(str(path))
        vp, i, l_, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_size_t
        fp = ctypes.POINTER(ctypes.c_float)
        lib.bench_atd.restype = ctypes.c_double
        lib.bench_atd.argtypes = [i, vp, sz, l_, vp, i, i, i, l_, fp]
        lib.bench_ggml.restype = ctypes.c_double
        lib.bench_ggml.argtypes = [vp, i, vp, sz, l_, vp, l_, fp]
        if hasattr(lib, "atd_gemv"):  # not in the format-1 library
            lib.bench_gemv.restype = ctypes.c_double
            lib.bench_gemv.argtypes = [i, vp, sz, l_, vp, i, i, l_, fp]
            lib.bench_mm.restype = ctypes.c_double
            lib.bench_mm.argtypes = [i, vp, sz, i, vp, sz, i, i, i, i, l_, fp, vp]
            lib.atd_mul_mat_scratch_size.restype = sz
            lib.atd_mm_act_row_size.restype = sz
            lib.atd_mm_act_row_size.argtypes = [i, ctypes.c_int64]
            lib.quantize_row_atd_q8_64mm.argtypes = [vp, vp, ctypes.c_int64]
        lib.atd_path_available.argtypes = [i]
        lib.atd_dot_set_variant.argtypes = [i, i]
        lib.atd_quantize_row_q8_K_ref.argtypes = [vp, vp, ctypes.c_int64]
        return lib

    def default_variant(self, path: int, lib=None) -> int:
        """The variant the path runs by default in lib (default: this tree's kernels; AVX2: VNNI where the
        CPU has it), 0 for paths without variants."""
        lib = lib or self.atd
        for v in {PATH_AVX2: (2, 3, 1), PATH_AVX512: (3, 2, 1)}.get(path, ()):
            if lib.atd_dot_set_variant(path, v):
                lib.atd_dot_set_variant(path, 0)
                return v
        return 0

    def variant(self, path: int, lib=None) -> str:
        """The name of the variant the path runs by default in lib ("" for paths without variants)."""
        v = self.default_variant(path, lib)
        return VARIANT_NAMES[(path, v)] if v else ""


def ptr(a: np.ndarray) -> int:
    return a.ctypes.data


# ------------------------------------------------------------------------------------ data


def tile(chunk: np.ndarray, total_bytes: int, row_bytes: int) -> tuple[np.ndarray, int]:
    """Repeat chunk (whole rows) into >= total_bytes; returns (buffer, nrows)."""
    nrows = -(-total_bytes // row_bytes)
    reps = -(-nrows * row_bytes // chunk.size)
    buf = np.empty(reps * chunk.size, dtype=np.uint8)
    buf.reshape(reps, chunk.size)[:] = chunk
    return buf[: nrows * row_bytes], nrows


def atd_chunk(rng, planes: int, block: int, rows: int) -> np.ndarray:
    """rows x ROW weights of valid random ATD blocks (scales ~ N(0, 0.02), trits uniform)."""
    nb = rows * ROW // block
    trits = rng.integers(-1, 2, (nb, planes, block)).astype(np.int8)
    scales = (rng.standard_normal((nb, planes)) * 0.02).astype(np.float16)
    return gguf_types.pack_blocks(trits, scales).reshape(-1)


def atd_v1_chunk(rng, planes: int, block: int, rows: int) -> np.ndarray:
    """The same for format 1: {fp16 d[N]; u8 qs[N][B/4]} with 2-bit codes 0..2 (any layout of
    valid codes times the same work)."""
    nb = rows * ROW // block
    codes = rng.integers(0, 3, (nb, planes, block // 4, 4)).astype(np.uint8)
    qs = codes[..., 0] | codes[..., 1] << 2 | codes[..., 2] << 4 | codes[..., 3] << 6
    d = (rng.standard_normal((nb, planes)) * 0.02).astype("<f2").view(np.uint8).reshape(nb, 2 * planes)
    return np.concatenate([d, qs.reshape(nb, -1)], axis=1).reshape(-1)


def ggml_chunk(libs: Libs, rng, gtype: int, rows: int) -> np.ndarray:
    x = rng.standard_normal(rows * ROW).astype(np.float32) * 0.02
    row_bytes = libs.base.ggml_row_size(gtype, ROW)
    out = np.empty(rows * row_bytes, dtype=np.uint8)
    libs.base.ggml_quantize_chunk(gtype, ptr(x), ptr(out), 0, rows, ROW, None)
    return out


def activations(libs: Libs, rng, act_type: int | str, ggml_from_float: int | None = None) -> np.ndarray:
    """One activation row: ggml's from_float, or q8_K / atd_q8_64 / (format-1) q8_0 from the ATD libraries."""
    x = rng.standard_normal(ROW).astype(np.float32)
    nbytes = {GGML_TYPE_Q8_K: ROW // 256 * 292, "atd_q8_64": ROW // 64 * 112}.get(act_type, ROW // 32 * 34)
    y = np.zeros(nbytes + 64, dtype=np.uint8)
    if ggml_from_float:
        FromFloat(ggml_from_float)(ptr(x), ptr(y), ROW)
    elif act_type == GGML_TYPE_Q8_K:
        libs.atd.atd_quantize_row_q8_K_ref(ptr(x), ptr(y), ROW)
    elif act_type == "atd_q8_64":
        libs.atd.quantize_row_atd_q8_64(ptr(x), ptr(y), ROW)
    else:
        libs.v1.atd_quantize_row_q8_0_ref(ptr(x), ptr(y), ROW)
    return y


# ------------------------------------------------------------------------------------ timing
#
# Other processes may share this machine, so every kernel is timed in alternation with the TQ1_0
# reference (run k, run TQ1_0, run k, ...), best of each: the ratio compares like with like even
# when the load changes between kernels.


def calibrate(run, target_s: float) -> int:
    """reps so that run(reps) takes about target_s."""
    reps = 1
    while True:
        t = run(reps)
        if t >= target_s * 0.5 or reps >= 1 << 30:
            return reps
        reps = max(reps * 2, int(reps * target_s / max(t, 1e-9)))


def paired_best(run_k, run_ref, runs: int, target_s: float | None) -> tuple[float, float]:
    """Best seconds per call of run_k and run_ref, alternating; target_s None: one call per run."""
    rk = calibrate(run_k, target_s) if target_s else 1
    rr = calibrate(run_ref, target_s) if target_s else 1
    bk = br = float("inf")
    for _ in range(runs):
        bk = min(bk, run_k(rk) / rk)
        br = min(br, run_ref(rr) / rr)
    return bk, br


class Kernel:
    """One kernel: in-cache row and DRAM matrix, timed by the C loops of HELPER_C."""

    def __init__(self, libs, chunk, row_bytes, y, fn=None, planes=0, block=0, path=0, lib=None):
        self.libs, self.chunk, self.row_bytes, self.y = libs, chunk, row_bytes, y
        self.lib = lib or libs.atd  # the ATD library (format 2, or format 1)
        self.fn, self.planes, self.block, self.path = fn, planes, block, path
        self.buf, self.nrows = None, 0
        self.out = ctypes.c_float()

    def _call(self, x, nrows, reps):
        if self.fn is not None:
            return self.libs.atd.bench_ggml(self.fn, ROW, ptr(x), self.row_bytes, nrows, ptr(self.y), reps,
                                            ctypes.byref(self.out))
        return self.lib.bench_atd(ROW, ptr(x), self.row_bytes, nrows, ptr(self.y), self.planes, self.block,
                                  self.path, reps, ctypes.byref(self.out))

    def cache(self, reps):
        return self._call(self.chunk, 1, reps)

    def dram(self, reps):
        return self._call(self.buf, self.nrows, reps)

    def alloc(self, total_bytes):
        self.buf, self.nrows = tile(self.chunk, total_bytes, self.row_bytes)

    def free(self):
        self.buf, self.nrows = None, 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="in-cache only, fewer runs, no file written")
    ap.add_argument("--dram-mb", type=int, default=512, help="weight bytes of the DRAM matrix (default 512)")
    ap.add_argument("--dram-runs", type=int, default=6, help="passes over the DRAM matrix, best taken")
    ap.add_argument("--cache-runs", type=int, default=300, help="in-cache runs (~2 ms each), best taken")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench-kernels.md")
    args = ap.parse_args()

    libs = Libs()
    rng = np.random.default_rng(0)
    dram = not args.quick
    cache_runs = 30 if args.quick else args.cache_runs
    dram_bytes = args.dram_mb << 20

    def ggml_kernel(gtype):
        tr = libs.cpu.ggml_get_type_traits_cpu(gtype).contents
        y = activations(libs, rng, tr.vec_dot_type, tr.from_float)
        return Kernel(libs, ggml_chunk(libs, rng, gtype, 64), libs.base.ggml_row_size(gtype, ROW), y, fn=tr.vec_dot)

    ref = ggml_kernel(GGML_TYPE_TQ1_0)
    if dram:
        ref.alloc(dram_bytes)
    rows = []  # (kernel, path, planes, bpw, cache Gw/s, TQ1_0 cache Gw/s, DRAM Gw/s, TQ1_0 DRAM Gw/s)

    def measure(name, path, planes, bpw, k: Kernel, scalar=False):
        ck, cr = paired_best(k.cache, ref.cache, max(5, cache_runs // 10) if scalar else cache_runs, 0.002)
        c, c_ref = ROW / ck * 1e-9, ROW / cr * 1e-9
        d = d_ref = None
        if dram:
            k.alloc(dram_bytes)
            dk, dr = paired_best(k.dram, ref.dram, 1 if scalar else args.dram_runs, None)
            d, d_ref = k.nrows * ROW / dk * 1e-9, ref.nrows * ROW / dr * 1e-9
            k.free()
        rows.append((name, path, planes, bpw, c, c_ref, d, d_ref))
        pn = path if isinstance(path, str) else PATH_NAMES[path]
        print(f"  {name:11s} {pn:8s} {c:7.1f} Gw/s in cache (TQ1_0 {c_ref:.1f})"
              + (f", DRAM {d:6.2f} (TQ1_0 {d_ref:.2f})" if dram else ""), file=sys.stderr)

    print("kernels, each timed alternately with ggml TQ1_0 ...", file=sys.stderr)
    for gtype, gname in ((GGML_TYPE_TQ1_0, "TQ1_0"), (GGML_TYPE_TQ2_0, "TQ2_0"), (GGML_TYPE_Q4_0, "Q4_0")):
        measure(gname, "ggml", 1, libs.base.ggml_row_size(gtype, ROW) * 8 / ROW, ggml_kernel(gtype))

    paths = [p for p in (PATH_SCALAR, PATH_AVX2, PATH_AVX512, PATH_NEON) if libs.atd.atd_path_available(p)]
    simd = [p for p in paths if p != PATH_SCALAR]
    for block in (256, 64):
        for planes in (1, 2, 3, 4):
            name = f"ATD{planes}" + ("_64" if block == 64 else "")
            t = gguf_types.atd_type(name)
            chunk = atd_chunk(rng, planes, block, 64)
            y = activations(libs, rng, GGML_TYPE_Q8_K if block == 256 else "atd_q8_64")
            for path in paths:
                k = Kernel(libs, chunk, ROW // block * t.type_size, y, planes=planes, block=block, path=path)
                measure(name, path, planes, t.bpw, k, scalar=path == PATH_SCALAR)
                if path == PATH_AVX512:
                    # the decoders of AVX-512 CPUs without GFNI or VBMI next to the default one
                    for variant in range(libs.default_variant(path) - 1, 0, -1):
                        libs.atd.atd_dot_set_variant(path, variant)
                        measure(name, f"AVX-512 ({VARIANT_NAMES[(path, variant)]})", planes, t.bpw,
                                Kernel(libs, chunk, ROW // block * t.type_size, y, planes=planes, block=block,
                                       path=path))
                    libs.atd.atd_dot_set_variant(path, 0)
            if libs.v1 is not None and planes in (2, 3):  # format 1 (2 bits per trit), same run
                v1_bytes = planes * (2 + block // 4)
                y1 = activations(libs, rng, GGML_TYPE_Q8_K if block == 256 else GGML_TYPE_Q8_0)
                for path in simd:
                    k = Kernel(libs, atd_v1_chunk(rng, planes, block, 64), ROW // block * v1_bytes, y1,
                               planes=planes, block=block, path=path, lib=libs.v1)
                    v = libs.variant(path, libs.v1)  # the format-1 tree has no GFNI variant
                    measure(name + " v1", PATH_NAMES[path] + (f" ({v})" if v else ""), planes, v1_bytes * 8 / block, k)

    batched = measure_batched(libs, rng, paths, quick=args.quick)
    md = report(libs, rows, dram, args) + batched
    print(md)
    if not args.quick:
        args.out.write_text(md)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def best_seconds(run, runs: int, target_s: float = 0.02) -> float:
    reps = calibrate(run, target_s)
    return min(run(reps) / reps for _ in range(runs))


def measure_batched(libs: Libs, rng, paths, quick: bool) -> str:
    """The kernels of more than one row: atd_gemv (one activation row, SmolLM2's 576-wide rows, 4 rows per
    step on AVX-512) against vec_dot row by row, and the batched matmul against vec_dot on every pair."""
    lib, runs = libs.atd, 3 if quick else 10
    out = ctypes.c_float()
    lines = ["", "## Several rows at once", "",
             "Single thread, in cache (best of several runs). **gemv**: one activation row against 1536 weight rows "
             "of 576 (SmolLM2's shape): `atd_gemv`, which takes four rows per step on AVX-512 and two on AVX2 "
             "(64 family), bit-equal to vec_dot,, next to `atd_vec_dot` row by row. **batched**: 512 weight rows x 64 "
             "activation rows, rows of 4096 (256-blocks) or 576 (64-blocks): `atd_mul_mat`, in G weight x "
             "activation products per second, next to vec_dot on every pair (the path ggml takes without it).", "",
             "| kernel | path | gemv Gw/s | vec_dot row by row Gw/s | batched G/s | batched / vec_dot |",
             "|---|---|---|---|---|---|"]
    for block in (256, 64):
        for planes in (1, 2, 3, 4):
            name = f"ATD{planes}" + ("_64" if block == 64 else "")
            t = gguf_types.atd_type(name)
            n = ROW if block == 256 else 576
            nb, rows_g = n // block, 1536
            x = gguf_types.pack_blocks(rng.integers(-1, 2, (rows_g * nb, planes, block)).astype(np.int8),
                                       (rng.standard_normal((rows_g * nb, planes)) * 0.02).astype(np.float16)).reshape(-1)
            row_bytes = nb * t.type_size
            xf = rng.standard_normal(n).astype(np.float32)
            yv = np.zeros(nb * 292 + 64, dtype=np.uint8)
            if block == 256:
                lib.atd_quantize_row_q8_K_ref(ptr(xf), ptr(yv), n)
            else:
                lib.quantize_row_atd_q8_64(ptr(xf), ptr(yv), n)
            outv = np.zeros(rows_g, dtype=np.float32)
            nr, nc = 512, 64
            by = lib.atd_mm_act_row_size(block, n)
            ym = np.zeros(by * nc + 64, dtype=np.uint8)
            for c in range(nc):
                xc = rng.standard_normal(n).astype(np.float32)
                if block == 256:
                    lib.atd_quantize_row_q8_K_ref(ptr(xc), ptr(ym) + c * by, n)
                else:
                    lib.quantize_row_atd_q8_64mm(ptr(xc), ptr(ym) + c * by, n)
            scratch = np.zeros(lib.atd_mul_mat_scratch_size(), dtype=np.uint8)
            outm = np.zeros(nr * nc, dtype=np.float32)
            for path in paths:
                if path == PATH_SCALAR and block == 64 and planes > 1:
                    continue  # slow and says nothing new
                lib.atd_set_path(path)
                g = v = "-"
                if block == 64 or path != PATH_SCALAR:
                    tg = best_seconds(lambda r: lib.bench_gemv(n, ptr(x), row_bytes, rows_g, ptr(yv), planes, block, r,
                                                               outv.ctypes.data_as(ctypes.POINTER(ctypes.c_float))), runs)
                    tv = best_seconds(lambda r: lib.bench_atd(n, ptr(x), row_bytes, rows_g, ptr(yv), planes, block, path,
                                                              r, ctypes.byref(out)), runs)
                    g, v = f"{rows_g * n / tg * 1e-9:.1f}", f"{rows_g * n / tv * 1e-9:.1f}"
                tm = best_seconds(lambda r: lib.bench_mm(n, ptr(x), row_bytes, nr, ptr(ym), by, nc, planes, block,
                                                         path, r, outm.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                                         ptr(scratch)), 3 if path == PATH_SCALAR else runs)
                rate = nr * nc * n / tm * 1e-9
                lines.append(f"| {name} | {PATH_NAMES[path]} | {g} | {v} | {rate:.1f} | "
                             + (f"{rate / float(v):.1f}x" if v != "-" else "-") + " |")
                print(f"  {name:8s} {PATH_NAMES[path]:8s} gemv {g} (vec_dot {v}) batched {nr * nc * n / tm * 1e-9:.1f}",
                      file=sys.stderr)
            lib.atd_set_path(0)
    lines += ["", "Without the batched kernels ggml runs vec_dot on every (weight row, activation row) pair, at the "
              "row-by-row rate: every weight is decoded again for every activation row. The batched kernels decode "
              "each block once per chunk into int8 and then do one int8 multiply-add per weight and activation "
              "(docs/llama-plugin.md)."]
    return "\n".join(lines) + "\n"


def machine() -> str:
    info = {}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            key, _, val = line.partition(":")
            info.setdefault(key.strip(), val.strip())
    except OSError:
        pass
    model = info.get("Model name", platform.processor() or platform.machine())
    if "CPU family" in info:
        model += f" (family {info['CPU family']}, model {info.get('Model', '?')})"
    return f"{model}; {os.cpu_count()} logical CPUs; {platform.system()} {platform.machine()}"


def report(libs: Libs, rows, dram: bool, args) -> str:
    def pathname(path):
        if isinstance(path, str):
            return path
        v = libs.variant(path)
        return PATH_NAMES[path] + (f" ({v})" if v else "")

    tq = next(r for r in rows if r[0] == "TQ1_0")
    lines = [
        "# vec_dot kernel throughput: ATD vs ggml TQ1_0 / TQ2_0 / Q4_0 and the format-1 ATD kernels",
        "",
        "Generated by `scripts/bench_kernels.py`: single thread, one q8 activation row, rows of 4096 weights.",
        "",
        f"* Machine: {machine()}.",
        f"* ATD paths: {', '.join(pathname(p) for p in PATH_NAMES if libs.atd.atd_path_available(p))}"
        " (`ggml-ext/atd-dot.c`, gcc -O3, runtime dispatch); ggml: the pinned llama.cpp's own x86 kernels"
        " (built with AVX2/AVX-512/VNNI flags, no -march=native). Rows marked v1 are the format-1 kernels"
        f" (2 bits per trit) of commit {V1_COMMIT}, compiled the same way, measured in the same run.",
        "* **in cache**: one row dotted repeatedly, best of many ~2 ms runs;"
        + (f" **DRAM**: one pass over a {args.dram_mb} MB matrix of weight bytes, the whole pass timed,"
           f" best of {args.dram_runs} (scalar: 1)." if dram else " DRAM not measured (--quick)."),
        "* Gw/s = Gweights/s of the weight row. **per plane** = Gw/s x N (ATD decodes N ternary planes per weight)."
        " **vs TQ1_0** = per-plane rate / the TQ1_0 rate measured alternately with that kernel (the machine may"
        " be shared, so every kernel is paired with its own TQ1_0 runs). DRAM GB/s = weight bytes per second.",
        f"* TQ1_0 reference over all pairings: in cache {max(r[5] for r in rows):.1f} Gw/s"
        + (f", DRAM {max(r[7] for r in rows):.2f} Gw/s ({max(r[7] for r in rows) * tq[3] / 8:.1f} GB/s)" if dram
           else "") + ".",
        "",
        "| kernel | path | bpw | in cache Gw/s | per plane | vs TQ1_0 | DRAM Gw/s | DRAM GB/s | DRAM per plane | vs TQ1_0 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, path, planes, bpw, c, c_ref, d, d_ref in rows:
        dcols = ["-"] * 4
        if d:
            dcols = [f"{d:.2f}", f"{d * bpw / 8:.1f}", f"{d * planes:.2f}", f"{d * planes / d_ref:.2f}"]
        lines.append(f"| {name} | {pathname(path)} | {bpw:.4g} | {c:.1f} | {c * planes:.1f} | {c * planes / c_ref:.2f} | "
                     + " | ".join(dcols) + " |")
    lines += ["", NOTES]
    return "\n".join(lines)


NOTES = """## Notes

* **Exact results.** Every ATD path returns the same float bits as the scalar reference: the integer
  plane sums are exact, and the float combination is a fixed sequence of explicit fused multiply-adds
  (per block: a = fma chain over the planes of alpha_i * isum_i, then lane = fma(d_y, a, lane) with block b
  in lane b % 16; the 16 lanes added pairwise at the end), so neither FMA contraction nor vector width
  can change a bit. The SIMD paths take 4 blocks per step (the integer sums of 4 blocks reduced at once,
  their float parts in one float32x4), which is the scalar loop's order.
* **Decoding base-3 bytes** (format 2): AVX-512 with VBMI looks the digits up: two 256-entry tables (digits
  0..3 packed in 2-bit fields, and digit 4), each a vpermi2b pair on the low 7 bits blended by the top
  bit, then a shift and an and per digit (with GFNI, one gf2p8affineqb per digit instead: the default
  where the CPU has it; the "VBMI tables" rows are without). Without VBMI (the "mulhi decoder" rows) a
  byte b sits in a 16-bit lane as b << 8: mulhi(lane, 3) is its top digit and lane * 3 moves to the
  next one. AVX2 with vpdpbusd skips decoding for the 256-blocks: with x_{k+1} = 3 x_k mod 256 (two
  byte adds) the code of digit k is (3 x_k - x_{k+1}) / 256, so two vpdpbusd on the raw bytes give the
  plane sum of a digit.
* **B = 64** (ATD*_64 against atd_q8_64): the activations come in 64-blocks stored by digit (16 bytes per
  digit, zeros in the lanes no trit meets) with four scale groups, the 4-byte columns of that layout, and
  their sums precomputed; AVX-512 decodes four blocks per zmm (vec_dot: four consecutive blocks of a row,
  the digit groups gathered by a 128-bit lane transpose; gemv, the path of token generation in the
  patched llama.cpp: block b of four rows, the activations broadcast). One vpdpbusd accumulator per plane
  holds the four groups' sums, so a plane costs the 256-blocks' five vpdpbusd; what keeps its rate below
  theirs is the work per 64-block (activation loads, plane scales, a float step) and the gather of four
  rows' planes.
* **DRAM**: weight rows stream from memory once per token; vec_dot prefetches 2 KiB ahead, the gemv
  kernels the same block 8 rows later (their masked and unaligned plane loads alone leave the hardware
  prefetchers behind; docs/llama-plugin.md). Rows near the highest
  GB/s in the table are memory-bound; DRAM bandwidth is shared with whatever else runs on the machine,
  so DRAM columns are noisier than in-cache ones.
* The TQ1_0 row's own "vs TQ1_0" (the kernel paired with itself) shows the measurement noise.
* ggml is built with `GGML_AVX_VNNI` only when the CPU has AVX-VNNI: with it ggml's Q4_0 kernel
  uses the VEX `vpdpbusd`, an illegal instruction on CPUs (such as AMD Zen 4) that have AVX512-VNNI
  but not AVX-VNNI.
"""


if __name__ == "__main__":
    raise SystemExit(main())
