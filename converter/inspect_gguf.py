"""Per-tensor summary of a GGUF file: type, shape, bytes, bits per weight."""

from __future__ import annotations

import json
import re
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
        return {
            "path": self.path, "file_size": self.file_size, "architecture": self.architecture,
            "metadata": self.metadata, "n_params": self.n_params, "n_bytes": self.n_bytes, "bpw": self.bpw,
            "tensors": [asdict(t) | {"bpw": t.bpw} for t in self.tensors], "plan": self.plan,
        }


def string_value(field: gguf.ReaderField) -> str:
    """A scalar STRING field; gguf-py's contents() raises on strings that are not UTF-8."""
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _scalar(field: gguf.ReaderField) -> object | None:
    if len(field.types) != 1 or field.types[0] == gguf.GGUFValueType.ARRAY:
        return None
    if field.types[0] == gguf.GGUFValueType.STRING:
        return string_value(field)
    return field.contents()


class _MetadataReader(gguf.GGUFReader):
    """GGUFReader that stops after the metadata: its tensor types are not looked up."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        self.tensors = []


def _unreadable(path: Path, error: Exception) -> AtdError:
    """One line on why GGUFReader failed; another ATD format version gets its own message."""
    try:
        field = _MetadataReader(path).get_field("atd.format_version")
        version = field.contents() if field is not None else None
    except Exception:  # noqa: BLE001 - the metadata is unreadable too: the generic message
        version = None
    if isinstance(version, int) and version != gguf_types.ATD_FORMAT_VERSION:
        return AtdError(f"{path}: an ATD format version {version} file, which this atd-gguf does not read (it "
                        f"reads format {gguf_types.ATD_FORMAT_VERSION}); re-convert the model with `atd-gguf convert`")
    return AtdError(f"{path}: not a readable GGUF file ({error})")


def read_gguf(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise AtdError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise _unreadable(path, e) from None


def check_atd_data(reader: gguf.GGUFReader, path: Path) -> None:
    """Raise AtdError on the first ATD tensor whose bytes are not a valid encoding (the checks of the
    patched ggml_validate_row_data: canonical base-3 bytes, zero padding trits, finite scales)."""
    for t in reader.tensors:
        if gguf_types.is_atd_type_id(t.tensor_type):
            problem = gguf_types.validate_blocks(np.asarray(t.data), int(t.tensor_type))
            if problem is not None:
                raise AtdError(f"{path}: tensor {t.name} ({t.tensor_type.name}) holds invalid data: {problem}")


def inspect_file(path: str | Path) -> FileSummary:
    path = Path(path)
    reader = read_gguf(path)
    check_atd_data(reader, path)
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.pre":
            continue
        value = _scalar(field)
        if value is not None and not (isinstance(value, str) and len(value) > 200):
            metadata[key] = value
    tensors = [
        TensorSummary(t.name, t.tensor_type.name, [int(d) for d in t.shape], int(t.n_elements), int(t.n_bytes))
        for t in reader.tensors
    ]
    arch = metadata.get("general.architecture")
    plan = None
    if (field := reader.get_field("atd.plan")) is not None:
        try:
            plan = json.loads(string_value(field))
        except (ValueError, IndexError):
            raise AtdError(f"{path}: atd.plan is not valid JSON") from None
    return FileSummary(str(path), path.stat().st_size, arch if isinstance(arch, str) else None, metadata, tensors,
                       plan)


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
        width = max((len(t.name) for t in summary.tensors), default=4)
        lines.append(f"{'tensor':<{width}}  {'type':<8} {'shape':<18} {'bytes':>12} {'bpw':>7}")
        for t in summary.tensors:
            shape = "×".join(str(d) for d in t.shape)
            lines.append(f"{t.name:<{width}}  {t.type:<8} {shape:<18} {t.n_bytes:>12,} {t.bpw:>7.3f}")
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
    return "\n".join(lines)


def dequantized(path: str | Path, name: str) -> np.ndarray:
    """float32 values of one tensor, through gguf-py's dequantize (ATD types included)."""
    reader = read_gguf(Path(path))
    for t in reader.tensors:
        if t.name == name:
            return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
    raise AtdError(f"{path}: no tensor {name}")
