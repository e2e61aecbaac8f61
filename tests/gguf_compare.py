"""Compare two GGUF files tensor by tensor and key by key (a test helper, reads with gguf-py)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

# Keys that record where a file came from rather than what it contains.
PROVENANCE_KEYS = ("general.name", "general.basename", "general.finetune", "general.size_label",
                   "general.version", "general.quantized_by", "general.source.", "atd.")


def _value(field: gguf.ReaderField):
    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
        return [field.parts[i].tobytes() for i in field.data]
    return field.parts[field.data[0]].tobytes() if field.data else None


def gguf_differences(a: Path, b: Path, ignore: tuple[str, ...] = PROVENANCE_KEYS) -> list[str]:
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    diffs: list[str] = []
    keys_a = [k for k in ra.fields if not k.startswith("GGUF.") and not k.startswith(ignore)]
    keys_b = [k for k in rb.fields if not k.startswith("GGUF.") and not k.startswith(ignore)]
    if set(keys_a) != set(keys_b):
        diffs.append(f"keys only in first: {sorted(set(keys_a) - set(keys_b))}, "
                     f"only in second: {sorted(set(keys_b) - set(keys_a))}")
    for key in sorted(set(keys_a) & set(keys_b)):
        fa, fb = ra.fields[key], rb.fields[key]
        if fa.types != fb.types or _value(fa) != _value(fb):
            diffs.append(f"key {key}: {fa.contents() if len(str(fa.contents())) < 200 else '…'} != "
                         f"{fb.contents() if len(str(fb.contents())) < 200 else '…'}")
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    if list(ta) != list(tb):
        diffs.append(f"tensor names/order differ: {list(ta)[:5]}… vs {list(tb)[:5]}…")
    for name in ta.keys() & tb.keys():
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            diffs.append(f"tensor {name}: {x.tensor_type.name}{list(x.shape)} != {y.tensor_type.name}{list(y.shape)}")
        elif not np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            diffs.append(f"tensor {name}: bytes differ")
    return diffs
