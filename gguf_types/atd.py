"""ATD (Adaptive Ternary Decomposition) tensor types: constants table and block codec (format version 2).

A weight block of B weights is stored as N ternary planes T_i in {-1, 0, +1}^B with
one fp16 scale alpha_i per plane:  w ~= sum_i alpha_i * T_i.

Block layout (C, little-endian, no padding), see docs/atd-format.md:

    ATD{N}     B = 256:  struct { uint8_t d[N][2]; uint8_t qs[N][52]; }   54*N bytes
    ATD{N}_64  B = 64:   struct { uint8_t d[N][2]; uint8_t qs[N][13]; }   15*N bytes

d[i] is the fp16 scale of plane i. A plane holds its B trits as S = ceil(B/5) base-3 bytes
(5 trits per byte, 1.6 bits per trit): digit k (k = 0 most significant) of byte j is the code
c = t + 1 of element S*k + j. The byte is stored as the 8-bit fixed-point fraction
ceil(256 * v / 243) of its base-3 value v = sum_k c_k * 3^(4-k), so that digit k is
((x_k * 3) >> 8) with x_0 = byte, x_{k+1} = (x_k * 3) mod 256. Slots S*k + j >= B are padding
and hold code 0. Type ids start at 1000: mainline ggml uses 0..42, ik_llama.cpp 134..399.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "AtdType",
    "ATD_TYPES",
    "ATD_FORMAT_VERSION",
    "ATD_TYPE_ID_BASE",
    "ATD_V1_TYPE_IDS",
    "ATD_ACT_TYPE_ID",
    "GGML_TYPE_COUNT_PATCHED",
    "TRITS_PER_BYTE",
    "UnknownAtdType",
    "atd_type",
    "atd_type_for",
    "fallback_type_name_for",
    "is_atd_type_id",
    "pack_blocks",
    "unpack_blocks",
    "dequantize",
    "dequantize_blocks",
    "validate_blocks",
]

#: version of the on-disk layout below (GGUF key atd.format_version)
ATD_FORMAT_VERSION = 2
#: first ggml type id used by ATD (ATD1); ATD1..ATD4 = 1000..1003, ATD1_64..ATD4_64 = 1004..1007.
ATD_TYPE_ID_BASE = 1000
#: ggml id of the runtime-only activation type of the 64 family (never stored in a file)
ATD_ACT_TYPE_ID = 1008
#: GGML_TYPE_COUNT after the patch (highest id + 1).
GGML_TYPE_COUNT_PATCHED = 1009
#: the ids format version 1 used (2 bits per trit); such files are refused with a re-convert message
ATD_V1_TYPE_IDS = range(200, 208)
#: trits per base-3 byte (3^5 = 243 <= 256)
TRITS_PER_BYTE = 5
_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.int32)  # digit k weighs 3^(4-k)


class UnknownAtdType(KeyError, ValueError):
    """Raised by atd_type() for a name or id that is not an ATD type."""


@dataclass(frozen=True)
class AtdType:
    name: str          # GGUF / gguf-py enum name, e.g. "ATD3" or "ATD3_64"
    ggml_type: int     # ggml type id (1000..1007)
    planes: int        # N, number of ternary planes
    block_size: int    # B, weights per block (256 or 64)

    @property
    def plane_bytes(self) -> int:
        """Base-3 bytes per plane per block: ceil(B / 5) (52 or 13)."""
        return -(-self.block_size // TRITS_PER_BYTE)

    @property
    def type_size(self) -> int:
        """Bytes per block: N fp16 scales and N planes."""
        return self.planes * (2 + self.plane_bytes)

    @property
    def bpw(self) -> float:
        """Bits per weight."""
        return self.type_size * 8 / self.block_size

    @property
    def ggml_name(self) -> str:
        """ggml type_traits name ("atd3", "atd3_64")."""
        return self.name.lower()

    @property
    def activation_type(self) -> str:
        """ggml vec_dot activation type of the CPU kernels."""
        return "q8_K" if self.block_size == 256 else "atd_q8_64"


def _make_table() -> tuple[AtdType, ...]:
    types = [AtdType(f"ATD{n}", ATD_TYPE_ID_BASE + n - 1, n, 256) for n in range(1, 5)]
    types += [AtdType(f"ATD{n}_64", ATD_TYPE_ID_BASE + 4 + n - 1, n, 64) for n in range(1, 5)]
    return tuple(types)


#: The single constants table for all ATD types.
ATD_TYPES: tuple[AtdType, ...] = _make_table()

_BY_NAME = {t.name: t for t in ATD_TYPES}
_BY_ID = {t.ggml_type: t for t in ATD_TYPES}
_BY_TYPE_SIZE = {t.type_size: t for t in ATD_TYPES}
assert len(_BY_TYPE_SIZE) == len(ATD_TYPES)  # type_size identifies the type uniquely


def atd_type(name_or_id: "str | int | AtdType") -> AtdType:
    """Look up an ATD type by name ("ATD3", "atd3_64"), ggml id (1002) or enum member."""
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
            raise UnknownAtdType(f"ggml type id {int(name_or_id)} is not an ATD type (ATD ids are 1000..1007)")
        return t
    raise UnknownAtdType(f"cannot look up an ATD type from {name_or_id!r}")


def is_atd_type_id(type_id: int) -> bool:
    """True for the ggml type ids of the ATD types (1000..1007)."""
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


def _byte_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ENCODE[v] (v = 0..242) -> stored byte; DIGITS[byte] -> its 5 codes; CANONICAL[byte]."""
    v = np.arange(243, dtype=np.int64)
    encode = ((v * 256 + 242) // 243).astype(np.uint8)  # ceil(256 v / 243)
    x = np.arange(256, dtype=np.int64)
    digits = np.empty((256, TRITS_PER_BYTE), dtype=np.uint8)
    for k in range(TRITS_PER_BYTE):  # the decoder's arithmetic, exactly
        digits[:, k] = (x * 3) >> 8
        x = (x * 3) & 0xFF
    canonical = np.zeros(256, dtype=bool)
    canonical[encode] = True
    assert (digits[encode].astype(np.int32) @ _POW3 == v).all()
    return encode, digits, canonical


_ENCODE, _DIGITS, _CANONICAL = _byte_tables()


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
    s = -(-b // TRITS_PER_BYTE)
    codes = np.zeros((nb, n, TRITS_PER_BYTE * s), dtype=np.int32)  # padding slots: code 0
    codes[:, :, :b] = t + 1
    v = np.tensordot(codes.reshape(nb, n, TRITS_PER_BYTE, s), _POW3, axes=([2], [0]))  # (nb, n, s)
    qs = _ENCODE[v]
    d = np.ascontiguousarray(scales).astype("<f2", copy=False).view(np.uint8).reshape(nb, 2 * n)
    return np.concatenate([d, qs.reshape(nb, n * s)], axis=1)


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


def _block_problem(qs: np.ndarray, codes: np.ndarray, b: int) -> str | None:
    """Why packed planes (nb, N, S) with their codes (nb, N, 5*S) are not a valid encoding, or None."""
    if not _CANONICAL[qs].all():
        bad = int(qs[~_CANONICAL[qs]][0])
        return f"byte {bad} is not a canonical base-3 byte (the encoder never writes it)"
    if (codes[:, :, b:] != 0).any():
        return "a padding trit slot (element >= block size) is not code 0"
    return None


def unpack_blocks(data: np.ndarray, atype: "AtdType | str | int | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """Unpack (nblocks, type_size) bytes into trits int8 (nblocks, N, B) and scales float16 (nblocks, N).

    The type is inferred from type_size (all eight ATD type sizes are distinct) unless given;
    with atype given, (rows, nbytes) row data and 1-D/bytes input are accepted too.
    Raises ValueError on bytes the encoder never writes (non-canonical bytes, nonzero padding).
    """
    data = _as_byte_rows(data)
    t = _type_from_bytes(data, atype)
    data = data.reshape(-1, t.type_size)
    nb, n, b, s = data.shape[0], t.planes, t.block_size, t.plane_bytes
    scales = np.ascontiguousarray(data[:, : 2 * n]).view("<f2").astype(np.float16, copy=False).reshape(nb, n)
    qs = data[:, 2 * n:].reshape(nb, n, s)
    codes = _DIGITS[qs].transpose(0, 1, 3, 2).reshape(nb, n, TRITS_PER_BYTE * s)  # slot S*k + j
    problem = _block_problem(qs, codes, b)
    if problem is not None:
        raise ValueError(f"{t.name}: invalid packed data: {problem}")
    trits = codes[:, :, :b].astype(np.int8) - np.int8(1)
    return trits, scales


def validate_blocks(data: np.ndarray, atype: "AtdType | str | int") -> str | None:
    """Why ATD bytes (rows, nbytes) are malformed (non-canonical byte, nonzero padding, non-finite
    scale), or None if every block is a valid encoding. The checks of ggml_validate_row_data."""
    t = atd_type(atype)
    data = _as_byte_rows(data)
    if data.shape[-1] % t.type_size != 0:
        return f"{data.shape[-1]} bytes per row is not a multiple of type_size {t.type_size}"
    from . import _native  # the C validator first (fast); numpy only to name the problem

    if _native.native_available() and _native.validate_rows(data, t):
        return None
    blocks = data.reshape(-1, t.type_size)
    n, s = t.planes, t.plane_bytes
    scales = np.ascontiguousarray(blocks[:, : 2 * n]).view("<f2")
    if not np.isfinite(scales).all():
        return "a non-finite (inf/NaN) fp16 scale"
    qs = blocks[:, 2 * n:].reshape(-1, n, s)
    return _block_problem(qs, _DIGITS[qs].transpose(0, 1, 3, 2).reshape(qs.shape[0], n, TRITS_PER_BYTE * s),
                          t.block_size)


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


def dequantize_fast(data: np.ndarray, atype: "AtdType | str | int") -> np.ndarray:
    """dequantize() for bulk data: the C validator and decoder when the extension is built (bit-exact
    with dequantize(), tests/test_ggml_ext.py), else dequantize(); invalid data goes to dequantize()
    too, which raises ValueError naming the problem."""
    t = atd_type(atype)
    data = _as_byte_rows(data)
    from . import _native

    if _native.native_available() and data.shape[-1] % t.type_size == 0 and _native.validate_rows(data, t):
        return _native.dequantize_rows(data, t)
    return dequantize(data, t)
