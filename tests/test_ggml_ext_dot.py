"""ATD x q8 dot-product kernels of ggml-ext/atd-dot.c.

* the C driver ggml-ext/tests/atd_dot_test.c, built with ASan/UBSan together with every
  ggml-ext/*.c file: every available path (and variant) equals the scalar path bit for bit, and
  the scalar path equals a double-precision dequantize.dot within tolerance;
* the same through the cffi module gguf_types._atd_c, against gguf_types.dequantize;
* on a CPU that has AVX2 / AVX-512 (VNNI) / NEON the matching path must be available and
  selected, so a build that silently falls back to scalar fails here.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import gguf_types

ROOT = Path(__file__).resolve().parent.parent
EXT = ROOT / "ggml-ext"

PATH_AUTO, PATH_SCALAR, PATH_AVX2, PATH_AVX512, PATH_NEON = range(5)
PATH_NAMES = {PATH_SCALAR: "scalar", PATH_AVX2: "avx2", PATH_AVX512: "avx512", PATH_NEON: "neon"}
MAX_VARIANTS = 3

Q8_K = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])
# the 64 family's activations: a scale and a sum per 32, six 16-byte groups: digit k of byte j (element
# 13k + j) in group k, except digit 2, split at element 32 into groups 2 (j < 6) and 3; then 3, 4 -> 4, 5
ATD_Q8_64 = np.dtype([("d", "<f4", 2), ("sum", "<i4", 2), ("qs", "i1", (6, 16))])
ELEMENT_LANES = np.array([16 * ((e // 13) if e < 32 else (e // 13) + 1) + e % 13 for e in range(64)])
assert Q8_K.itemsize == 292 and ATD_Q8_64.itemsize == 112

TYPES = [(n, b) for b in (256, 64) for n in (1, 2, 3, 4)]


# ------------------------------------------------------------------------------------ C driver


def test_c_driver_asan(tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found")
    exe = tmp_path / "atd_dot_test"
    sources = sorted(str(p) for p in EXT.glob("*.c")) + [str(EXT / "tests" / "atd_dot_test.c")]
    cmd = [gcc, "-std=c11", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
           "-I", str(EXT), *sources, "-o", str(exe), "-lm", "-pthread"]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
    run = subprocess.run([str(exe), "2"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.endswith(" 0 failed"), run.stdout + run.stderr
    assert int(last.split()[0]) > 1000, last


# ------------------------------------------------------------------------------------ cffi


@pytest.fixture(scope="module")
def atd():
    from gguf_types import _atd_c  # built by `pip install -e .` (ggml-ext/build_ffi.py)

    # the internal variant hook and the ggml-style wrappers are exported by the same shared
    # object but not declared in its cdef: open it again (same handle, same state)
    import cffi

    ffi2 = cffi.FFI()
    wrappers = [f"atd{n}_q8_K" for n in range(1, 5)] + [f"atd{n}_64_atd_q8_64" for n in range(1, 5)]
    ffi2.cdef("int atd_dot_set_variant(int path, int variant);\n" + "".join(
        f"void ggml_vec_dot_{w}(int n, float * s, size_t bs, const void * vx, size_t bx, "
        f"const void * vy, size_t by, int nrc);\n" for w in wrappers))
    lib2 = ffi2.dlopen(_atd_c.__file__)
    yield _atd_c.lib, _atd_c.ffi, lib2, ffi2
    for p in PATH_NAMES:
        lib2.atd_dot_set_variant(p, 0)
    _atd_c.lib.atd_set_path(PATH_AUTO)


def _random_row(rng, n_planes, block, n, kind="random"):
    """Packed ATD bytes of one row of n weights (gguf_types.pack_blocks)."""
    nb = n // block
    if kind == "extreme":
        trits = np.where(rng.random((nb, n_planes, block)) < 0.5, -1, 1).astype(np.int8)
    elif kind == "sparse":
        trits = np.where(rng.random((nb, n_planes, block)) < 0.1,
                         rng.integers(-1, 2, (nb, n_planes, block)), 0).astype(np.int8)
    else:
        trits = rng.integers(-1, 2, (nb, n_planes, block)).astype(np.int8)
    scales = (rng.standard_normal((nb, n_planes)) * 0.05).astype(np.float16)
    scales[rng.random((nb, n_planes)) < 0.05] = 0.0
    if kind == "extreme":
        scales[:] = np.float16(rng.choice([-1.0, 1.0]) * 60000.0)
    return gguf_types.pack_blocks(trits, scales).reshape(-1)


def _activations(lib, ffi, rng, block, n, kind="random"):
    """q8 activations (cdata, numpy view, dequantized float64)."""
    x = (rng.standard_normal(n) * np.exp(rng.standard_normal() * 2)).astype(np.float32)
    xp = ffi.cast("const float *", ffi.from_buffer(x))
    if block == 256:
        y = ffi.new("block_q8_K[]", n // 256)
        lib.atd_quantize_row_q8_K_ref(xp, y, n)
        arr = np.frombuffer(ffi.buffer(y), dtype=Q8_K)
        if kind == "extreme":  # full int8 range incl. -128, consistent bsums
            arr["qs"] = np.where(rng.random(arr["qs"].shape) < 0.5, -128, 127)
            arr["bsums"] = arr["qs"].reshape(-1, 16, 16).astype(np.int32).sum(-1)
        act = (arr["d"].astype(np.float64)[:, None] * arr["qs"]).reshape(-1)
    else:
        y = ffi.new("block_atd_q8_64[]", n // 64)
        lib.quantize_row_atd_q8_64(xp, y, n)
        arr = np.frombuffer(ffi.buffer(y), dtype=ATD_Q8_64)
        qs = arr["qs"].reshape(-1, 96)
        if kind == "extreme":  # full int8 range incl. -128 in the 64 element lanes, consistent sums
            qs[:, ELEMENT_LANES] = np.where(rng.random((qs.shape[0], 64)) < 0.5, -128, 127)
            arr["sum"] = qs[:, ELEMENT_LANES].reshape(-1, 2, 32).astype(np.int32).sum(-1)
        # docs/atd-format.md §8: element e at ELEMENT_LANES[e], scale d[e // 32]
        act = (np.repeat(arr["d"].astype(np.float64), 32, axis=1) * qs[:, ELEMENT_LANES]).reshape(-1)
    return y, x, act


def _dot(lib, ffi, n, wbytes, y, planes, block, path):
    s = ffi.new("float *")
    lib.atd_vec_dot_path(n, s, ffi.from_buffer(wbytes), y, planes, block, path)
    return np.float32(s[0])


def _runnable(lib, lib2):
    """(path, variant) pairs this build and CPU can run; variant 0 = the path's default."""
    out = []
    for p in PATH_NAMES:
        if not lib.atd_path_available(p):
            continue
        out.append((p, 0))
        for v in range(1, MAX_VARIANTS + 1):
            if lib2.atd_dot_set_variant(p, v):
                out.append((p, v))
        lib2.atd_dot_set_variant(p, 0)
    return out


def _bits(f):
    return np.float32(f).view(np.uint32)


@pytest.mark.parametrize("planes,block", TYPES, ids=[f"N{n}_B{b}" for n, b in TYPES])
def test_paths_equal_scalar_and_dequantized_dot(atd, planes, block):
    lib, ffi, lib2, _ = atd
    rng = np.random.default_rng(1000 * planes + block)
    runnable = _runnable(lib, lib2)
    tname = f"ATD{planes}" + ("_64" if block == 64 else "")
    counts = (1, 2, 3, 4, 5, 7, 8, 13, 16) if block == 256 else (1, 2, 3, 5, 8, 9, 18, 67)
    for nblocks in counts:
        for kind in ("random", "sparse", "extreme"):
            n = nblocks * block
            w = _random_row(rng, planes, block, n, kind)
            y, _, act = _activations(lib, ffi, rng, block, n, kind)
            ref = _dot(lib, ffi, n, w, y, planes, block, PATH_SCALAR)

            wdq = gguf_types.dequantize(w.reshape(1, -1), tname).reshape(-1).astype(np.float64)
            exact = float(np.dot(wdq, act))
            mag = float(np.abs(wdq * act).sum())
            assert abs(float(ref) - exact) <= 4e-7 * mag + 1e-30, (tname, n, kind, float(ref), exact)

            for p, v in runnable:
                lib2.atd_dot_set_variant(p, v)
                got = _dot(lib, ffi, n, w, y, planes, block, p)
                lib2.atd_dot_set_variant(p, 0)
                assert _bits(got) == _bits(ref), (tname, n, kind, PATH_NAMES[p], v, float(got), float(ref))


def test_against_fitted_weights(atd):
    """Real fitted rows (gguf_types.quantize) and activations from real floats."""
    lib, ffi, lib2, _ = atd
    rng = np.random.default_rng(7)
    for planes, block in TYPES:
        tname = f"ATD{planes}" + ("_64" if block == 64 else "")
        n = 2304 if block == 256 else 576
        wf = rng.standard_normal((1, n)).astype(np.float32) * 0.02
        w = np.asarray(gguf_types.quantize(wf, tname)).reshape(-1)
        y, x, act = _activations(lib, ffi, rng, block, n)
        wdq = gguf_types.dequantize(w.reshape(1, -1), tname).reshape(-1).astype(np.float64)
        ref = _dot(lib, ffi, n, w, y, planes, block, PATH_SCALAR)
        mag = float(np.abs(wdq * act).sum())
        assert abs(float(ref) - float(np.dot(wdq, act))) <= 4e-7 * mag
        # and close to the float dot (activation quantization error only)
        assert abs(float(ref) - float(np.dot(wdq, x.astype(np.float64)))) <= 0.02 * mag
        for p, v in _runnable(lib, lib2):
            lib2.atd_dot_set_variant(p, v)
            assert _bits(_dot(lib, ffi, n, w, y, planes, block, p)) == _bits(ref)
            lib2.atd_dot_set_variant(p, 0)


def test_wrappers_and_set_path(atd):
    lib, ffi, lib2, _ = atd
    rng = np.random.default_rng(3)
    best = lib.atd_selected_path()
    for planes, block in TYPES:
        n = 8 * block
        w = _random_row(rng, planes, block, n)
        y, _, _ = _activations(lib, ffi, rng, block, n)
        ref = _dot(lib, ffi, n, w, y, planes, block, PATH_SCALAR)
        name = f"atd{planes}_q8_K" if block == 256 else f"atd{planes}_64_atd_q8_64"
        s = ffi.new("float *")
        getattr(lib2, f"ggml_vec_dot_{name}")(n, s, 0, ffi.from_buffer(w), 0, y, 0, 1)
        assert _bits(s[0]) == _bits(ref)
        lib.atd_vec_dot(n, s, ffi.from_buffer(w), y, planes, block)
        assert _bits(s[0]) == _bits(ref)
    for p in PATH_NAMES:
        lib.atd_set_path(p)
        assert lib.atd_selected_path() == (p if lib.atd_path_available(p) else best)
    lib.atd_set_path(PATH_AUTO)
    assert lib.atd_selected_path() == best


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def test_simd_paths_available_where_the_cpu_has_them(atd):
    """No silent fallback: a CPU with AVX2 / AVX-512 VNNI / NEON gets that path, and the best one runs."""
    lib, _, _, _ = atd
    flags = _cpu_flags()
    machine = platform.machine().lower()
    expected = []
    if machine in ("x86_64", "amd64"):
        if {"avx2", "fma", "f16c"} <= flags:
            expected.append(PATH_AVX2)
        if {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
            expected.append(PATH_AVX512)
    elif machine in ("aarch64", "arm64"):
        expected.append(PATH_NEON)
    if not expected:
        pytest.skip(f"no SIMD path expected on {machine}")
    for p in expected:
        assert lib.atd_path_available(p), f"{PATH_NAMES[p]} not available on a CPU with {PATH_NAMES[p]}"
    assert lib.atd_selected_path() == max(expected), "dispatch does not pick the best path"


def test_simd_paths_are_faster_than_scalar(atd):
    """A SIMD path that is really a scalar loop would pass the equality tests; timing catches it."""
    lib, ffi, _, _ = atd
    simd = [p for p in (PATH_AVX2, PATH_AVX512, PATH_NEON) if lib.atd_path_available(p)]
    if not simd:
        pytest.skip("no SIMD path")
    rng = np.random.default_rng(5)
    n = 4096
    for planes, block in ((1, 256), (3, 256), (2, 64)):
        w = _random_row(rng, planes, block, n)
        y, _, _ = _activations(lib, ffi, rng, block, n)
        wp = ffi.from_buffer(w)
        s = ffi.new("float *")

        def best_time(path, reps=50):
            best = float("inf")
            for _ in range(15):
                t0 = time.perf_counter()
                for _ in range(reps):
                    lib.atd_vec_dot_path(n, s, wp, y, planes, block, path)
                best = min(best, time.perf_counter() - t0)
            return best

        t_scalar = best_time(PATH_SCALAR)
        for p in simd:
            t = best_time(p)
            assert t * 2.0 < t_scalar, (PATH_NAMES[p], planes, block, t, t_scalar)
