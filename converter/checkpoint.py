"""Streaming access to Hugging Face safetensors checkpoints (single file or sharded).

Tensors are memory-mapped one at a time, so peak memory is about one tensor.
bf16 is widened to float32 bit-exactly without torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from gguf.utility import LocalTensor, LocalTensorRange

from .errors import AtdError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "README.md"]


def resolve_model(model: str) -> Path:
    """A local checkpoint directory, or a Hub repo id downloaded with huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise AtdError(f"{model}: not a directory (pass the checkpoint directory)")
    if not _REPO_ID.match(model) or model.startswith((".", "/", "~")):
        raise AtdError(f"{model}: no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(model, allow_patterns=_DOWNLOAD_PATTERNS))
    except RepositoryNotFoundError:
        raise AtdError(f"{model}: no such directory, and no such repository on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        raise AtdError(
            f"{model}: no such directory, and the Hugging Face Hub cannot be reached (offline?); "
            "download the checkpoint elsewhere and pass its directory") from None
    except (HfHubHTTPError, OSError) as e:
        raise AtdError(f"{model}: download from the Hugging Face Hub failed: {e}") from None


@dataclass(frozen=True)
class TensorRef:
    name: str
    dtype: str
    shape: tuple[int, ...]
    local: LocalTensor

    def load(self) -> np.ndarray:
        """The tensor as float32 (exact for F32/F16/BF16)."""
        return self.load_rows(0, self.shape[0] if self.shape else 1).reshape(self.shape)

    def load_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 (along the first dimension) as float32. Only their pages are read, and the
        mapping is dropped on return, so reading a large tensor in row chunks keeps memory at a chunk."""
        return self._read(slice(start, stop))

    def load_row_indices(self, rows: np.ndarray) -> np.ndarray:
        """The rows at the given indices (along the first dimension) as float32, in that order; only
        the pages of those rows are read."""
        return self._read(np.asarray(rows, dtype=np.int64))

    def _read(self, select: slice | np.ndarray) -> np.ndarray:
        """The rows `select` picks along the first dimension, from one mapping of the tensor."""
        row_shape = self.shape[1:]
        rng = self.local.data_range
        raw = np.memmap(rng.filename, mode="r", dtype=np.dtype(_DTYPES[self.dtype]), offset=rng.offset,
                        shape=(self.shape[0] if self.shape else 1, math.prod(row_shape)))
        try:
            out = self._to_float32(raw[select])
        finally:
            del raw
        return out.reshape((-1, *row_shape)) if self.shape else out.reshape(-1)

    def _to_float32(self, raw: np.ndarray) -> np.ndarray:
        if self.dtype == "BF16":  # bf16 is the top half of a float32
            out = raw.astype(np.uint32)
            out <<= 16
            return out.view(np.float32)
        return raw.astype(np.float32)


class Checkpoint:
    """config.json plus the tensor index of a safetensors checkpoint, in llama.cpp's order."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.config = self._read_config()
        self.tensors = self._index_tensors()

    def input_files(self) -> list[Path]:
        """Every regular file directly in the checkpoint directory plus the shards: what convert reads
        (config, tokenizer files, shards), so none of them may be the output."""
        files = [p for p in self.dir.iterdir() if p.is_file()]
        return files + [self.dir / part for part in self._parts]

    def _read_config(self) -> dict:
        path = self.dir / "config.json"
        if not path.is_file():
            raise AtdError(f"{self.dir}: no config.json (not a Hugging Face checkpoint directory)")
        config = _read_json(path, "config")
        if not isinstance(config, dict):
            raise AtdError(f"{path}: expected a JSON object")
        return config

    def _part_names(self) -> list[str]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            document = _read_json(index, "index")
            weight_map = document.get("weight_map") if isinstance(document, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise AtdError(f"{index}: unreadable weight map (expected \"weight_map\": {{tensor name: shard file}})")
            for part in set(weight_map.values()):
                self._check_part_name(index, part)
            self._weight_map = weight_map
            return sorted(set(weight_map.values()))
        self._weight_map = {}
        parts = sorted(p.name for p in self.dir.glob("model*.safetensors"))
        if not parts:
            if any(self.dir.glob("*.bin")) or any(self.dir.glob("*.pt")):
                raise AtdError(f"{self.dir}: only PyTorch .bin weights found; atd-gguf reads safetensors")
            raise AtdError(f"{self.dir}: no model*.safetensors files")
        return parts

    def _check_part_name(self, index: Path, part: str) -> None:
        """A shard named by the index is a plain relative path inside the checkpoint directory. Only its
        last component may be a symlink leading elsewhere (the Hugging Face cache links every file of a
        snapshot into blobs/); the name itself must not climb out, and no directory on the way may."""
        pure = PurePosixPath(part)
        if (not part or "\\" in part or "\0" in part or pure.is_absolute()
                or any(p in ("..", ".") for p in pure.parts) or not part.endswith(".safetensors")):
            raise AtdError(f"{index}: shard name {part!r} is not a .safetensors file name inside the checkpoint "
                           "directory (absolute paths and '..' are refused)")
        if len(pure.parts) > 1:
            root = self.dir.resolve()
            parent = (self.dir / pure.parent).resolve()
            if parent != root and root not in parent.parents:
                raise AtdError(f"{index}: shard {part!r} lies outside the checkpoint directory")

    def _index_tensors(self) -> dict[str, TensorRef]:
        tensors: dict[str, TensorRef] = {}
        shard_of: dict[str, str] = {}
        self._parts = self._part_names()
        for part in self._parts:
            path = self.dir / part
            if not path.is_file():
                if self._weight_map:
                    raise AtdError(f"{path}: missing shard named in model.safetensors.index.json")
                raise AtdError(f"{path}: not a regular file")
            for name, local in read_safetensors_header(path):
                if name in tensors:
                    raise AtdError(f"tensor {name} appears in two shards ({shard_of[name]} and {part})")
                if local.dtype not in _DTYPES:
                    raise AtdError(f"{path}: tensor {name} has dtype {local.dtype}; supported are F32, F16, BF16")
                tensors[name] = TensorRef(name, local.dtype, tuple(local.shape), local)
                shard_of[name] = part
        if self._weight_map:
            missing = sorted(set(self._weight_map) - set(tensors))
            extra = sorted(set(tensors) - set(self._weight_map))
            if missing or extra:
                raise AtdError(f"{self.dir}: index and shards disagree (missing {missing[:3]}, extra {extra[:3]})")
            wrong = sorted(n for n in tensors if shard_of[n] != self._weight_map[n])
            if wrong:
                raise AtdError(f"{self.dir}: tensor {wrong[0]} is in {shard_of[wrong[0]]}, but the index names "
                               f"{self._weight_map[wrong[0]]}")
        return tensors


# bytes per element of every safetensors dtype, to check byte ranges of tensors we do not read too
_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2,
                         "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
# the safetensors format's own limit on the JSON header
_MAX_HEADER_BYTES = 100_000_000


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AtdError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise AtdError(f"{path}: not a usable {what} file (JSON nested too deeply)") from None
    except _DuplicateKey as e:
        raise AtdError(f"{path}: key {e.args[0]!r} appears twice in one JSON object") from None
    except OSError as e:
        raise AtdError(f"{path}: cannot read ({e.strerror})") from None


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: Path) -> list[tuple[str, LocalTensor]]:
    """The tensors of a safetensors file, sorted by name, after the checks the format prescribes:
    a JSON object of unique keys; each tensor's byte range matches dtype and shape (Python ints,
    so no overflow); the ranges, in order, tile the data section from byte 0 to its end. Error
    messages never quote the file's bytes."""
    def corrupt(why: str) -> AtdError:
        return AtdError(f"{path}: corrupt safetensors header ({why})")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise corrupt("file shorter than the 8-byte header length")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise corrupt("declared header length exceeds the file")
            raw = f.read(header_len)
    except OSError as e:
        raise AtdError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise corrupt("not valid UTF-8 JSON") from None
    except RecursionError:
        raise corrupt("JSON nested too deeply") from None
    except _DuplicateKey as e:
        raise corrupt(f"tensor {e.args[0]!r} appears twice") from None
    if not isinstance(header, dict):
        raise corrupt(f"expected a JSON object, found a JSON {type(header).__name__}")
    data_start = 8 + header_len
    data_size = size - data_start
    entries = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "data_offsets"}:
            raise corrupt(f"tensor {name!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if dtype not in _SAFETENSORS_ITEMSIZE:
            raise corrupt(f"tensor {name!r} has an unknown dtype")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise corrupt(f"tensor {name!r}: shape must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise corrupt(f"tensor {name!r}: data_offsets must be two non-negative integers [begin, end]")
        if offsets[1] - offsets[0] != math.prod(shape) * _SAFETENSORS_ITEMSIZE[dtype]:
            raise AtdError(f"{path}: tensor {name} byte range does not match its shape {shape}")
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    entries.sort()
    position = 0
    for begin, end, name, _, _ in entries:
        if begin != position:
            raise corrupt(f"tensor {name!r} overlaps another tensor" if begin < position
                          else f"gap before tensor {name!r}")
        position = end
    if position > data_size:
        raise AtdError(f"{path}: truncated (tensor data ends at byte {data_start + position:,}, "
                       f"file has {size:,})")
    if position < data_size:
        raise corrupt("bytes after the last tensor")
    return sorted(((name, LocalTensor(dtype, shape, LocalTensorRange(path, data_start + begin, end - begin)))
                   for begin, end, name, dtype, shape in entries), key=lambda item: item[0])
