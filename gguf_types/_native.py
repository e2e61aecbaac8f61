"""The C extension gguf_types._atd_c (ggml-ext/*.c, built by cffi at install time), with numpy wrappers.

Everything here gives the same bytes as the numpy reference in gguf_types.fit/atd; the C code only
makes it fast (tests/test_ggml_ext.py checks both agree). If the extension is missing (a source
checkout without `pip install -e .`) or ATD_NO_NATIVE=1 is set, native_available() is False and
gguf_types falls back to numpy.

ATD_THREADS=k sets the default fit thread count (0 or unset: all cores).
"""

from __future__ import annotations

import os

import numpy as np

from .atd import AtdType, atd_type

try:  # pragma: no cover - depends on the build
    from ._atd_c import ffi, lib  # type: ignore[import-not-found]
    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover
    ffi = lib = None
    _IMPORT_ERROR = exc

__all__ = [
    "native_available",
    "native_import_error",
    "lib_path",
    "quantize_rows",
    "quantize_rows_scalar",
    "dequantize_rows",
    "validate_rows",
    "fp32_to_fp16_bits",
    "fp16_bits_to_fp32",
    "vec_dot",
    "quantize_q8",
    "default_threads",
]


def native_available() -> bool:
    """True if the C extension is importable and not disabled by ATD_NO_NATIVE=1."""
    return lib is not None and os.environ.get("ATD_NO_NATIVE", "") in ("", "0")


def native_import_error() -> Exception | None:
    """Why the extension did not import (None if it did)."""
    return _IMPORT_ERROR


def lib_path() -> str | None:
    """File of the loaded extension module (None if it did not import)."""
    if lib is None:
        return None
    from . import _atd_c  # type: ignore[import-not-found]

    return _atd_c.__file__


def _need_lib():
    if lib is None:
        raise RuntimeError(f"gguf_types._atd_c is not built ({_IMPORT_ERROR}); run `pip install -e .`")
    return lib


def default_threads() -> int:
    """Thread count for the C fit: ATD_THREADS, else 0 (= all cores)."""
    try:
        return max(0, int(os.environ.get("ATD_THREADS", "0")))
    except ValueError:
        return 0


def _fptr(a: np.ndarray, ctype: str = "float *"):
    return ffi.cast(ctype, ffi.from_buffer(a))


def _prep(w: np.ndarray, t: AtdType, importance: np.ndarray | None):
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % t.block_size != 0:
        raise ValueError(f"{t.name}: expected (rows, cols) with cols a multiple of {t.block_size}, got {w.shape}")
    imp = None
    if importance is not None:
        imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if imp.shape[0] != w.shape[1]:
            raise ValueError(f"importance must be a vector of length cols={w.shape[1]}, got {imp.shape}")
    return w, imp


def quantize_rows(w: np.ndarray, atype: "AtdType | str | int", importance: np.ndarray | None = None,
                  n_threads: int | None = None, *, chunk_weights: int | None = None) -> np.ndarray:
    """The grid fit in C: (rows, cols) float32 -> (rows, cols // B * type_size) uint8, the bytes of
    gguf_types.quantize(..., method="grid"). Inputs must already be validated (finite weights,
    finite non-negative importance); gguf_types.quantize does that first.

    Raises ValueError, with the reference's message, if a scale overflows fp16 (chunk_weights:
    the numpy chunking whose first failing chunk that message describes; default as fit.quantize).
    """
    t = atd_type(atype)
    L = _need_lib()
    w, imp = _prep(w, t, importance)
    rows, cols = w.shape
    out = np.empty((rows, cols // t.block_size * t.type_size), dtype=np.uint8)
    if out.size == 0:
        return out
    threads = default_threads() if n_threads is None else int(n_threads)
    n = L.atd_quantize_rows(_fptr(w), ffi.from_buffer(out), rows, cols, t.planes, t.block_size,
                            ffi.NULL if imp is None else _fptr(imp), threads)
    if n != out.nbytes:
        _raise_overflow(w, t, imp, out, chunk_weights)
    return out


def _raise_overflow(w: np.ndarray, t: AtdType, imp: np.ndarray | None, out: np.ndarray,
                    chunk_weights: int | None) -> None:
    """atd_quantize_rows failed: a scale overflowed fp16 (those blocks hold an inf scale). Re-run
    the numpy reference on the chunk holding the first such row so the ValueError is the
    reference's own, message included."""
    from . import fit

    rows, cols = w.shape
    d = out.reshape(rows, -1, t.type_size)[:, :, : 2 * t.planes].copy().view("<u2")
    bad_rows = np.flatnonzero(((d & 0x7C00) == 0x7C00).any(axis=(1, 2)))
    if bad_rows.size:
        rpc = max(1, (chunk_weights or fit.CHUNK_WEIGHTS) // max(cols, 1))
        r0 = int(bad_rows[0]) // rpc * rpc
        fit._quantize_numpy(w[r0:r0 + rpc], t, "grid", imp, fit.DEFAULT_ITERS, fit.DEFAULT_CANDIDATES)
    raise ValueError(f"ATD plane scale overflows fp16 (max 65504) in {t.name}: the tensor's magnitude is too large "
                     "for ATD's fp16 scales; rescale the tensor or keep it in F32/F16/BF16")


def quantize_rows_scalar(w: np.ndarray, atype: "AtdType | str | int",
                         importance: np.ndarray | None = None) -> np.ndarray:
    """The same fit through the C scalar transcription (atd_quantize_row_scalar), row by row; for
    tests. Overflowing scales are clamped to +-65504 here (the ggml entry-point rule)."""
    t = atd_type(atype)
    L = _need_lib()
    w, imp = _prep(w, t, importance)
    rows, cols = w.shape
    out = np.empty((rows, cols // t.block_size * t.type_size), dtype=np.uint8)
    ip = ffi.NULL if imp is None else _fptr(imp)
    for r in range(rows):
        L.atd_quantize_row_scalar(_fptr(w[r]), ffi.from_buffer(out[r]), cols, t.planes, t.block_size, ip)
    return out


def dequantize_rows(data: np.ndarray, atype: "AtdType | str | int") -> np.ndarray:
    """(rows, nbytes) uint8 -> (rows, cols) float32 with atd_dequantize_row (bit-exact with
    gguf_types.dequantize). Does not validate: use validate_rows first for untrusted data."""
    t = atd_type(atype)
    L = _need_lib()
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.ndim == 1:
        data = data.reshape(1, -1)
    if data.ndim != 2 or data.shape[1] % t.type_size != 0:
        raise ValueError(f"{t.name}: expected (rows, k * {t.type_size}) bytes, got {data.shape}")
    rows = data.shape[0]
    cols = data.shape[1] // t.type_size * t.block_size
    y = np.empty((rows, cols), dtype=np.float32)
    if y.size:
        L.atd_dequantize_row(ffi.from_buffer(data), _fptr(y), rows * cols, t.planes, t.block_size)
    return y


def validate_rows(data: np.ndarray, atype: "AtdType | str | int") -> bool:
    """atd_validate_row over all rows: canonical base-3 bytes, zero padding trits, no inf/NaN scale."""
    t = atd_type(atype)
    L = _need_lib()
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if data.size % t.type_size != 0:
        raise ValueError(f"{t.name}: {data.size} bytes is not a multiple of type_size {t.type_size}")
    k = data.size // t.type_size * t.block_size
    return bool(L.atd_validate_row(ffi.from_buffer(data), k, t.planes, t.block_size))


def fp32_to_fp16_bits(x: np.ndarray) -> np.ndarray:
    """atd_fp32_to_fp16 elementwise (uint16 bit patterns); for tests."""
    L = _need_lib()
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    return np.fromiter((L.atd_fp32_to_fp16(float(v)) for v in x), dtype=np.uint16, count=x.size)


def fp16_bits_to_fp32(h: np.ndarray) -> np.ndarray:
    """atd_fp16_to_fp32 elementwise; for tests."""
    L = _need_lib()
    h = np.ascontiguousarray(h, dtype=np.uint16).reshape(-1)
    return np.fromiter((L.atd_fp16_to_fp32(int(v)) for v in h), dtype=np.float32, count=h.size)


def quantize_q8(x: np.ndarray, block: int) -> np.ndarray:
    """Activations for the dot kernels: q8_K (block 256) or atd_q8_64 (block 64) of a float32 vector,
    as raw bytes (atd_quantize_row_q8_K_ref / quantize_row_atd_q8_64)."""
    L = _need_lib()
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if block not in (256, 64):
        raise ValueError(f"block must be 256 or 64, got {block}")
    if x.size % block:
        raise ValueError(f"activations for {block}-blocks need a multiple of {block} values")
    if block == 256:
        y = np.zeros(x.size // 256 * ffi.sizeof("block_q8_K"), dtype=np.uint8)
        L.atd_quantize_row_q8_K_ref(_fptr(x), ffi.cast("block_q8_K *", ffi.from_buffer(y)), x.size)
    else:
        y = np.zeros(x.size // 64 * ffi.sizeof("block_atd_q8_64"), dtype=np.uint8)
        L.quantize_row_atd_q8_64(_fptr(x), ffi.from_buffer(y), x.size)
    return y


def vec_dot(row: np.ndarray, act: np.ndarray, atype: "AtdType | str | int", path: int | None = None) -> float:
    """Dot of one ATD row (bytes) with its q8 activations (bytes from quantize_q8): atd_vec_dot,
    or atd_vec_dot_path with a given kernel path."""
    t = atd_type(atype)
    L = _need_lib()
    row = np.ascontiguousarray(row, dtype=np.uint8).reshape(-1)
    act = np.ascontiguousarray(act, dtype=np.uint8).reshape(-1)
    if row.size % t.type_size:
        raise ValueError(f"{t.name}: row bytes not a multiple of {t.type_size}")
    n = row.size // t.type_size * t.block_size
    s = ffi.new("float *")
    if path is None:
        L.atd_vec_dot(n, s, ffi.from_buffer(row), ffi.from_buffer(act), t.planes, t.block_size)
    else:
        L.atd_vec_dot_path(n, s, ffi.from_buffer(row), ffi.from_buffer(act), t.planes, t.block_size, int(path))
    return float(s[0])
