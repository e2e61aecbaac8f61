"""llama.cpp importance matrices (llama-imatrix output): per-input-column mean of x².

Both formats of the pinned llama.cpp are read: GGUF (`<tensor>.in_sum2` and `<tensor>.counts`)
and the legacy binary .dat (per entry: name, ncall, values already divided by count, times ncall).
Only the relative size of the values matters to the weighted fit.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np

from .errors import AtdError


def _unusable(path: Path, why: str) -> AtdError:
    from .inspect_gguf import printable

    return AtdError(printable(f"{path}: unusable imatrix ({why})"))  # names come from the file


def _read_gguf(path: Path) -> dict[str, np.ndarray]:
    from .inspect_gguf import scan_gguf

    try:
        scan_gguf(path)  # bounds every declared length first: gguf-py's reader trusts them
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as e:  # MalformedGguf is a ValueError
        raise _unusable(path, f"unreadable GGUF: {e}") from None
    tensors = {t.name: t for t in reader.tensors}
    result = {}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = tensors.get(base + ".counts")
        if counts is None:
            raise _unusable(path, f"{base} has in_sum2 but no counts")
        sums = np.asarray(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
        n = np.asarray(counts.data, dtype=np.float32).reshape(-1)
        if len(n) != sums.shape[0]:
            raise _unusable(path, f"{base}: {sums.shape[0]} matrices but {len(n)} counts")
        if len(n) != 1:
            raise _unusable(path, f"{base}: per-expert entries are not supported")
        if n[0] <= 0:
            continue  # no data collected for this tensor
        result[base] = sums[0] / n[0]
    return result


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise _unusable(path, "truncated file")
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if not 0 < n_entries < 1_000_000:
        raise _unusable(path, f"implausible entry count {n_entries}")
    result = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise _unusable(path, "corrupt entry name")
        name = take(f"<{length}s")[0].decode("utf-8", errors="replace")
        _ncall, nval = take("<ii")
        if nval <= 0:
            raise _unusable(path, f"{name}: no values")
        result[name] = np.array(take(f"<{nval}f"), dtype=np.float32)
    return result


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """GGUF tensor name -> importance per input column (float32, finite, >= 0)."""
    path = Path(path)
    if not path.is_file():
        raise AtdError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    entries = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    if not entries:
        raise _unusable(path, "no entries")
    for name, values in entries.items():
        if not np.isfinite(values).all() or (values < 0).any():
            raise _unusable(path, f"{name} has NaN, Inf or negative values")
    return entries


def write_legacy_imatrix(path: Path, entries: dict[str, np.ndarray], ncall: int = 1) -> None:
    """The legacy .dat layout (used by tests and small tools)."""
    out = bytearray(struct.pack("<i", len(entries)))
    for name in sorted(entries):
        encoded = name.encode()
        values = np.asarray(entries[name], dtype="<f4")
        out += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, values.size)
        out += values.tobytes()
    out += struct.pack("<i", ncall) + struct.pack("<i", 0)
    path.write_bytes(bytes(out))
