"""ATD (Adaptive Ternary Decomposition) GGUF tensor types.

    W ~= sum_{i<N} alpha_i * T_i,  T_i in {-1,0,+1}, one fp16 alpha per plane per block.

See docs/atd-format.md for the byte-exact format and the reproducible fit.
Importing this package registers the types with gguf-py (register_with_gguf()).
"""

from .atd import (
    ATD_ACT_TYPE_ID,
    ATD_FORMAT_VERSION,
    ATD_TYPES,
    ATD_TYPE_ID_BASE,
    ATD_V1_TYPE_IDS,
    GGML_TYPE_COUNT_PATCHED,
    AtdType,
    UnknownAtdType,
    atd_type,
    atd_type_for,
    dequantize,
    dequantize_fast,
    dequantize_blocks,
    fallback_type_name_for,
    is_atd_type_id,
    pack_blocks,
    unpack_blocks,
    validate_blocks,
)
from ._native import native_available
from .fit import DEFAULT_CANDIDATES, DEFAULT_ITERS, METHODS, fit_blocks, quantize
from .register import gguf_qtype, register_with_gguf

__all__ = [
    "AtdType",
    "ATD_TYPES",
    "ATD_FORMAT_VERSION",
    "ATD_TYPE_ID_BASE",
    "ATD_V1_TYPE_IDS",
    "ATD_ACT_TYPE_ID",
    "GGML_TYPE_COUNT_PATCHED",
    "UnknownAtdType",
    "atd_type",
    "atd_type_for",
    "fallback_type_name_for",
    "is_atd_type_id",
    "quantize",
    "dequantize",
    "dequantize_fast",
    "dequantize_blocks",
    "fit_blocks",
    "pack_blocks",
    "unpack_blocks",
    "validate_blocks",
    "register_with_gguf",
    "gguf_qtype",
    "DEFAULT_ITERS",
    "DEFAULT_CANDIDATES",
    "METHODS",
    "native_available",
]

register_with_gguf()
