"""Reading llama.cpp importance matrices: the GGUF layout of the pinned llama-imatrix and legacy .dat."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from converter.errors import AtdError
from converter.imatrix import load_imatrix, write_legacy_imatrix


def write_gguf_imatrix(path, entries: dict[str, tuple[np.ndarray, float]]) -> None:
    """tools/imatrix/imatrix.cpp's GGUF layout: `<name>.in_sum2` (F32, ne0 = columns) and `<name>.counts`."""
    writer = gguf.GGUFWriter(path, arch="imatrix")  # the architecture key is ignored by readers
    writer.add_type("imatrix")
    for name, (sums, count) in entries.items():
        writer.add_tensor(f"{name}.in_sum2", np.asarray(sums, dtype=np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_imatrix_is_mean_of_squares(tmp_path):
    rng = np.random.default_rng(0)
    sums = rng.gamma(2.0, size=256).astype(np.float32)
    path = tmp_path / "imatrix.gguf"
    write_gguf_imatrix(path, {"blk.0.attn_q.weight": (sums, 64.0), "blk.0.ffn_down.weight": (sums[:128], 0.0)})
    entries = load_imatrix(path)
    np.testing.assert_array_equal(entries["blk.0.attn_q.weight"], sums / np.float32(64.0))
    assert "blk.0.ffn_down.weight" not in entries  # count 0: no data was collected


def test_legacy_imatrix_roundtrip(tmp_path):
    values = np.linspace(0.5, 3.0, 512, dtype=np.float32)
    path = tmp_path / "imatrix.dat"
    write_legacy_imatrix(path, {"blk.1.ffn_up.weight": values}, ncall=7)
    np.testing.assert_array_equal(load_imatrix(path)["blk.1.ffn_up.weight"], values)


def test_gguf_imatrix_with_nan_is_unusable(tmp_path):
    sums = np.ones(64, np.float32)
    sums[3] = np.nan
    path = tmp_path / "bad.gguf"
    write_gguf_imatrix(path, {"blk.0.attn_k.weight": (sums, 1.0)})
    with pytest.raises(AtdError, match="unusable imatrix"):
        load_imatrix(path)


def test_truncated_legacy_imatrix(tmp_path):
    path = tmp_path / "t.dat"
    write_legacy_imatrix(path, {"blk.0.attn_q.weight": np.ones(256, np.float32)})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AtdError, match="truncated"):
        load_imatrix(path)
