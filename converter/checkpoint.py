"""Streaming access to Hugging Face safetensors checkpoints (single file or sharded).

Tensors are memory-mapped one at a time, so peak memory is about one tensor.
bf16 is widened to float32 bit-exactly without torch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.utility import LocalTensor, SafetensorsLocal

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
        """Rows start..stop-1 (along the first dimension) as float32. Only their bytes are mapped, and
        the mapping is dropped on return, so reading a large tensor in row chunks keeps memory at a chunk."""
        row_shape = self.shape[1:]
        dtype = np.dtype(_DTYPES[self.dtype])
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        rng = self.local.data_range
        raw = np.memmap(rng.filename, mode="r", dtype=dtype, offset=rng.offset + start * row_bytes,
                        shape=((stop - start) * row_bytes // dtype.itemsize,))
        try:
            if self.dtype == "BF16":
                out = (raw.astype(np.uint32) << 16).view(np.float32)
            else:
                out = raw.astype(np.float32)
        finally:
            del raw
        return out.reshape((stop - start, *row_shape)) if self.shape else out


class Checkpoint:
    """config.json plus the tensor index of a safetensors checkpoint, in llama.cpp's order."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.config = self._read_config()
        self.tensors = self._index_tensors()

    def _read_config(self) -> dict:
        path = self.dir / "config.json"
        if not path.is_file():
            raise AtdError(f"{self.dir}: no config.json (not a Hugging Face checkpoint directory)")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AtdError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise AtdError(f"{path}: expected a JSON object")
        return config

    def _part_names(self) -> list[str]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise AtdError(f"{index}: unreadable weight map ({e})") from None
            self._weight_map = weight_map
            return sorted(set(weight_map.values()))
        self._weight_map = {}
        parts = sorted(p.name for p in self.dir.glob("model*.safetensors"))
        if not parts:
            if any(self.dir.glob("*.bin")) or any(self.dir.glob("*.pt")):
                raise AtdError(f"{self.dir}: only PyTorch .bin weights found; atd-gguf reads safetensors")
            raise AtdError(f"{self.dir}: no model*.safetensors files")
        return parts

    def _index_tensors(self) -> dict[str, TensorRef]:
        tensors: dict[str, TensorRef] = {}
        for part in self._part_names():
            path = self.dir / part
            if not path.is_file():
                raise AtdError(f"{path}: missing shard named in model.safetensors.index.json")
            size = os.stat(path).st_size
            try:
                with SafetensorsLocal(path) as entries:
                    items = list(entries.items())
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise AtdError(f"{path}: corrupt safetensors header ({e})") from None
            for name, local in items:
                if local.dtype not in _DTYPES:
                    raise AtdError(f"{path}: tensor {name} has dtype {local.dtype}; supported are F32, F16, BF16")
                itemsize = np.dtype(_DTYPES[local.dtype]).itemsize
                if local.data_range.size != int(np.prod(local.shape)) * itemsize:
                    raise AtdError(f"{path}: tensor {name} byte range does not match its shape {list(local.shape)}")
                end = local.data_range.offset + local.data_range.size
                if end > size:
                    raise AtdError(f"{path}: truncated (tensor {name} ends at byte {end}, file has {size})")
                tensors[name] = TensorRef(name, local.dtype, tuple(local.shape), local)
        if self._weight_map:
            missing = sorted(set(self._weight_map) - set(tensors))
            extra = sorted(set(tensors) - set(self._weight_map))
            if missing or extra:
                raise AtdError(f"{self.dir}: index and shards disagree (missing {missing[:3]}, extra {extra[:3]})")
        return tensors
