"""Per-tensor summary of a GGUF file: type, shape, bytes, bits per weight."""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np

import gguf_types  # noqa: F401  registers the ATD types with gguf-py's reader

from .errors import AtdError


@dataclass(frozen=True)
class TensorSummary:
    name: str
    type: str
    shape: list[int]
    n_params: int
    n_bytes: int

    @property
    def bpw(self) -> float:
        return 8.0 * self.n_bytes / self.n_params if self.n_params else 0.0


@dataclass(frozen=True)
class FileSummary:
    path: str
    file_size: int
    architecture: str | None
    metadata: dict[str, object]
    tensors: list[TensorSummary]
    plan: dict | None = None  # atd.plan: the size plan of `convert --target-size/--bpw`

    @property
    def n_params(self) -> int:
        return sum(t.n_params for t in self.tensors)

    @property
    def n_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def bpw(self) -> float:
        return 8.0 * self.n_bytes / self.n_params if self.n_params else 0.0

    def type_totals(self) -> dict[str, tuple[int, int, int]]:
        """type -> (tensors, params, bytes)"""
        totals: dict[str, tuple[int, int, int]] = {}
        for t in self.tensors:
            n, p, b = totals.get(t.type, (0, 0, 0))
            totals[t.type] = (n + 1, p + t.n_params, b + t.n_bytes)
        return totals

    def to_json(self) -> dict:
        """The summary as JSON-safe values: NaN and ±Infinity (not JSON) are written as null."""
        return _finite_or_null({
            "path": self.path, "file_size": self.file_size, "architecture": self.architecture,
            "metadata": self.metadata, "n_params": self.n_params, "n_bytes": self.n_bytes, "bpw": self.bpw,
            "tensors": [asdict(t) | {"bpw": t.bpw} for t in self.tensors], "plan": self.plan,
        })


def _finite_or_null(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def printable(text: object) -> str:
    """text safe to print on one terminal line: control and format characters (escape sequences, OSC,
    line breaks, bidi overrides) are shown as Python escapes instead of being sent raw."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def string_value(field: gguf.ReaderField) -> str:
    """A scalar STRING field; gguf-py's contents() raises on strings that are not UTF-8."""
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


# --- a bounded scan of the GGUF header ------------------------------------------------------------
# gguf-py's GGUFReader trusts every declared length (an array of 2^40 items makes it loop without end)
# and builds Python objects per array item (a 128k-token vocabulary costs seconds and hundreds of MB).
# scan_gguf() reads the header itself, bounding each length by the bytes left in the file, and keeps
# arrays as (item type, count) only; GGUFReader is used after it, and only where all values are needed.

class MalformedGguf(ValueError):
    """The header of a GGUF file cannot be read; the message says what is wrong."""


ValueType = gguf.GGUFValueType
_SCALAR_FORMATS = {
    ValueType.UINT8: "B", ValueType.INT8: "b", ValueType.UINT16: "H", ValueType.INT16: "h",
    ValueType.UINT32: "I", ValueType.INT32: "i", ValueType.UINT64: "Q", ValueType.INT64: "q",
    ValueType.FLOAT32: "f", ValueType.FLOAT64: "d", ValueType.BOOL: "?",
}
_MIN_KV_BYTES = 8 + 4 + 1                # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8   # name length, n_dims, type, offset
_MIN_ITEM_BYTES = ({ValueType.STRING: 8, ValueType.ARRAY: 4 + 8}     # a length; an item type and a count
                   | {t: struct.calcsize(f) for t, f in _SCALAR_FORMATS.items()})


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array, without its items."""

    item_type: gguf.GGUFValueType
    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int
    shape: tuple[int, ...]   # ggml order (ne0 first), like gguf-py's ReaderTensor.shape
    offset: int              # of the tensor data, from the start of the file
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class GgufLayout:
    path: Path
    file_size: int
    metadata: dict[str, object]   # key -> str / int / float / bool, or ArrayInfo
    tensors: list[TensorInfo]


class _Cursor:
    """Reads little- or big-endian values from a buffer; every length is checked against what is left."""

    def __init__(self, buffer, endian: str):
        self.buffer, self.endian, self.pos = buffer, endian, 0

    def left(self) -> int:
        return len(self.buffer) - self.pos

    def take(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        if size > self.left():
            raise MalformedGguf(f"{what} runs past the end of the file")
        value = struct.unpack_from(self.endian + fmt, self.buffer, self.pos)[0]
        self.pos += size
        return value

    def count(self, what: str, item_bytes: int) -> int:
        n = self.take("Q", what)
        if n * item_bytes > self.left():
            raise MalformedGguf(f"{what} declares {n:,} items, more than the {self.left():,} bytes left in the file "
                                "can hold")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"the length of {what}", 1)
        data = bytes(self.buffer[self.pos:self.pos + n])
        self.pos += n
        return data.decode("utf-8", errors="replace")

    def skip_array(self, item_type: int, n: int, what: str) -> None:
        if item_type in _SCALAR_FORMATS:
            self.pos += n * struct.calcsize(_SCALAR_FORMATS[item_type])  # bounded by count()
        elif item_type == ValueType.STRING:
            for _ in range(n):
                length = self.count(f"a string of {what}", 1)
                self.pos += length
        elif item_type == ValueType.ARRAY:
            for _ in range(n):
                inner = self.value_type(f"an item of {what}")
                self.skip_array(inner, self.count(f"an array in {what}", _MIN_ITEM_BYTES[inner]), what)
        else:
            raise MalformedGguf(f"{what} has items of unknown type {item_type}")

    def value_type(self, what: str) -> gguf.GGUFValueType:
        raw = self.take("I", f"the type of {what}")
        try:
            return ValueType(raw)
        except ValueError:
            raise MalformedGguf(f"{what} has the unknown value type {raw}") from None


def _scan(buffer, file_size: int) -> tuple[dict[str, object], list[TensorInfo]]:
    if bytes(buffer[:4]) != b"GGUF":
        raise MalformedGguf("no GGUF magic")
    # gguf-py's rule: a version whose low 16 bits are zero is a big-endian file's
    cur = _Cursor(buffer, ">" if struct.unpack_from("<I", buffer, 4)[0] & 0xFFFF == 0 else "<")
    cur.pos = 4
    version = cur.take("I", "the version")
    if version not in (2, 3):
        raise MalformedGguf(f"GGUF version {version} (only 2 and 3 are read)")
    n_tensors = cur.take("Q", "the tensor count")
    n_kv = cur.take("Q", "the metadata count")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left():
        raise MalformedGguf(f"{n_kv:,} metadata entries and {n_tensors:,} tensors cannot fit in the "
                            f"{cur.left():,} bytes left in the file")
    metadata: dict[str, object] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in metadata:
            raise MalformedGguf(f"duplicate metadata key {key!r}")
        kind = cur.value_type(f"metadata {key!r}")
        if kind == ValueType.STRING:
            metadata[key] = cur.string(f"metadata {key!r}")
        elif kind == ValueType.ARRAY:
            item_type = cur.value_type(f"the items of metadata {key!r}")
            n = cur.count(f"array {key!r}", _MIN_ITEM_BYTES.get(item_type, 1))
            cur.skip_array(item_type, n, f"array {key!r}")
            metadata[key] = ArrayInfo(item_type, n)
        else:
            metadata[key] = cur.take(_SCALAR_FORMATS[kind], f"metadata {key!r}")
    try:
        return metadata, _scan_tensors(cur, metadata, n_tensors, file_size)
    except MalformedGguf as e:
        e.metadata = metadata  # an ATD format 1 file fails here, and its metadata says so
        raise


def _scan_tensors(cur: _Cursor, metadata: dict[str, object], n_tensors: int, file_size: int) -> list[TensorInfo]:
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise MalformedGguf(f"general.alignment {alignment!r} is not a power of two")
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}")
        n_dims = cur.take("I", f"the dimension count of tensor {name!r}")
        if n_dims * 8 > cur.left():
            raise MalformedGguf(f"tensor {name!r} declares {n_dims:,} dimensions, more than the file can hold")
        shape = tuple(cur.take("Q", f"the shape of tensor {name!r}") for _ in range(n_dims))
        infos.append((name, shape, cur.take("I", f"the type of tensor {name!r}"), cur.take("Q", f"tensor {name!r}")))
    data_start = -(-cur.pos // alignment) * alignment
    tensors, names = [], set()
    for name, shape, type_id, offset in infos:
        if name in names:
            raise MalformedGguf(f"duplicate tensor name {name!r}")
        names.add(name)
        try:
            block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
        except (ValueError, KeyError):
            raise MalformedGguf(f"tensor {name!r} has the unknown ggml type {type_id}") from None
        n_elements = math.prod(shape)
        if not shape or shape[0] % block_size:
            raise MalformedGguf(f"tensor {name!r}: rows of {shape[0] if shape else 0} elements are not whole "
                                f"blocks of {block_size}")
        n_bytes = n_elements // block_size * type_size
        if data_start + offset + n_bytes > file_size:
            raise MalformedGguf(f"tensor {name!r}: its data ({n_bytes:,} bytes at offset {offset:,}) is not within "
                                "the file")
        tensors.append(TensorInfo(name, type_id, shape, data_start + offset, n_elements, n_bytes))
    return tensors


def scan_gguf(path: Path) -> GgufLayout:
    """The metadata (arrays as ArrayInfo) and tensor layout of a GGUF file. Raises MalformedGguf or OSError."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise MalformedGguf("the file is too short for a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            metadata, tensors = _scan(buffer, size)
    return GgufLayout(path, size, metadata, tensors)


def _atd_version_error(path: Path, metadata: dict[str, object]) -> AtdError | None:
    version = metadata.get("atd.format_version")
    if type(version) is int and version != gguf_types.ATD_FORMAT_VERSION:
        return AtdError(f"{printable(path)}: an ATD format version {version} file, which this atd-gguf does not "
                        f"read (it reads format {gguf_types.ATD_FORMAT_VERSION}); re-convert the model with "
                        "`atd-gguf convert`")
    return None


def read_layout(path: str | Path) -> GgufLayout:
    """scan_gguf() with one-line AtdErrors (another ATD format version gets its own message)."""
    path = Path(path)
    if path.is_dir():
        raise AtdError(f"{printable(path)}: is a directory, not a GGUF file")
    if not path.is_file():
        raise AtdError(f"{printable(path)}: no such file")
    try:
        layout = scan_gguf(path)
    except MalformedGguf as e:
        raise (_atd_version_error(path, getattr(e, "metadata", {}))
               or AtdError(f"{printable(path)}: not a readable GGUF file ({printable(e)})")) from None
    except OSError as e:
        raise AtdError(f"{printable(path)}: cannot read ({e.strerror or e})") from None
    return layout


def read_gguf(path: Path) -> gguf.GGUFReader:
    """gguf-py's reader, for callers that need every metadata value; the header is checked first."""
    read_layout(path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise AtdError(f"{printable(path)}: not a readable GGUF file ({printable(e)})") from None


def _tensor_bytes(path: Path, t: TensorInfo) -> np.ndarray:
    """The tensor's bytes as (rows, bytes per row), memory-mapped."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.type_id)]
    row_bytes = t.shape[0] // block_size * type_size
    return np.memmap(path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.n_bytes,)).reshape(-1, row_bytes)


def check_atd_data(reader: gguf.GGUFReader | GgufLayout, path: Path) -> None:
    """Raise AtdError on the first ATD tensor whose bytes are not a valid encoding (the checks of the
    patched ggml_validate_row_data: canonical base-3 bytes, zero padding trits, finite scales)."""
    if isinstance(reader, GgufLayout):
        tensors = [(t.name, t.type_id, t.n_bytes, lambda t=t: _tensor_bytes(path, t)) for t in reader.tensors]
    else:
        tensors = [(t.name, int(t.tensor_type), int(t.n_bytes), lambda t=t: np.asarray(t.data))
                   for t in reader.tensors]
    for name, type_id, n_bytes, data in tensors:
        if gguf_types.is_atd_type_id(type_id) and n_bytes:
            problem = gguf_types.validate_blocks(data(), type_id)
            if problem is not None:
                raise AtdError(f"{printable(path)}: tensor {printable(name)} "
                               f"({gguf.GGMLQuantizationType(type_id).name}) holds invalid data: {problem}")


def inspect_layout(layout: GgufLayout) -> FileSummary:
    path = layout.path
    check_atd_data(layout, path)
    metadata = {}
    for key, value in layout.metadata.items():
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.pre":
            continue
        if not isinstance(value, ArrayInfo) and not (isinstance(value, str) and len(value) > 200):
            metadata[key] = value
    tensors = [TensorSummary(t.name, gguf.GGMLQuantizationType(t.type_id).name, list(t.shape), t.n_elements,
                             t.n_bytes) for t in layout.tensors]
    arch = metadata.get("general.architecture")
    plan = None
    if isinstance(raw_plan := layout.metadata.get("atd.plan"), str):
        try:
            plan = json.loads(raw_plan)
        except ValueError:
            raise AtdError(f"{printable(path)}: atd.plan is not valid JSON") from None
        if not isinstance(plan, dict):
            raise AtdError(f"{printable(path)}: atd.plan is not a JSON object")
    return FileSummary(str(path), layout.file_size, arch if isinstance(arch, str) else None, metadata, tensors, plan)


def inspect_file(path: str | Path) -> FileSummary:
    return inspect_layout(read_layout(path))


_LINEAR = re.compile(r"^blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


def planes_table(tensors: list[TensorSummary]) -> list[str]:
    """Planes of every attention/FFN matrix: one line per role, one digit per layer ("s": a stock type)."""
    grid: dict[str, dict[int, str]] = {}
    for t in tensors:
        m = _LINEAR.match(t.name)
        if m:
            planes = re.match(r"^ATD(\d)", t.type)
            grid.setdefault(m.group(2), {})[int(m.group(1))] = planes.group(1) if planes else "s"
    layers = sorted({i for row in grid.values() for i in row})
    if not layers:
        return []
    lines = [f"{'layer':<12} " + "".join(str(i % 10) for i in layers)]
    lines += [f"{role:<12} " + "".join(row.get(i, ".") for i in layers) for role, row in grid.items()]
    return lines


def format_summary(summary: FileSummary, per_tensor: bool = True) -> str:
    lines = []
    if per_tensor:
        width = max((len(printable(t.name)) for t in summary.tensors), default=4)
        lines.append(f"{'tensor':<{width}}  {'type':<8} {'shape':<18} {'bytes':>12} {'bpw':>7}")
        for t in summary.tensors:
            shape = "×".join(str(d) for d in t.shape)
            lines.append(f"{printable(t.name):<{width}}  {t.type:<8} {shape:<18} {t.n_bytes:>12,} {t.bpw:>7.3f}")
        lines.append("")
    lines.append(f"{'type':<8} {'tensors':>7} {'params':>14} {'bytes':>14} {'bpw':>7}")
    for qtype, (n, params, nbytes) in sorted(summary.type_totals().items(), key=lambda kv: -kv[1][2]):
        lines.append(f"{qtype:<8} {n:>7} {params:>14,} {nbytes:>14,} {8 * nbytes / params:>7.3f}")
    lines.append(f"{'total':<8} {len(summary.tensors):>7} {summary.n_params:>14,} {summary.n_bytes:>14,} "
                 f"{summary.bpw:>7.3f}")
    lines.append(f"file {summary.path}: {summary.file_size:,} bytes ({summary.file_size / 2**20:.1f} MiB), "
                 f"architecture {summary.architecture}")
    atd = {k: v for k, v in summary.metadata.items() if k.startswith("atd.") and k != "atd.plan"}
    if atd:
        lines.append("ATD: " + ", ".join(f"{k[4:]}={v}" for k, v in atd.items()))
    if summary.plan is not None:
        p = summary.plan
        lines.append(f"ATD plan: {p.get('target', '?')}, {p.get('file_bytes', 0):,} bytes planned, "
                     f"{p.get('bpw', 0):.4f} bpw, estimated loss increase {p.get('est_error', 0):.4g} "
                     f"({p.get('method', '?')} solver); embeddings: "
                     + ", ".join(f"{k.split('.')[0]} {v}" for k, v in (p.get("embeddings") or {}).items()))
        lines += ["planes per layer:"] + ["  " + line for line in planes_table(summary.tensors)]
    # names, paths and metadata come from the file: nothing in them may reach the terminal raw
    return "\n".join(printable(line) for line in lines)


def dequantized(path: str | Path, name: str) -> np.ndarray:
    """float32 values of one tensor, through gguf-py's dequantize (ATD types included)."""
    reader = read_gguf(Path(path))
    for t in reader.tensors:
        if t.name == name:
            return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
    raise AtdError(f"{path}: no tensor {name}")
