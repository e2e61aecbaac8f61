"""Teach gguf-py (0.19.0) about the ATD types. All gguf-py patching lives here.

register_with_gguf() is idempotent and is called when gguf_types is imported. It
(1) adds ATD1..ATD4, ATD1_64..ATD4_64 as members of gguf.GGMLQuantizationType (ids 200..207),
(2) adds their (block_size, type_size) to gguf.constants.GGML_QUANT_SIZES (same dict as
    gguf.GGML_QUANT_SIZES),
(3) registers a gguf.quants quantizer class per type so gguf.quants.quantize/dequantize work
    (quantize uses the default grid fit without importance).
"""

from __future__ import annotations

import enum

import gguf
import gguf.constants
import gguf.quants
import numpy as np

from .atd import ATD_TYPES, AtdType, dequantize_blocks, pack_blocks
from .fit import fit_blocks

__all__ = ["register_with_gguf", "gguf_qtype"]

# gguf.quants' abstract base is named "__Quant" at module level; fetch it here (at module level)
# because inside a class body the name would be mangled.
_QuantBase = getattr(gguf.quants, "__Quant")

_registered = False


def _add_enum_member(cls: type[enum.IntEnum], name: str, value: int) -> enum.IntEnum:
    existing = cls._value2member_map_.get(value)
    if existing is not None:
        if existing.name != name:
            raise RuntimeError(f"{cls.__name__} value {value} is already {existing.name}, cannot add {name}")
        return existing
    if name in cls._member_map_:
        raise RuntimeError(f"{cls.__name__}.{name} already exists with value {int(cls._member_map_[name])}")
    member = int.__new__(cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = cls
    try:
        member._sort_order_ = len(cls._member_names_)
    except AttributeError:  # pragma: no cover - older enum implementations
        pass
    type.__setattr__(cls, name, member)
    cls._value2member_map_[value] = member
    cls._member_map_[name] = member
    cls._member_names_.append(name)
    return member


def gguf_qtype(atype: AtdType) -> gguf.GGMLQuantizationType:
    """The gguf.GGMLQuantizationType member of an ATD type (after registration)."""
    register_with_gguf()
    return gguf.GGMLQuantizationType(atype.ggml_type)


def _make_quant_class(atype: AtdType, qtype) -> type:
    n = atype.planes

    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        blocks = np.asarray(blocks, dtype=np.float32)
        if not np.isfinite(blocks).all():
            raise ValueError(f"{atype.name}: weights contain NaN/Inf")
        trits, scales = fit_blocks(blocks, n, "grid")
        return pack_blocks(trits, scales)

    def dequantize_blocks_(cls, blocks: np.ndarray) -> np.ndarray:
        return dequantize_blocks(np.asarray(blocks, dtype=np.uint8), atype)

    ns = {
        "__module__": __name__,
        "__doc__": f"gguf-py quantizer for {atype.name} (ggml type {atype.ggml_type}).",
        "quantize_blocks": classmethod(quantize_blocks),
        "dequantize_blocks": classmethod(dequantize_blocks_),
    }
    return type(atype.name, (_QuantBase,), ns, qtype=qtype)


_QUANT_CLASSES: dict[int, type] = {}


def register_with_gguf() -> None:
    """Register all ATD types with gguf-py. Safe to call any number of times."""
    global _registered
    if _registered:
        return
    for t in ATD_TYPES:
        qtype = _add_enum_member(gguf.GGMLQuantizationType, t.name, t.ggml_type)
        sizes = (t.block_size, t.type_size)
        old = gguf.constants.GGML_QUANT_SIZES.get(qtype)
        if old is not None and tuple(old) != sizes:
            raise RuntimeError(f"GGML_QUANT_SIZES[{t.name}] is {old}, expected {sizes}")
        gguf.constants.GGML_QUANT_SIZES[qtype] = sizes
        traits = gguf.quants._type_traits
        if qtype not in traits:
            _QUANT_CLASSES[t.ggml_type] = _make_quant_class(t, qtype)
    _registered = True
