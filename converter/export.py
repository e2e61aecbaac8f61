"""ATD GGUF -> stock-typed GGUF (`atd-gguf export --stock`), for runtimes without the ATD types.

Every ATD tensor is reconstructed (sum of alpha_i * T_i, exactly as ggml's dequantize does) and
re-encoded as Q8_0 or F16; all other tensors and every metadata key are copied unchanged, except
general.file_type. Streams one tensor at a time into a temp file that is renamed at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType

import gguf_types

from . import __version__
from .convert import tensor_nbytes
from .errors import AtdError
from .fsutil import atomic_output, check_output_path, refuse_inputs_as_output
from .inspect_gguf import read_gguf

EXPORT_TYPES: dict[str, tuple[QT, LlamaFileType]] = {
    "q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "f16": (QT.F16, LlamaFileType.MOSTLY_F16),
}
# provenance: the stock type the ATD tensors were rewritten as (the atd.* keys of the source stay)
EXPORTED_AS_KEY = "atd.exported_as"
F16_MAX = 65504.0


@dataclass(frozen=True)
class ExportResult:
    path: Path
    n_tensors: int
    n_rewritten: int
    n_params: int
    n_bytes: int
    dropped_keys: tuple[str, ...] = ()  # empty metadata arrays, which gguf-py cannot write


def reconstruct(tensor: gguf.ReaderTensor) -> np.ndarray:
    """float32 values of an ATD tensor in numpy order (3-D expert stacks too); AtdError on invalid data."""
    atype = gguf_types.atd_type(int(tensor.tensor_type))
    data = np.asarray(tensor.data, dtype=np.uint8)
    rows = data.reshape(-1, data.shape[-1])
    try:
        values = gguf_types.dequantize_fast(rows, atype)
    except ValueError as e:
        raise AtdError(f"tensor {tensor.name}: invalid {atype.name} data ({e})") from None
    if not np.isfinite(values).all():
        raise AtdError(f"tensor {tensor.name}: its {atype.name} reconstruction has NaN or Inf values")
    return values.reshape([int(d) for d in reversed(tensor.shape)])


def _field_value(field: gguf.ReaderField) -> object:
    """The field's value as the writer takes it; strings stay raw bytes (not every GGUF string is UTF-8)."""
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]])
    if vtype == gguf.GGUFValueType.ARRAY and field.types[-1] == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]) for i in field.data]
    return field.contents()


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, file_type: int,
                   export_type: str) -> tuple[str, ...]:
    """Copy every key with its value type; returns the keys left out (empty arrays)."""
    dropped = []
    for field in reader.fields.values():
        # GGUF.* are the reader's virtual fields; the writer adds general.architecture itself
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        if field.name == gguf.Keys.General.ALIGNMENT and _usable_alignment(reader) is None:
            continue  # the copy uses the default alignment instead
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY and len(field.data) == 0:
            dropped.append(field.name)
            continue
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = file_type if field.name == gguf.Keys.General.FILE_TYPE else _field_value(field)
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
    if gguf.Keys.General.FILE_TYPE not in reader.fields:
        writer.add_file_type(file_type)
    writer.add_string(EXPORTED_AS_KEY, f"{export_type} (atd-gguf {__version__} export --stock)")
    return tuple(dropped)


def _usable_alignment(reader: gguf.GGUFReader) -> int | None:
    """The source's general.alignment when it is one the runtime handles (a power of two, at least
    the default 32 that ggml's SIMD loads assume); None: write the default layout without the key."""
    field = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if field is None or len(field.types) != 1 or field.types[0] != gguf.GGUFValueType.UINT32:
        return None
    value = int(field.contents())
    return value if value >= gguf.GGUF_DEFAULT_ALIGNMENT and value & (value - 1) == 0 else None


def _encode(tensor: gguf.ReaderTensor, qtype: QT) -> np.ndarray:
    values = reconstruct(tensor)
    if qtype == QT.F16 and np.abs(values).max(initial=0.0) > F16_MAX:
        raise AtdError(f"tensor {tensor.name}: values beyond the F16 range (|w| > {F16_MAX:g}); use --type q8_0")
    return gguf.quants.quantize(values, qtype)


def export_stock(source: str | Path, output: str | Path, export_type: str = "q8_0", *,
                 force: bool = False, progress: bool = True) -> ExportResult:
    """Write `output`: `source` with every ATD tensor rewritten as `export_type` (q8_0 or f16)."""
    if export_type not in EXPORT_TYPES:
        raise AtdError(f"--type must be one of {', '.join(EXPORT_TYPES)}, got {export_type!r}")
    source, output = Path(source), Path(output)
    check_output_path(output, force)
    refuse_inputs_as_output(output, [source])
    reader = read_gguf(source)
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise AtdError(f"{source} is a big-endian GGUF; ATD files are little-endian")
    atd_names = [t.name for t in reader.tensors if gguf_types.is_atd_type_id(t.tensor_type)]
    if not atd_names:
        raise AtdError(f"{source} has no ATD tensors: stock llama.cpp and Ollama load it as it is")
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise AtdError(f"{source}: no general.architecture in the metadata")
    alignment = _usable_alignment(reader)
    qtype, file_type = EXPORT_TYPES[export_type]

    writer = gguf.GGUFWriter(path=None, arch=str(arch_field.contents()))
    if alignment is not None:
        writer.data_alignment = alignment
    plan: list[tuple[gguf.ReaderTensor, QT]] = []
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if gguf_types.is_atd_type_id(tensor.tensor_type):
            # ATD rows are whole 64/256-blocks, so they always fill Q8_0's 32-blocks
            plan.append((tensor, qtype))
            writer.add_tensor_info(tensor.name, shape, np.dtype(np.float32), tensor_nbytes(qtype, shape),
                                   raw_dtype=qtype)
        else:
            plan.append((tensor, tensor.tensor_type))
            writer.add_tensor_info(tensor.name, shape, np.dtype(np.float32), int(tensor.n_bytes),
                                   raw_dtype=tensor.tensor_type)
    dropped = _copy_metadata(reader, writer, int(file_type), export_type)

    n_params = n_bytes = 0
    with atomic_output(output, force, [source]) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            from tqdm import tqdm

            with tqdm(total=sum(int(t.n_elements) for t, _ in plan), unit="w", unit_scale=True,
                      disable=None if progress else True, desc="exporting", leave=False) as bar:
                for tensor, out_type in plan:
                    bar.set_postfix_str(tensor.name, refresh=False)
                    if gguf_types.is_atd_type_id(tensor.tensor_type):
                        data = _encode(tensor, out_type)
                    else:
                        data = np.asarray(tensor.data)
                    data = np.ascontiguousarray(data)
                    writer.write_tensor_data(data)
                    n_params += int(tensor.n_elements)
                    n_bytes += data.nbytes
                    bar.update(int(tensor.n_elements))
                    del data
        finally:
            writer.close()
    return ExportResult(output, len(plan), len(atd_names), n_params, n_bytes, dropped)


__all__ = ["EXPORT_TYPES", "EXPORTED_AS_KEY", "ExportResult", "export_stock", "reconstruct"]
