"""ATD (Adaptive Ternary Decomposition) tensor types: constants table and block codec.

A weight block of B weights is stored as N ternary planes T_i in {-1, 0, +1}^B with
one fp16 scale alpha_i per plane:  w ~= sum_i alpha_i * T_i.

Block layout (C, little-endian, no padding), see docs/atd-format.md:

    ATD{N}     B = 256:  struct { ggml_half d[N]; uint8_t qs[N][64]; }   66*N bytes
    ATD{N}_64  B = 64:   struct { ggml_half d[N]; uint8_t qs[N][16]; }   18*N bytes

Byte j of plane i holds the 2-bit codes (t + 1) of elements j, j+B/4, j+2B/4, j+3B/4
in bits 0-1, 2-3, 4-5, 6-7.  Code 3 is never written and is invalid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "AtdType",
    "ATD_TYPES",
    "ATD_TYPE_ID_BASE",
    "GGML_TYPE_COUNT_PATCHED",
    "UnknownAtdType",
    "atd_type",
    "atd_type_for",
    "fallback_type_name_for",
    "pack_blocks",
    "unpack_blocks",
    "dequantize",
    "dequantize_blocks",
]

#: first ggml type id used by ATD (ATD1); ids 200..207 are taken.
ATD_TYPE_ID_BASE = 200
#: GGML_TYPE_COUNT after the patch (highest ATD id + 1).
GGML_TYPE_COUNT_PATCHED = 208


class UnknownAtdType(KeyError, ValueError):
    """Raised by atd_type() for a name or id that is not an ATD type."""


@dataclass(frozen=True)
class AtdType:
    name: str          # GGUF / gguf-py enum name, e.g. "ATD3" or "ATD3_64"
    ggml_type: int     # ggml type id (200..207)
    planes: int        # N, number of ternary planes
    block_size: int    # B, weights per block (256 or 64)
    type_size: int     # bytes per block

    @property
    def bpw(self) -> float:
        """Bits per weight."""
        return self.type_size * 8 / self.block_size

    @property
    def ggml_name(self) -> str:
        """ggml type_traits name ("atd3", "atd3_64")."""
        return self.name.lower()

    @property
    def plane_bytes(self) -> int:
        """Bytes of packed trits per plane per block (B/4)."""
        return self.block_size // 4

    @property
    def activation_type(self) -> str:
        """ggml vec_dot activation type planned for the CPU kernels."""
        return "q8_K" if self.block_size == 256 else "q8_0"


def _make_table() -> tuple[AtdType, ...]:
    types = []
    for n in range(1, 5):
        types.append(AtdType(f"ATD{n}", ATD_TYPE_ID_BASE + n - 1, n, 256, n * (2 + 64)))
    for n in range(1, 5):
        types.append(AtdType(f"ATD{n}_64", ATD_TYPE_ID_BASE + 4 + n - 1, n, 64, n * (2 + 16)))
    return tuple(types)


#: The single constants table for all ATD types.
ATD_TYPES: tuple[AtdType, ...] = _make_table()

_BY_NAME = {t.name: t for t in ATD_TYPES}
_BY_ID = {t.ggml_type: t for t in ATD_TYPES}
_BY_TYPE_SIZE = {t.type_size: t for t in ATD_TYPES}
assert len(_BY_TYPE_SIZE) == len(ATD_TYPES)  # type_size identifies the type uniquely


def atd_type(name_or_id: "str | int | AtdType") -> AtdType:
    """Look up an ATD type by name ("ATD3", "atd3_64"), ggml id (202) or enum member."""
    if isinstance(name_or_id, AtdType):
        return name_or_id
    if isinstance(name_or_id, str):
        t = _BY_NAME.get(name_or_id.upper())
        if t is None:
            raise UnknownAtdType(f"unknown ATD type name {name_or_id!r}; known: {sorted(_BY_NAME)}")
        return t
    if isinstance(name_or_id, (int, np.integer)):  # includes IntEnum members
        t = _BY_ID.get(int(name_or_id))
        if t is None:
            raise UnknownAtdType(f"ggml type id {int(name_or_id)} is not an ATD type (ATD ids are 200..207)")
        return t
    raise UnknownAtdType(f"cannot look up an ATD type from {name_or_id!r}")


def is_atd_type_id(type_id: int) -> bool:
    """True for the ggml type ids of the ATD types (200..207)."""
    return int(type_id) in _BY_ID


def atd_type_for(planes: int, row_len: int) -> AtdType | None:
    """The ATD type with `planes` planes for rows of `row_len` weights.

    256-weight family if row_len % 256 == 0, else the 64-weight family if row_len % 64 == 0,
    else None (the converter then keeps the tensor in the fallback type, see
    fallback_type_name_for()).
    """
    if not 1 <= planes <= 4:
        raise ValueError(f"ATD supports 1..4 planes, got {planes}")
    if row_len > 0 and row_len % 256 == 0:
        return _BY_NAME[f"ATD{planes}"]
    if row_len > 0 and row_len % 64 == 0:
        return _BY_NAME[f"ATD{planes}_64"]
    return None


def fallback_type_name_for(row_len: int) -> str:
    """Stock ggml type for tensors whose rows are not a multiple of 64: "Q8_0" if row_len % 32 == 0 else "F16"."""
    return "Q8_0" if row_len % 32 == 0 else "F16"


# ----------------------------------------------------------------------------- codec


def _check_trits_scales(trits: np.ndarray, scales: np.ndarray) -> tuple[int, int, int]:
    if trits.ndim != 3:
        raise ValueError(f"trits must have shape (nblocks, N, B), got {trits.shape}")
    nb, n, b = trits.shape
    if b not in (64, 256):
        raise ValueError(f"block size must be 64 or 256, got {b}")
    if not 1 <= n <= 4:
        raise ValueError(f"ATD supports 1..4 planes, got {n}")
    if scales.shape != (nb, n):
        raise ValueError(f"scales must have shape {(nb, n)}, got {scales.shape}")
    return nb, n, b


def pack_blocks(trits: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Pack trits (nblocks, N, B) in {-1,0,1} and fp16 scales (nblocks, N) into (nblocks, type_size) bytes."""
    trits = np.asarray(trits)
    scales = np.asarray(scales)
    nb, n, b = _check_trits_scales(trits, scales)
    if scales.dtype != np.float16:
        raise ValueError(f"scales must be float16, got {scales.dtype}")
    t = trits.astype(np.int16, copy=False)
    if t.size and (t.min() < -1 or t.max() > 1):
        raise ValueError("trits must be in {-1, 0, +1}")
    codes = (t + 1).astype(np.uint8).reshape(nb, n, 4, b // 4)
    qs = codes[:, :, 0] | (codes[:, :, 1] << 2) | (codes[:, :, 2] << 4) | (codes[:, :, 3] << 6)
    d = np.ascontiguousarray(scales).astype("<f2", copy=False).view(np.uint8).reshape(nb, 2 * n)
    return np.concatenate([d, qs.reshape(nb, n * (b // 4))], axis=1)


def _type_from_bytes(data: np.ndarray, atype: "AtdType | str | int | None") -> AtdType:
    if atype is not None:
        t = atd_type(atype)
        if data.shape[-1] % t.type_size != 0:
            raise ValueError(f"{t.name}: byte row length {data.shape[-1]} is not a multiple of type_size {t.type_size}")
        return t
    t = _BY_TYPE_SIZE.get(data.shape[-1])
    if t is None:
        raise ValueError(f"{data.shape[-1]} bytes per block does not match any ATD type_size; pass atype")
    return t


def _as_byte_rows(data) -> np.ndarray:
    """uint8 data as 2-D rows (1-D and bytes-like input become one row)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise ValueError(f"ATD data must be uint8, got {data.dtype}")
    if data.ndim == 1:
        data = data.reshape(1, -1)
    if data.ndim != 2:
        raise ValueError(f"ATD data must be 2-D (rows or blocks, bytes), got shape {data.shape}")
    return data


def unpack_blocks(data: np.ndarray, atype: "AtdType | str | int | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """Unpack (nblocks, type_size) bytes into trits int8 (nblocks, N, B) and scales float16 (nblocks, N).

    The type is inferred from type_size (all eight ATD type sizes are distinct) unless given;
    with atype given, (rows, nbytes) row data and 1-D/bytes input are accepted too.
    Raises ValueError on the invalid 2-bit code 3.
    """
    data = _as_byte_rows(data)
    t = _type_from_bytes(data, atype)
    data = data.reshape(-1, t.type_size)
    nb, n, b = data.shape[0], t.planes, t.block_size
    scales = np.ascontiguousarray(data[:, : 2 * n]).view("<f2").astype(np.float16, copy=False).reshape(nb, n)
    qs = data[:, 2 * n:].reshape(nb, n, 1, b // 4)
    codes = (qs >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    if (codes == 3).any():
        raise ValueError(f"{t.name}: invalid trit code 3 in packed data")
    trits = codes.reshape(nb, n, b).astype(np.int8) - np.int8(1)
    return trits, scales


def dequantize_blocks(data: np.ndarray, atype: "AtdType | str | int | None" = None) -> np.ndarray:
    """(nblocks, type_size) bytes -> (nblocks, B) float32, bit-exact reference:

        y = 0.0f; for i in 0..N-1: y = y + fp16_to_fp32(d[i]) * (float)t_i   (float32, plane order)
    """
    trits, scales = unpack_blocks(data, atype)
    s32 = scales.astype(np.float32)
    if not np.isfinite(s32).all():
        raise ValueError("ATD block has a non-finite (inf/NaN) fp16 scale")
    nb, n, b = trits.shape
    y = np.zeros((nb, b), dtype=np.float32)
    for i in range(n):
        y = y + s32[:, i:i + 1] * trits[:, i, :].astype(np.float32)
    return y


def dequantize(data: np.ndarray, atype: "AtdType | str | int") -> np.ndarray:
    """Dequantize (rows, nbytes) uint8 into (rows, cols) float32."""
    t = atd_type(atype)
    data = _as_byte_rows(data)
    rows, nbytes = data.shape
    if nbytes % t.type_size != 0:
        raise ValueError(f"{t.name}: {nbytes} bytes per row is not a multiple of type_size {t.type_size}")
    nbpr = nbytes // t.type_size
    y = dequantize_blocks(data.reshape(rows * nbpr, t.type_size), t)
    return y.reshape(rows, nbpr * t.block_size)
