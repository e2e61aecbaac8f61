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
# the 64 family's activations (docs/atd-format.md §8): stored by digit, qs[k][j] = element 13k + j; four
# scale groups, element 13k + j in group j // 4, with a scale and a sum each
ATD_Q8_64 = np.dtype([("d", "<f4", 4), ("sum", "<i4", 4), ("qs", "i1", (5, 16))])
ELEMENT_LANES = np.array([16 * (e // 13) + e % 13 for e in range(64)])
ELEMENT_GROUPS = np.array([(e % 13) // 4 for e in range(64)])
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
    ffi2.cdef("int atd_dot_set_variant(int path, int variant);\nint atd_dot_variant_of(int path);\n" + "".join(
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


def _group_sums(q):
    """(blocks, 64) q in element order -> (blocks, 4) sums of the four scale groups"""
    return np.stack([q[:, ELEMENT_GROUPS == g].astype(np.int64).sum(-1) for g in range(4)], axis=-1)


def _quantize_groups_ref(x):
    """numpy's reading of the 64 family's activation rule over the last axis: d = max|x| / 127,
    q = nearest int of x / d clamped to +-127 (float32 arithmetic) -> (d, q)"""
    x = np.asarray(x, dtype=np.float32)
    d = (np.abs(x).max(-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(x * inv[..., None]), -127, 127).astype(np.int8)
    return d, q


def test_atd_q8_64_matches_numpy(atd):
    """quantize_row_atd_q8_64 against the rule of docs/atd-format.md §8, read independently: four scale
    groups per 64 (element 13k + j in group j // 4), stored by digit, zero in every other lane."""
    lib, ffi, _, _ = atd
    rng = np.random.default_rng(64)
    nb = 40
    x = (rng.standard_normal((nb, 64)) * np.exp(rng.standard_normal((nb, 1)) * 3)).astype(np.float32)
    x[3] = 0.0  # an all-zero block
    x[4, ELEMENT_GROUPS == 3] = 0.0  # an all-zero group
    x[5, 12] = 1e4  # an outlier: only its group's scale grows
    y = ffi.new("block_atd_q8_64[]", nb)
    lib.quantize_row_atd_q8_64(ffi.cast("const float *", ffi.from_buffer(x)), y, nb * 64)
    arr = np.frombuffer(ffi.buffer(y), dtype=ATD_Q8_64)
    qs = arr["qs"].reshape(nb, 80)
    for g in range(4):
        d_ref, q_ref = _quantize_groups_ref(x[:, ELEMENT_GROUPS == g])
        assert np.array_equal(arr["d"][:, g], d_ref), g
        assert np.array_equal(qs[:, ELEMENT_LANES[ELEMENT_GROUPS == g]], q_ref), g
        assert np.array_equal(arr["sum"][:, g], q_ref.astype(np.int64).sum(-1)), g
    others = np.setdiff1d(np.arange(80), ELEMENT_LANES)
    assert len(others) == 16 and (qs[:, others] == 0).all()
    assert arr["d"][5, 3] > 1e4 / 128 and (arr["d"][5, :3] < 1.0).all()
    # ggml-cpu's from_float (SIMD where the CPU has it) writes the same bytes, every row length
    for nblk in (1, 2, 7, nb):
        ys = ffi.new("block_atd_q8_64[]", nblk)
        lib.atd_quantize_row_q8_64(ffi.cast("const float *", ffi.from_buffer(x)), ys, nblk * 64)
        assert bytes(ffi.buffer(ys)) == bytes(ffi.buffer(y))[: nblk * ATD_Q8_64.itemsize], nblk


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
        qs = arr["qs"].reshape(-1, 80)
        if kind == "extreme":  # full int8 range incl. -128 in the 64 element lanes, consistent sums
            qs[:, ELEMENT_LANES] = np.where(rng.random((qs.shape[0], 64)) < 0.5, -128, 127)
            arr["sum"] = _group_sums(qs[:, ELEMENT_LANES])
        # element e at ELEMENT_LANES[e], scale d[ELEMENT_GROUPS[e]]
        act = (arr["d"].astype(np.float64)[:, ELEMENT_GROUPS] * qs[:, ELEMENT_LANES]).reshape(-1)
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


def _best_time(call, reps: int, rounds: int) -> float:
    """The fastest of `rounds` timings of `reps` calls (seconds)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        best = min(best, time.perf_counter() - t0)
    return best


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


def test_avx512_runs_the_best_decoder_the_cpu_has(atd):
    """Variant 3 (VBMI tables + GFNI fields) where the CPU has both, else 2 (VBMI), else 1 (mulhi)."""
    lib, _, lib2, _ = atd
    if not lib.atd_path_available(PATH_AVX512):
        pytest.skip("no AVX-512 path on this CPU")
    flags = _cpu_flags()
    expected = 3 if {"avx512vbmi", "gfni"} <= flags else 2 if "avx512vbmi" in flags else 1
    lib2.atd_dot_set_variant(PATH_AVX512, 0)
    assert lib2.atd_dot_variant_of(PATH_AVX512) == expected
    assert all(lib2.atd_dot_set_variant(PATH_AVX512, v) for v in range(1, expected + 1))
    lib2.atd_dot_set_variant(PATH_AVX512, 0)


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

        def best_time(path):
            return _best_time(lambda: lib.atd_vec_dot_path(n, s, wp, y, planes, block, path), 50, 15)

        t_scalar = best_time(PATH_SCALAR)
        for p in simd:
            t = best_time(p)
            assert t * 2.0 < t_scalar, (PATH_NAMES[p], planes, block, t, t_scalar)


# ------------------------------------------------------------------------------------ batched matmul
#
# ggml-ext/atd-mm.c (more than one activation row): each weight block is decoded once into int8 with one
# step per block, s_b = A_b / 127 where A_b = sum_i |alpha_i|, so every weight moves by at most
# A_b / 254, and a result differs from the exact dot of the decoded weights and activations by at most
# sum_b (A_b / 254) * sum_{e in b} |x_e|  plus float rounding; from the one-row vec_dot by that plus, for
# the 64 family, sum_e |w_e| |x_e - x'_e| (x': vec_dot's own rounding of the activations).

ATD_Q8_64MM = np.dtype([("d", "<f4", 2), ("bias", "<i4", 2), ("qs", "i1", 64)])
assert ATD_Q8_64MM.itemsize == 80


def _mm_activations(lib, ffi, rng, block, n, nc, extreme=False):
    """nc activation rows for the batched kernels and for vec_dot: (batched cdata, row bytes, vec_dot
    cdata list, dequantized float64 (nc, n) of each). The 256 family shares q8_K; the 64 family's batched
    kernels take a scale per 32 in natural order, vec_dot its four scale groups."""
    x = (rng.standard_normal((nc, n)) * np.exp(rng.standard_normal((nc, 1)) * 2)).astype(np.float32)
    if extreme:
        x[:, rng.integers(0, n, 3)] *= 1e3  # outliers
    by = int(lib.atd_mm_act_row_size(block, n))
    ybuf = ffi.new("char[]", by * nc)
    yv, act, act_vd = [], np.zeros((nc, n)), np.zeros((nc, n))
    for c in range(nc):
        xp = ffi.cast("const float *", ffi.from_buffer(x[c]))
        if block == 256:
            lib.atd_quantize_row_q8_K_ref(xp, ffi.cast("block_q8_K *", ybuf + c * by), n)
            arr = np.frombuffer(ffi.buffer(ybuf + c * by, by), dtype=Q8_K)
            act[c] = act_vd[c] = (arr["d"].astype(np.float64)[:, None] * arr["qs"]).reshape(-1)
            yv.append(ffi.cast("block_q8_K *", ybuf + c * by))
        else:
            lib.quantize_row_atd_q8_64mm(xp, ybuf + c * by, n)
            arr = np.frombuffer(ffi.buffer(ybuf + c * by, by), dtype=ATD_Q8_64MM)
            act[c] = (np.repeat(arr["d"].astype(np.float64), 32, axis=1) * arr["qs"]).reshape(-1)
            assert np.array_equal(arr["bias"], -128 * arr["qs"].reshape(-1, 2, 32).astype(np.int64).sum(-1))
            # a scale per 32 in natural order (numpy's reference of the rule)
            d_ref, q_ref = _quantize_groups_ref(x[c].reshape(-1, 2, 32))
            assert np.array_equal(arr["d"], d_ref.reshape(-1, 2)) and np.array_equal(arr["qs"], q_ref.reshape(-1, 64))
            y = ffi.new("block_atd_q8_64[]", n // 64)
            lib.quantize_row_atd_q8_64(xp, y, n)
            v = np.frombuffer(ffi.buffer(y), dtype=ATD_Q8_64)
            act_vd[c] = (v["d"].astype(np.float64)[:, ELEMENT_GROUPS] * v["qs"].reshape(-1, 80)[:, ELEMENT_LANES]).reshape(-1)
            yv.append(y)
    return ybuf, by, yv, act, act_vd


def _mm(lib, ffi, n, planes, block, w, nr, ybuf, by, nc, path):
    out = np.full((nc, nr + 3), -7.25, dtype=np.float32)  # strided columns, canaries after each
    scratch = ffi.new("char[]", lib.atd_mul_mat_scratch_size())
    lib.atd_mul_mat_path(n, planes, block, ffi.from_buffer(w), w.shape[1], nr, ybuf, by, nc,
                         ffi.cast("float *", ffi.from_buffer(out)), nr + 3, scratch, path)
    assert (out[:, nr:] == np.float32(-7.25)).all(), "wrote outside the output"
    return out[:, :nr]


def _mm_bound(w, tname, act):
    """Per (row, activation row): sum_b (A_b / 254) * sum_e |x_e|, and sum |w x| for the float slack."""
    t = gguf_types.atd_type(tname)
    nb = w.shape[1] // t.type_size
    blocks = w.reshape(w.shape[0], nb, t.type_size)
    alpha = np.abs(blocks[:, :, : 2 * t.planes].copy().view("<f2").astype(np.float64)).sum(-1)  # (nr, nb)
    absx = np.abs(act).reshape(act.shape[0], nb, t.block_size).sum(-1)  # (nc, nb)
    return (alpha / 254.0) @ absx.T  # (nr, nc)


def _check_batched(lib, ffi, lib2, rng, tname, w, nc, extreme=False):
    t = gguf_types.atd_type(tname)
    nr, n = w.shape[0], w.shape[1] // t.type_size * t.block_size
    ybuf, by, yv, act, act_vd = _mm_activations(lib, ffi, rng, t.block_size, n, nc, extreme)
    ref = _mm(lib, ffi, n, t.planes, t.block_size, w, nr, ybuf, by, nc, PATH_SCALAR)
    # every path and variant: the same bits
    for p, v in _runnable(lib, lib2):
        lib2.atd_dot_set_variant(p, v)
        got = _mm(lib, ffi, n, t.planes, t.block_size, w, nr, ybuf, by, nc, p)
        lib2.atd_dot_set_variant(p, 0)
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), (tname, nr, nc, PATH_NAMES[p], v)
    # within the stated bound of the Python reference (gguf_types.dequantize, float64 dot) and of vec_dot
    wdq = gguf_types.dequantize(w, tname).astype(np.float64)  # (nr, n)
    exact = wdq @ act.T  # (nr, nc)
    bound = _mm_bound(w, tname, act)
    slack = 2e-6 * (np.abs(wdq) @ np.abs(act).T) + 1e-30
    err = np.abs(ref.T.astype(np.float64) - exact)
    assert (err <= bound * (1 + 1e-5) + slack).all(), (tname, float((err / (bound + slack)).max()))
    vd = np.array([[float(_dot(lib, ffi, n, w[r], yv[c], t.planes, t.block_size, PATH_SCALAR)) for c in range(nc)]
                   for r in range(nr)])
    # against vec_dot, also the difference of the two activation quantizations (0 for the 256 family)
    act_diff = np.abs(wdq) @ np.abs(act - act_vd).T
    assert (np.abs(ref.T - vd) <= bound * (1 + 1e-5) + act_diff * (1 + 1e-5) + 2 * slack).all(), tname
    return float((err / (bound + slack)).max())


@pytest.mark.parametrize("planes,block", TYPES, ids=[f"N{n}_B{b}" for n, b in TYPES])
def test_batched_equals_across_paths_and_within_bound(atd, planes, block):
    """Random rows (sparse and extreme too), odd activation counts, row counts around the tiles."""
    lib, ffi, lib2, _ = atd
    rng = np.random.default_rng(2000 + 10 * planes + block)
    tname = f"ATD{planes}" + ("_64" if block == 64 else "")
    for (nblocks, nr, nc), kind in zip([(3, 5, 3), (5, 33, 7), (17, 37, 2), (1, 1, 9)],
                                       ["random", "sparse", "extreme", "random"]):
        n = nblocks * block
        w = np.stack([_random_row(rng, planes, block, n, kind) for _ in range(nr)])
        _check_batched(lib, ffi, lib2, rng, tname, w, nc, extreme=kind == "extreme")


@pytest.mark.parametrize("tensor", ["model.layers.3.mlp.down_proj.weight", "model.layers.3.self_attn.q_proj.weight"])
@pytest.mark.parametrize("planes", [1, 2, 3, 4])
def test_batched_real_weights(atd, smollm2_continuous_dir, tensor, planes):
    """A real SmolLM2 weight matrix (576 x 1536: 256-blocks; 576 x 576: 64-blocks) fitted by gguf_types."""
    from converter.checkpoint import Checkpoint

    lib, ffi, lib2, _ = atd
    w = Checkpoint(smollm2_continuous_dir).tensors[tensor].load_rows(0, 45)
    tname = f"ATD{planes}" + ("" if w.shape[1] % 256 == 0 else "_64")
    packed = np.asarray(gguf_types.quantize(w, tname))
    worst = _check_batched(lib, ffi, lib2, np.random.default_rng(planes), tname, packed, 5)
    assert worst > 0.0  # the bound is not vacuous: results do move with the int8 rounding


@pytest.mark.parametrize("planes,block", TYPES, ids=[f"N{n}_B{b}" for n, b in TYPES])
def test_gemv_equals_vec_dot(atd, planes, block):
    """atd_gemv (one activation row, many weight rows; 4 rows per step for the 64 family) == vec_dot."""
    lib, ffi, lib2, _ = atd
    rng = np.random.default_rng(300 + planes + block)
    for nr, nblocks in ((1, 9), (4, 3), (7, 9), (13, 17)):
        n = nblocks * block
        w = np.stack([_random_row(rng, planes, block, n) for _ in range(nr)])
        y, _, _ = _activations(lib, ffi, rng, block, n)
        for p, v in _runnable(lib, lib2):
            lib.atd_set_path(p)
            lib2.atd_dot_set_variant(p, v)
            out = np.empty(nr, dtype=np.float32)
            lib.atd_gemv(n, planes, block, ffi.from_buffer(w), w.shape[1], nr, y, ffi.cast("float *", ffi.from_buffer(out)))
            lib2.atd_dot_set_variant(p, 0)
            lib.atd_set_path(PATH_AUTO)
            ref = np.array([_dot(lib, ffi, n, w[r], y, planes, block, PATH_SCALAR) for r in range(nr)], dtype=np.float32)
            assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), (planes, block, nr, PATH_NAMES[p], v)


def test_batched_simd_paths_are_faster_than_scalar(atd):
    """As for vec_dot: a batched SIMD path that is really the scalar loop would pass the tests above."""
    lib, ffi, _, _ = atd
    simd = [p for p in (PATH_AVX2, PATH_AVX512, PATH_NEON) if lib.atd_path_available(p)]
    if not simd:
        pytest.skip("no SIMD path")
    rng = np.random.default_rng(9)
    for planes, block in ((2, 256), (3, 64)):
        n, nr, nc = 1024, 32, 8
        w = np.stack([_random_row(rng, planes, block, n) for _ in range(nr)])
        ybuf, by, _, _, _ = _mm_activations(lib, ffi, rng, block, n, nc)

        def best_time(path):
            return _best_time(lambda: _mm(lib, ffi, n, planes, block, w, nr, ybuf, by, nc, path), 5, 7)

        t_scalar = best_time(PATH_SCALAR)
        for p in simd:
            assert best_time(p) * 2.0 < t_scalar, (PATH_NAMES[p], planes, block)


def test_batched_calls_are_counted(atd):
    lib, ffi, _, _ = atd
    rng = np.random.default_rng(4)
    w = np.stack([_random_row(rng, 2, 256, 512) for _ in range(3)])
    ybuf, by, _, _, _ = _mm_activations(lib, ffi, rng, 256, 512, 2)
    before = lib.atd_mul_mat_calls()
    _mm(lib, ffi, 512, 2, 256, w, 3, ybuf, by, 2, PATH_AUTO)
    assert lib.atd_mul_mat_calls() == before + 1


def test_c_mm_driver_asan(tmp_path):
    """ggml-ext/tests/atd_mm_test.c with ASan/UBSan: every path == scalar == the transcribed formula,
    decoders byte-equal, results within the bound, nothing written outside the output."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found")
    exe = tmp_path / "atd_mm_test"
    sources = sorted(str(p) for p in EXT.glob("*.c")) + [str(EXT / "tests" / "atd_mm_test.c")]
    build = subprocess.run([gcc, "-std=c11", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                            "-I", str(EXT), *sources, "-o", str(exe), "-lm", "-pthread"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
    run = subprocess.run([str(exe), "1"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.endswith(" 0 failed") and int(last.split()[0]) > 300, run.stdout


@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")),
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (Debian: gcc-aarch64-linux-gnu qemu-user)")
@pytest.mark.parametrize("march", ["armv8-a", "armv8.2-a+dotprod"])
def test_mm_driver_neon_under_qemu(tmp_path, march):
    """The batched kernels built for aarch64 (sdot microkernel with +dotprod, the scalar one without)."""
    exe = tmp_path / "atd_mm_test"
    sources = [str(p) for p in sorted(EXT.glob("*.c"))]
    build = subprocess.run(["aarch64-linux-gnu-gcc", "-std=c11", "-O2", f"-march={march}", "-ffp-contract=off",
                            f"-I{EXT}", *sources, str(EXT / "tests" / "atd_mm_test.c"), "-lm", "-pthread", "-o", str(exe)],
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr
    res = subprocess.run(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", str(exe), "1"], capture_output=True,
                         text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "neon" in res.stdout.split("paths:")[1].splitlines()[0]
    last = res.stdout.strip().splitlines()[-1]
    assert last.endswith(" 0 failed") and int(last.split()[0]) > 300, res.stdout


# ------------------------------------------------------------------------------------ r2 layout
#
# The runtime layout (atd.h): the patched ggml-cpu repacks ATD weights into it at load time. For the 256
# family its kernels must give the bits of the file layout's: gemv those of vec_dot, the batched matmul
# those of atd_mul_mat on the original rows. The 64 family's gemv takes its own activations (a scale per
# group of 16, natural order): every path gives the bits of its scalar path, held here to numpy.

ATD_Q8_64R2 = np.dtype([("d", "<f4", 4), ("sum", "<i4", 4), ("qs", "i1", 64)])
R2_GROUP_OF = (np.arange(64) % 16) // 4  # element 16k + 4c + m is in scale group c
assert ATD_Q8_64R2.itemsize == 96


def _tname(planes, block):
    return f"ATD{planes}" + ("" if block == 256 else "_64")


def _r2_numpy(w, planes, block):
    """numpy reference of the r2 layout from gguf_types' unpacking: per block the fp16 scales and per
    plane block/4 bytes, bits 2k, 2k+1 of byte j = code (t + 1) of element (block/4) k + j; rows in groups
    of four interleaved block by block (256: whole row blocks; 64: the group's scales row by row, then
    each plane's bytes row by row), the rows after the last whole group single."""
    nr, q = w.shape[0], block // 4
    trits, scales = gguf_types.unpack_blocks(w.reshape(-1), _tname(planes, block))
    codes = (trits.astype(np.int16) + 1).astype(np.uint8).reshape(nr, -1, planes, 4, q)  # [row, block, plane, k, j]
    packed = (codes[..., 0, :] | codes[..., 1, :] << 2 | codes[..., 2, :] << 4 | codes[..., 3, :] << 6).astype(np.uint8)
    nb = packed.shape[1]
    sc = scales.view(np.uint8).reshape(nr, nb, 2 * planes)
    rows = np.concatenate([sc, packed.reshape(nr, nb, planes * q)], axis=2)  # [row, block, byte]
    g = nr // 4 * 4
    if block == 256:
        grouped = rows[:g].reshape(-1, 4, nb, rows.shape[2]).transpose(0, 2, 1, 3)  # [group, block, row, byte]
    else:
        gsc = sc[:g].reshape(-1, 4, nb, 2 * planes).transpose(0, 2, 1, 3).reshape(-1, nb, 8 * planes)
        gpk = packed[:g].reshape(-1, 4, nb, planes, q).transpose(0, 2, 3, 1, 4).reshape(-1, nb, 4 * planes * q)
        grouped = np.concatenate([gsc, gpk], axis=2)  # [group, block, scales | plane, row, byte]
    return np.concatenate([grouped.reshape(-1), rows[g:].reshape(-1)]).reshape(nr, -1)


def _repack(lib, ffi, w, planes, block=256, path=PATH_AUTO):
    t = gguf_types.atd_type(_tname(planes, block))
    nr, n = w.shape[0], w.shape[1] // t.type_size * block
    out = np.zeros((nr, n // block * planes * (2 + block // 4)), dtype=np.uint8)
    got = lib.atd_repack_r2_path(ffi.from_buffer(w), ffi.from_buffer(out), nr, n, planes, block, path)
    assert got == out.size and lib.atd_r2_row_size(planes, block, n) == out.shape[1]
    return out


@pytest.mark.parametrize("planes,block", TYPES)
def test_repack_r2_matches_numpy(atd, planes, block):
    lib, ffi, _, _ = atd
    rng = np.random.default_rng(700 + planes + block)
    for kind, nr in (("random", 3), ("sparse", 8), ("extreme", 11)):
        w = np.stack([_random_row(rng, planes, block, 3 * block, kind) for _ in range(nr)])
        ref = _r2_numpy(w, planes, block)
        for p in [PATH_AUTO] + [p for p in PATH_NAMES if lib.atd_path_available(p)]:
            assert np.array_equal(_repack(lib, ffi, w, planes, block, p), ref), (kind, p)


def test_repack_r2_rejects_bad_shapes(atd):
    lib, ffi, _, _ = atd
    buf = ffi.new("char[]", 4096)
    assert lib.atd_repack_r2(buf, buf, 1, 320, 2, 256) == 0  # not a multiple of 256
    assert lib.atd_repack_r2(buf, buf, 1, 96, 2, 64) == 0  # not a multiple of 64
    assert lib.atd_repack_r2(buf, buf, 1, 256, 5, 256) == 0  # no such plane count
    assert lib.atd_repack_r2(buf, buf, 1, 256, 2, 128) == 0  # no such block
    assert lib.atd_r2_row_size(0, 256, 256) == 0 and lib.atd_r2_row_size(2, 256, 256) == 132
    assert lib.atd_r2_row_size(3, 64, 576) == 9 * 54


def _check_gemv_r2(atd, n, planes, block, r2, nr, y, ref):
    """atd_gemv_r2 on every path and variant gives the bits of ref, and writes nothing past its output"""
    lib, ffi, lib2, _ = atd
    for p, v in _runnable(lib, lib2):
        lib2.atd_dot_set_variant(p, v)
        out = np.full(nr + 1, -7.25, dtype=np.float32)
        lib.atd_gemv_r2_path(n, planes, block, ffi.from_buffer(r2), nr, y, ffi.cast("float *", ffi.from_buffer(out)), p)
        lib2.atd_dot_set_variant(p, 0)
        assert out[nr] == np.float32(-7.25), "wrote outside the output"
        assert np.array_equal(out[:nr].view(np.uint32), ref.view(np.uint32)), (planes, block, nr, PATH_NAMES[p], v)


@pytest.mark.parametrize("planes", [1, 2, 3, 4])
def test_gemv_r2_equals_vec_dot(atd, planes):
    """atd_gemv_r2 on repacked rows == vec_dot (scalar path) on the original rows, every path and variant,
    row counts around the 4-row step."""
    lib, ffi, _, _ = atd
    rng = np.random.default_rng(800 + planes)
    for (nr, nblocks), kind in zip(((1, 9), (4, 3), (7, 9), (13, 17)), ("random", "sparse", "extreme", "random")):
        n = nblocks * 256
        w = np.stack([_random_row(rng, planes, 256, n, kind) for _ in range(nr)])
        r2 = _repack(lib, ffi, w, planes)
        y, _, _ = _activations(lib, ffi, rng, 256, n, kind if kind == "extreme" else "random")
        ref = np.array([_dot(lib, ffi, n, w[r], y, planes, 256, PATH_SCALAR) for r in range(nr)], dtype=np.float32)
        _check_gemv_r2(atd, n, planes, 256, r2, nr, y, ref)


def _q8_64r2(lib, ffi, x):
    """the 64 family's r2 activations of x (checked against numpy's reading of the rule) and their
    float64 values"""
    n = x.size
    y = ffi.new("block_atd_q8_64r2[]", n // 64)
    lib.quantize_row_atd_q8_64r2(ffi.cast("const float *", ffi.from_buffer(x)), y, n)
    arr = np.frombuffer(ffi.buffer(y), dtype=ATD_Q8_64R2)
    groups = x.reshape(-1, 4, 4, 4).transpose(0, 2, 1, 3).reshape(-1, 4, 16)  # [block, c, (k, m)]
    d_ref, q_ref = _quantize_groups_ref(groups)
    assert np.array_equal(arr["d"], d_ref)
    assert np.array_equal(arr["qs"], q_ref.reshape(-1, 4, 4, 4).transpose(0, 2, 1, 3).reshape(-1, 64))
    assert np.array_equal(arr["sum"], q_ref.astype(np.int64).sum(-1))
    return y, (arr["d"].astype(np.float64)[:, R2_GROUP_OF] * arr["qs"]).reshape(-1)


def _r2_64_lanes_ref(w, planes, act_y):
    """numpy transcription of atd.h's float combination of the 64 family's r2 gemv (float32; exact integer
    sums of code times q per plane and scale group, less the group's sum of q)"""
    arr = np.frombuffer(act_y, dtype=ATD_Q8_64R2)
    trits, scales = gguf_types.unpack_blocks(w.reshape(-1), _tname(planes, 64))
    nr = w.shape[0]
    c = trits.astype(np.int64).reshape(nr, -1, planes, 4, 4, 4) + 1  # codes [row, block, plane, k, group, m]
    q = arr["qs"].astype(np.int64).reshape(1, -1, 1, 4, 4, 4)
    isum = (c * q).sum(axis=(3, 5)) - arr["sum"].astype(np.int64)[None, :, None, :]  # [row, block, plane, group]
    ad = (scales.astype(np.float32).reshape(nr, -1, planes)[..., None] * arr["d"].astype(np.float32)[None, :, None, :])
    acc = np.zeros((nr, 4), dtype=np.float32)
    for b in range(isum.shape[1]):
        for i in range(planes):  # fma: one rounding of an exact float64 product-sum
            acc = (acc.astype(np.float64) + isum[:, b, i].astype(np.float64) * ad[:, b, i]).astype(np.float32)
    return (acc[:, 0] + acc[:, 1]) + (acc[:, 2] + acc[:, 3])


@pytest.mark.parametrize("planes", [1, 2, 3, 4])
def test_gemv_r2_64_paths_equal_numpy(atd, planes):
    """The 64 family's r2 gemv: every path and variant gives the bits of the numpy transcription of atd.h's
    definition (row counts around the 4-row step, tails on the scalar reference), which is within float
    rounding of the float64 dot of the dequantized weights and the activations."""
    lib, ffi, _, _ = atd
    rng = np.random.default_rng(820 + planes)
    for (nr, nblocks), kind in zip(((1, 9), (4, 3), (7, 9), (13, 17), (8, 1)), ("random", "sparse", "extreme", "random", "random")):
        n = nblocks * 64
        w = np.stack([_random_row(rng, planes, 64, n, kind) for _ in range(nr)])
        r2 = _repack(lib, ffi, w, planes, 64)
        x = (rng.standard_normal(n) * np.exp(rng.standard_normal() * 2)).astype(np.float32)
        y, act = _q8_64r2(lib, ffi, x)
        ref = _r2_64_lanes_ref(w, planes, ffi.buffer(y))
        wf = np.stack([gguf_types.dequantize(w[r], _tname(planes, 64)).astype(np.float64).reshape(-1) for r in range(nr)])
        exact = wf @ act
        assert np.all(np.abs(ref - exact) <= 1e-5 * (np.abs(wf) @ np.abs(act)) + 1e-30), (planes, nr)
        _check_gemv_r2(atd, n, planes, 64, r2, nr, y, ref)


@pytest.mark.parametrize("planes,block", TYPES)
def test_mul_mat_r2_equals_mul_mat(atd, planes, block):
    """The batched matmul on repacked rows gives the bits of atd_mul_mat on the original rows (which the
    tests above hold to the Python reference), every path and variant, odd batch sizes."""
    lib, ffi, lib2, _ = atd
    rng = np.random.default_rng(900 + planes + block)
    for nblocks, nr, nc in ((3, 5, 3), (5, 33, 7), (1, 1, 2), (9, 12, 2)):
        n = nblocks * block
        w = np.stack([_random_row(rng, planes, block, n) for _ in range(nr)])
        r2 = _repack(lib, ffi, w, planes, block)
        ybuf, by, _, _, _ = _mm_activations(lib, ffi, rng, block, n, nc)
        ref = _mm(lib, ffi, n, planes, block, w, nr, ybuf, by, nc, PATH_SCALAR)
        scratch = ffi.new("char[]", lib.atd_mul_mat_scratch_size())
        for p, v in _runnable(lib, lib2):
            lib2.atd_dot_set_variant(p, v)
            out = np.full((nc, nr + 3), -7.25, dtype=np.float32)
            lib.atd_mul_mat_r2_path(n, planes, block, ffi.from_buffer(r2), nr, ybuf, by, nc,
                                    ffi.cast("float *", ffi.from_buffer(out)), nr + 3, scratch, p)
            lib2.atd_dot_set_variant(p, 0)
            assert (out[:, nr:] == np.float32(-7.25)).all(), "wrote outside the output"
            assert np.array_equal(out[:, :nr].view(np.uint32), ref.view(np.uint32)), (planes, nr, nc, PATH_NAMES[p], v)


@pytest.mark.parametrize("block", [256, 64])
def test_gemv_r2_simd_paths_are_faster_than_scalar(atd, block):
    lib, ffi, _, _ = atd
    simd = [p for p in (PATH_AVX2, PATH_AVX512) if lib.atd_path_available(p)]
    if not simd:
        pytest.skip("no x86 SIMD path")
    rng = np.random.default_rng(11)
    n, nr, planes = (4096 if block == 256 else 4032), 16, 2
    w = np.stack([_random_row(rng, planes, block, n) for _ in range(nr)])
    r2 = _repack(lib, ffi, w, planes, block)
    if block == 256:
        y, _, _ = _activations(lib, ffi, rng, 256, n)
    else:
        y, _ = _q8_64r2(lib, ffi, rng.standard_normal(n).astype(np.float32))
    out = np.empty(nr, dtype=np.float32)
    op, rp = ffi.cast("float *", ffi.from_buffer(out)), ffi.from_buffer(r2)

    def best_time(path):
        return _best_time(lambda: lib.atd_gemv_r2_path(n, planes, block, rp, nr, y, op, path), 20, 9)

    t_scalar = best_time(PATH_SCALAR)
    for p in simd:
        assert best_time(p) * 2.0 < t_scalar, PATH_NAMES[p]


@pytest.mark.parametrize("block", [256, 64])
def test_repack_r2_simd_paths_are_faster_than_scalar(atd, block):
    """The repack runs once per model load (8B ATD2: 3.4 GB of planes): the SIMD paths decode the base-3
    bytes as the batched decoder does, at least twice as fast as the scalar reference."""
    lib, ffi, _, _ = atd
    simd = [p for p in (PATH_AVX2, PATH_AVX512) if lib.atd_path_available(p)]
    if not simd:
        pytest.skip("no x86 SIMD path")
    rng = np.random.default_rng(12)
    n, planes = (4096 if block == 256 else 576), 2
    w = np.stack([_random_row(rng, planes, block, n) for _ in range(64)])
    out = np.zeros((64, n // block * planes * (2 + block // 4)), dtype=np.uint8)
    wp, op = ffi.from_buffer(w), ffi.from_buffer(out)

    def best_time(path):
        return _best_time(lambda: lib.atd_repack_r2_path(wp, op, 64, n, planes, block, path), 3, 7)

    t_scalar = best_time(PATH_SCALAR)
    for p in simd:
        assert best_time(p) * 2.0 < t_scalar, PATH_NAMES[p]
