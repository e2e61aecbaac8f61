"""The C codec (ggml-ext/atd-quants.c via gguf_types._atd_c) against the numpy reference, byte for byte.

Nothing here is skipped: the extension is built by `pip install -e .` (make install), and the C test
driver is compiled with gcc under ASan/UBSan.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import gguf_types as G
from gguf_types import _native

from test_atd_codec import _special_blocks

ROOT = Path(__file__).resolve().parent.parent
EXT = ROOT / "ggml-ext"
ALL_N = (1, 2, 3, 4)


def _type(n: int, b: int) -> G.AtdType:
    return G.atd_type(f"ATD{n}" if b == 256 else f"ATD{n}_64")


@contextmanager
def _numpy_only():
    old = os.environ.get("ATD_NO_NATIVE")
    os.environ["ATD_NO_NATIVE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ATD_NO_NATIVE", None)
        else:
            os.environ["ATD_NO_NATIVE"] = old


def _ref(w, t, imp=None):
    with _numpy_only():
        assert not G.native_available()
        return G.quantize(w, t, importance=imp)


def _check_same(w, t, imp=None):
    """numpy reference == C (1 and 2 threads) == gguf_types.quantize routed to C == C scalar path."""
    ref = _ref(w, t, imp)
    for threads in (1, 2):
        got = _native.quantize_rows(w, t, imp, n_threads=threads)
        assert got.dtype == np.uint8 and got.shape == ref.shape
        assert np.array_equal(got, ref), f"{t.name} threads={threads} shape={w.shape} importance={imp is not None}"
    assert np.array_equal(G.quantize(w, t, importance=imp), ref)
    assert np.array_equal(_native.quantize_rows_scalar(w, t, imp), ref)
    return ref


# ----------------------------------------------------------------------------- build


def test_extension_is_built_and_used():
    assert _native.native_import_error() is None, f"gguf_types._atd_c did not import: {_native.native_import_error()}"
    assert G.native_available()
    with _numpy_only():
        assert not G.native_available()
    lib = _native.lib
    for name in ("atd_quantize_row_ref", "atd_quantize_rows", "atd_dequantize_row", "atd_validate_row",
                 "atd_fp16_to_fp32", "atd_fp32_to_fp16", "atd_vec_dot", "atd_vec_dot_path", "atd_path_available",
                 "atd_selected_path", "atd_set_path", "atd_quantize_row_q8_K_ref", "quantize_row_atd_q8_64"):
        assert hasattr(lib, name), name
    for t in G.ATD_TYPES:
        for fn in (f"quantize_row_{t.ggml_name}_ref", f"quantize_{t.ggml_name}", f"dequantize_row_{t.ggml_name}"):
            assert hasattr(lib, fn), fn


def test_imports_from_another_cwd(tmp_path):
    code = "import gguf_types, gguf_types._atd_c as m; assert gguf_types.native_available(); print(m.__file__)"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_extension_not_stale():
    """The built module must be newer than ggml-ext's sources (else: `pip install -e .` again)."""
    so = Path(_native.lib_path())
    newest = max((p for p in [*EXT.glob("*.c"), *EXT.glob("*.h"), EXT / "build_ffi.py"]), key=lambda p: p.stat().st_mtime)
    assert so.stat().st_mtime >= newest.stat().st_mtime, (
        f"{so.name} is older than {newest.name}: rebuild the extension with `.venv/bin/pip install -e .`")


def test_block_sizes_match_type_table():
    ffi = _native.ffi
    for t in G.ATD_TYPES:
        assert ffi.sizeof(f"block_{t.ggml_name}") == t.type_size, t.name
    assert ffi.sizeof("block_q8_K") == 4 + 256 + 2 * 16
    assert ffi.sizeof("block_atd_q8_64") == 4 * 4 + 4 * 4 + 5 * 16  # d[4], sum[4], qs[digit][16]


# ----------------------------------------------------------------------------- fit: C == numpy


@pytest.mark.parametrize("n", ALL_N)
@pytest.mark.parametrize("shape", [(3, 256), (17, 512), (5, 576), (64, 4096)])
def test_quantize_matches_numpy(n, shape):
    rows, cols = shape
    t = G.atd_type_for(n, cols)
    rng = np.random.default_rng(1000 * n + cols + rows)
    w = rng.standard_normal(shape).astype(np.float32)
    _check_same(w, t)
    imp = np.exp(rng.standard_normal(cols) * 2).astype(np.float32)
    imp[rng.random(cols) < 0.15] = 0.0  # zeros inside blocks
    imp[: t.block_size] = 0.0  # one block column with all-zero importance: fitted unweighted
    _check_same(w, t, imp)


@pytest.mark.parametrize("b", (256, 64))
@pytest.mark.parametrize("n", ALL_N)
def test_quantize_matches_numpy_special_blocks(n, b):
    rng = np.random.default_rng(50 + 7 * n + b)
    t = _type(n, b)
    blocks = [_special_blocks(b, rng) for _ in range(3)]
    extra = np.stack([
        np.zeros(b), -np.zeros(b),                               # all-zero blocks (+0 and -0)
        np.full(b, 0.7), np.eye(1, b, b // 3)[0] * -1.5,         # constant, a single non-zero
        rng.standard_normal(b) * 1e-30,                          # flushes to zero
        rng.standard_normal(b) * 1e4,                            # large but representable
        rng.standard_normal(b) * 1e-6,                           # fp16-subnormal scales
        np.repeat(rng.standard_normal(b // 8), 8),               # repeated values
    ]).astype(np.float32)
    w = np.concatenate(blocks + [extra]).reshape(-1, 2 * b)      # two blocks per row
    _check_same(w, t)
    imp = np.exp(rng.standard_normal(2 * b)).astype(np.float32)
    imp[::5] = 0.0
    _check_same(w, t, imp)
    imp[:b] = 0.0
    _check_same(w, t, imp)


def test_tiny_flush_and_big_values():
    rng = np.random.default_rng(3)
    for n in ALL_N:
        t = _type(n, 256)
        tiny = (rng.standard_normal((4, 256)) * 1e-30).astype(np.float32)
        data = _check_same(tiny, t)
        trits, scales = G.unpack_blocks(data.reshape(-1, t.type_size))
        assert np.all(scales.view(np.uint16) == 0) and np.all(trits == 0)
        big = (rng.standard_normal((4, 512)) * 1e4).astype(np.float32)
        _check_same(big, t)


@pytest.mark.parametrize("n", ALL_N)
def test_overflow_raises_same_error(n):
    rng = np.random.default_rng(9)
    t = _type(n, 256)
    w = rng.standard_normal((6, 512)).astype(np.float32)
    w[4, 256:] *= np.float32(1e30)  # one block of the fifth row overflows fp16
    with _numpy_only(), pytest.raises(ValueError, match="fp16") as ref_exc:
        G.quantize(w, t)
    with pytest.raises(ValueError, match="fp16") as c_exc:
        G.quantize(w, t)
    assert str(c_exc.value) == str(ref_exc.value)
    with pytest.raises(ValueError) as direct:
        _native.quantize_rows(w, t, n_threads=2)
    assert str(direct.value) == str(ref_exc.value)
    big = np.full((1, 256), 3.0e38, dtype=np.float32)
    with _numpy_only(), pytest.raises(ValueError) as ref2:
        G.quantize(big, t)
    with pytest.raises(ValueError) as c2:
        G.quantize(big, t)
    assert str(c2.value) == str(ref2.value)


def test_threads_identical_and_nonfinite_checked_first():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((37, 768)).astype(np.float32)
    t = G.atd_type("ATD3")
    outs = [_native.quantize_rows(w, t, n_threads=k) for k in (1, 2, 3, 0)]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    w[5, 7] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        G.quantize(w, t)
    with pytest.raises(ValueError, match="importance"):
        G.quantize(np.ones((2, 256), np.float32), t, importance=-np.ones(256))


def test_gguf_quants_and_empty_inputs():
    import gguf
    import gguf.quants

    t = G.atd_type("ATD2_64")
    w = np.random.default_rng(8).standard_normal((10, 576)).astype(np.float32)
    assert np.array_equal(gguf.quants.quantize(w, gguf.GGMLQuantizationType(t.ggml_type)), _ref(w, t))
    empty = np.zeros((0, 576), np.float32)
    assert G.quantize(empty, t).shape == _ref(empty, t).shape == (0, 9 * t.type_size)


def test_non_default_parameters_use_numpy():
    w = np.random.default_rng(5).standard_normal((4, 256)).astype(np.float32)
    t = G.atd_type("ATD2")
    with _numpy_only():
        ref = G.quantize(w, t, iters=2)
    assert np.array_equal(G.quantize(w, t, iters=2), ref)
    assert np.array_equal(G.quantize(w, t, "greedy"), _numpy_greedy(w, t))


def _numpy_greedy(w, t):
    with _numpy_only():
        return G.quantize(w, t, "greedy")


# ----------------------------------------------------------------------------- dequantize / validate / fp16


@pytest.mark.parametrize("b", (256, 64))
@pytest.mark.parametrize("n", ALL_N)
def test_dequantize_bit_exact(n, b):
    rng = np.random.default_rng(n * 17 + b)
    t = _type(n, b)
    nb = 24
    trits = rng.integers(-1, 2, size=(nb, n, b)).astype(np.int8)
    bits = rng.integers(0, 1 << 16, size=(nb, n), dtype=np.uint32).astype(np.uint16)
    bits[(bits & 0x7C00) == 0x7C00] = 0x3C00  # finite scales only (incl. -0.0, subnormals)
    data = G.pack_blocks(trits, bits.view(np.float16)).reshape(4, -1)
    y = _native.dequantize_rows(data, t)
    assert np.array_equal(y.view(np.uint32), G.dequantize(data, t).view(np.uint32))
    assert _native.validate_rows(data, t)
    # also on fitted data
    w = rng.standard_normal((3, 2 * b)).astype(np.float32)
    q = G.quantize(w, t)
    assert np.array_equal(_native.dequantize_rows(q, t).view(np.uint32), G.dequantize(q, t).view(np.uint32))


# the 13 byte values the encoder never writes: 256 values hold the 243 base-3 bytes ceil(256 v / 243)
NONCANONICAL = sorted(set(range(256)) - {-(-256 * v // 243) for v in range(243)})


@pytest.mark.parametrize("b", (256, 64))
def test_validate_rejects_malformed_blocks(b):
    t = _type(2, b)
    S = t.plane_bytes
    data = G.quantize(np.random.default_rng(1).standard_normal((2, 2 * b)).astype(np.float32), t)
    assert _native.validate_rows(data, t)
    flat = data.reshape(-1, t.type_size)
    for byte in (4, 4 + S - 1, t.type_size - 1):
        for value in (NONCANONICAL[0], NONCANONICAL[-1]):
            bad = flat.copy()
            bad[1, byte] = value
            assert not _native.validate_rows(bad, t)
            assert G.validate_blocks(bad, t) is not None
            with pytest.raises(ValueError):
                G.dequantize(bad.reshape(2, -1), t)
    # the last byte of a plane holds a padding slot in its last digit: code 1 there is invalid
    bad = flat.copy()
    bad[1, 4 + S - 1] = -(-256 * (3 * 40 + 1) // 243)  # digits 1111 then 1
    assert not _native.validate_rows(bad, t)
    assert "padding" in G.validate_blocks(bad, t)
    with pytest.raises(ValueError, match="padding"):
        G.dequantize(bad.reshape(2, -1), t)
    for scale_bits in (0x7C00, 0xFC00, 0x7E00):
        bad = flat.copy()
        bad[2, 2:4] = np.frombuffer(struct.pack("<H", scale_bits), np.uint8)
        assert not _native.validate_rows(bad, t)


def test_fp16_conversions_match_numpy():
    rng = np.random.default_rng(6)
    bits = rng.integers(0, 1 << 32, size=200_000, dtype=np.uint64).astype(np.uint32)
    edges = []
    for e in range(100, 146):  # around the subnormal, normal and overflow boundaries
        for m in (0, 1, 0xFFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFFFF, 0x7FF000, 0x400000):
            edges += [e << 23 | m, 1 << 31 | e << 23 | m]
    bits = np.concatenate([bits, np.array(edges, np.uint32), np.array([0x7F800000, 0xFF800000], np.uint32)])
    f = bits.view(np.float32)
    f = f[~np.isnan(f)]
    with np.errstate(over="ignore"):
        want = f.astype(np.float16).view(np.uint16)
    assert np.array_equal(_native.fp32_to_fp16_bits(f), want)
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = _native.fp16_bits_to_fp32(halves)
    ref = halves.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))


# ----------------------------------------------------------------------------- the C test driver


def write_vectors(path: Path) -> int:
    """Test vectors for ggml-ext/tests/atd_quants_test.c --vectors: float input + numpy reference bytes.

    Format (little endian): b"ATDVEC01", u32 count; per record i32 planes, block, rows, cols,
    has_importance, expect_ok; f32 x[rows*cols]; f32 importance[cols] if has_importance;
    u8 expected[rows * cols/B * type_size] if expect_ok.
    """
    rng = np.random.default_rng(2024)
    records = []
    for n in ALL_N:
        for b, cols in ((256, 512), (64, 576)):
            t = _type(n, b)
            special = np.concatenate([_special_blocks(b, rng) for _ in range(3)]).reshape(-1, cols)
            gauss = rng.standard_normal((5, cols)).astype(np.float32)
            for w in (special, gauss):
                for imp in (None, np.where(rng.random(cols) < 0.2, 0, np.exp(rng.standard_normal(cols))).astype(np.float32)):
                    records.append((t, w, imp, _ref(w, t, imp)))
    over = rng.standard_normal((2, 256)).astype(np.float32) * np.float32(1e30)
    records.append((G.atd_type("ATD2"), over, None, None))
    with open(path, "wb") as f:
        f.write(b"ATDVEC01" + struct.pack("<I", len(records)))
        for t, w, imp, expected in records:
            rows, cols = w.shape
            f.write(struct.pack("<6i", t.planes, t.block_size, rows, cols, imp is not None, expected is not None))
            f.write(np.ascontiguousarray(w, "<f4").tobytes())
            if imp is not None:
                f.write(np.ascontiguousarray(imp, "<f4").tobytes())
            if expected is not None:
                f.write(expected.tobytes())
    return len(records)


def test_c_driver_under_sanitizers(tmp_path):
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build ggml-ext/tests/atd_quants_test.c"
    sources = sorted(str(p) for p in EXT.glob("*.c"))
    assert any(p.endswith("atd-quants.c") for p in sources)
    exe = tmp_path / "atd_quants_test"
    flags = ["-std=c11", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-ffp-contract=off", f"-I{EXT}"]
    # compile the files in parallel (the instrumented SIMD code is slow to build), then link
    units = [str(EXT / "tests" / "atd_quants_test.c"), *sources]
    objs = [tmp_path / f"{i}.o" for i in range(len(units))]
    procs = [subprocess.Popen([gcc, *flags, "-c", src, "-o", str(obj)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for src, obj in zip(units, objs)]
    for src, p in zip(units, procs):
        _, err = p.communicate()
        assert p.returncode == 0, f"{src}: {err}"
    build = subprocess.run([gcc, *flags, *map(str, objs), "-lm", "-pthread", "-o", str(exe)],
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr
    vec = tmp_path / "vectors.bin"
    write_vectors(vec)
    # every code path of the fit: the best SIMD variant for this CPU, the AVX2 and baseline builds of
    # the lane code (ATD_FIT_ISA caps the choice), and the scalar transcription alone
    for isa in ("", "avx2", "generic", "scalar"):
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="print_stacktrace=1", ATD_FIT_ISA=isa)
        res = subprocess.run([str(exe), "--vectors", str(vec)], capture_output=True, text=True, env=env,
                             timeout=600, check=False)
        assert res.returncode == 0, f"ATD_FIT_ISA={isa!r}\n" + res.stdout + res.stderr
        m = re.search(r"(\d+) passed, (\d+) failed", res.stdout)
        assert m and int(m.group(2)) == 0 and int(m.group(1)) > 400, res.stdout + res.stderr


@pytest.mark.parametrize("name", ["ATD3", "ATD2_64"])
def test_native_vec_dot_wrapper(name):
    """_native.vec_dot / quantize_q8 reach the kernels (their exactness is tested in test_ggml_ext_dot.py)."""
    t = G.atd_type(name)
    rng = np.random.default_rng(11)
    cols = 1024 if t.block_size == 256 else 576
    w = rng.standard_normal((1, cols)).astype(np.float32)
    x = rng.standard_normal(cols).astype(np.float32)
    row = G.quantize(w, t)[0]
    act = _native.quantize_q8(x, t.block_size)
    expect = float(G.dequantize(row[None], t)[0].astype(np.float64) @ x.astype(np.float64))
    scale = float(np.linalg.norm(w) * np.linalg.norm(x))
    assert abs(_native.vec_dot(row, act, t) - expect) < 0.02 * scale
    path = int(_native.lib.atd_selected_path())
    assert _native.lib.atd_path_available(path)
    assert abs(_native.vec_dot(row, act, t, path=path) - expect) < 0.02 * scale


@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")),
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (Debian: gcc-aarch64-linux-gnu qemu-user)")
@pytest.mark.parametrize("march", ["armv8-a", "armv8.2-a+dotprod"])
def test_neon_paths_under_qemu(tmp_path, march):
    """The C drivers built for aarch64 (NEON, with and without sdot) under qemu: the NEON dot path equals
    the scalar one bit for bit, and the codec/fit checks pass."""
    sources = [str(p) for p in sorted(EXT.glob("*.c"))]
    for driver, args in (("atd_dot_test.c", ["1"]), ("atd_quants_test.c", [])):
        exe = tmp_path / driver.replace(".c", "")
        build = subprocess.run(["aarch64-linux-gnu-gcc", "-std=c11", "-O2", f"-march={march}", "-ffp-contract=off",
                                f"-I{EXT}", *sources, str(EXT / "tests" / driver), "-lm", "-pthread", "-o", str(exe)],
                               capture_output=True, text=True, check=False)
        assert build.returncode == 0, build.stderr
        res = subprocess.run(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", str(exe), *args], capture_output=True,
                             text=True, timeout=600, check=False)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        m = re.search(r"(\d+) passed, (\d+) failed", res.stdout)
        assert m and int(m.group(2)) == 0 and int(m.group(1)) > 400, res.stdout
        if driver == "atd_dot_test.c":
            assert "neon" in res.stdout.split("paths:")[1].splitlines()[0]
