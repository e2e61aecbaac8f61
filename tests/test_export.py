"""`atd-gguf export --stock`: ATD tensors rewritten as Q8_0/F16 from their reconstruction.

The file-level checks here need no llama.cpp; stock llama.cpp loading the export and its logits
are in test_llama_plugin.py (section f).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from test_convert import assert_no_output, assert_one_line_error, run_cli
from test_modelfile import write_tiny_gguf

import gguf_types

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


ROOT = Path(__file__).resolve().parent.parent


def write_atd_gguf(path: Path, *, alignment: int | None = None, endianess=gguf.GGUFEndian.LITTLE) -> None:
    """Every ATD type (fitted Gaussian rows, one all-zero block), a 3-D ATD expert stack, an F32 norm,
    a Q8_0 embedding, and metadata of many value kinds, a non-UTF-8 string among them."""
    rng = np.random.default_rng(11)
    writer = gguf.GGUFWriter(path, "llama", endianess=endianess)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_name("Export Test")
    writer.add_file_type(1001)
    writer.add_block_count(1)
    writer.add_float32("llama.rope.freq_base", 500000.0)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b", "Ġc"])
    writer.add_array("tokenizer.ggml.token_type", [3, 1, 1, 1])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.5, -2.5, -3.5])
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_string("atd.method", "grid")
    writer.add_uint64("test.u64", 2**40 + 3)
    writer.add_float64("test.f64", 1 / 3)
    writer.add_int8("test.i8", -5)
    writer.add_array("test.bools", [True, False, True])
    writer.add_key_value("test.raw", b"caf\xe9 \xff", gguf.GGUFValueType.STRING)  # Latin-1, not UTF-8
    writer.add_tensor("output_norm.weight", np.linspace(-1, 1, 64, dtype=np.float32))
    embed = rng.standard_normal((6, 64)).astype(np.float32)
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(embed, QT.Q8_0), raw_dtype=QT.Q8_0)
    for t in gguf_types.ATD_TYPES:
        w = rng.standard_normal((3, 2 * t.block_size)).astype(np.float32) * 0.02
        w[1, : t.block_size] = 0.0
        writer.add_tensor(f"blk.0.{t.name.lower()}.weight", gguf_types.quantize(w, t),
                          raw_dtype=gguf_types.gguf_qtype(t))
    t = gguf_types.atd_type("ATD2_64")
    experts = gguf_types.quantize(rng.standard_normal((4, 128)).astype(np.float32) * 0.02, t).reshape(2, 2, -1)
    writer.add_tensor("blk.0.ffn_up_exps.weight", experts, raw_dtype=gguf_types.gguf_qtype(t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


N_ATD_TENSORS = len(gguf_types.ATD_TYPES) + 1


def export(src: Path, out: Path, *args: str):
    return run_cli("export", "--stock", src, "-o", out, "--no-progress", *args)


def planes_sum(data: np.ndarray, name: str) -> np.ndarray:
    """Closed form: sum_i alpha_i * T_i per block, in float64, from the unpacked trits and scales."""
    atype = gguf_types.atd_type(name)
    trits, scales = gguf_types.unpack_blocks(np.asarray(data, dtype=np.uint8).reshape(-1, atype.type_size), atype)
    blocks = np.einsum("bn,bnk->bk", scales.astype(np.float64), trits.astype(np.float64))
    return blocks.reshape(*data.shape[:-1], -1)


def fields(path: Path) -> dict[str, object]:
    """key -> (value types, value); strings as raw bytes"""
    def value(f: gguf.ReaderField) -> object:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]) for i in f.data]
        return f.contents()

    reader = gguf.GGUFReader(path)
    return {k: (f.types, value(f)) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("export_type", ["q8_0", "f16"])
def test_export_rewrites_only_atd(tmp_path, export_type):
    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"
    write_atd_gguf(src)
    result = export(src, out, "--type", export_type)
    assert result.exit_code == 0, result.output
    assert f"{N_ATD_TENSORS} of {N_ATD_TENSORS + 2} tensors rewritten" in result.stdout

    before = {t.name: t for t in gguf.GGUFReader(src).tensors}
    after = gguf.GGUFReader(out).tensors
    assert [t.name for t in after] == list(before)  # same order
    qtype = QT.Q8_0 if export_type == "q8_0" else QT.F16
    for t in after:
        old = before[t.name]
        assert list(t.shape) == list(old.shape), t.name
        if int(old.tensor_type) < gguf_types.ATD_TYPE_ID_BASE:
            assert t.tensor_type == old.tensor_type and bytes(t.data) == bytes(old.data), t.name
            continue
        assert t.tensor_type == qtype, t.name
        exact = planes_sum(old.data, gguf_types.atd_type(int(old.tensor_type)).name)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(exact.shape).astype(np.float64)
        if qtype == QT.F16:
            np.testing.assert_array_equal(got, exact.astype(np.float16).astype(np.float64), err_msg=t.name)
        else:
            # Q8_0: q = round(x / d), d = amax/127 per 32-block, stored as fp16 (relative error <= 2^-11),
            # so |q * fp16(d) - x| <= d/2 + 127 * d * 2^-11
            blocks = exact.reshape(-1, 32)
            d = np.abs(blocks).max(axis=1, keepdims=True) / 127
            err = np.abs(got.reshape(-1, 32) - blocks)
            # (1e-4: the float32 product x * (1/d) before rounding)
            assert (err <= d * (0.5 + 127 * 2.0**-11) * (1 + 1e-4)).all(), t.name
            assert (got.reshape(-1, 32)[d[:, 0] == 0] == 0).all(), t.name  # zero blocks stay zero


def test_export_keeps_metadata(tmp_path):
    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"
    write_atd_gguf(src)
    assert export(src, out).exit_code == 0
    old, new = fields(src), fields(out)
    changed = {k for k in old if old[k] != new.get(k)}
    assert changed == {"general.file_type"}
    assert new["general.file_type"][1] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert new["test.u64"] == old["test.u64"] and new["test.u64"][0] == [gguf.GGUFValueType.UINT64]
    assert set(new) - set(old) == {"atd.exported_as"}
    assert new["atd.exported_as"][1][0].startswith(b"q8_0 ")
    assert new["test.raw"][1] == [b"caf\xe9 \xff"]


def test_export_keeps_alignment(tmp_path):
    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"
    write_atd_gguf(src, alignment=64)
    assert export(src, out, "--type", "f16").exit_code == 0
    reader = gguf.GGUFReader(out)
    assert reader.alignment == 64
    assert all(t.data_offset % 64 == 0 for t in reader.tensors)


def test_export_file_mode_follows_umask(tmp_path):
    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"
    write_atd_gguf(src)
    umask = os.umask(0o022)
    try:
        assert export(src, out).exit_code == 0
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_sigterm_leaves_no_file(tmp_path):
    """A killed export (SIGTERM) removes its temp file: nothing partial stays behind."""
    src, out = tmp_path / "big.gguf", tmp_path / "out.gguf"
    t = gguf_types.atd_type("ATD2")
    rng = np.random.default_rng(3)
    writer = gguf.GGUFWriter(src, "llama")
    trits = rng.integers(-1, 2, (4096, 2, t.block_size), dtype=np.int8)
    block = gguf_types.pack_blocks(trits, np.full((4096, 2), 0.01, dtype=np.float16)).reshape(256, -1)
    for i in range(48):  # 48 x 256 x 4096 weights: seconds of work
        writer.add_tensor(f"blk.{i}.ffn_up.weight", block, raw_dtype=gguf_types.gguf_qtype(t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    proc = subprocess.Popen([sys.executable, "-m", "converter.cli", "export", "--stock", str(src), "-o", str(out),
                             "--type", "f16", "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".out.gguf.") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the export ended before it could be stopped"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip() == "error: terminated"
    assert_no_output(out)


def test_help_has_an_example():
    result = run_cli("export", "--help")
    assert result.exit_code == 0 and "atd-gguf export --stock" in result.output and "--type" in result.output


# ---- bad input: one line, non-zero exit, no output file -------------------------------------------

def test_needs_stock_flag(tmp_path):
    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"
    write_atd_gguf(src)
    result = run_cli("export", src, "-o", out)
    assert result.exit_code == 2 and "--stock" in result.output
    assert_no_output(out)


def test_missing_input(tmp_path):
    out = tmp_path / "out.gguf"
    assert_one_line_error(export(tmp_path / "nope.gguf", out), "nope.gguf", "no such file")
    assert_no_output(out)


@pytest.mark.parametrize("keep", [0.6, 0.02])
def test_truncated_input(tmp_path, keep):
    src, bad, out = tmp_path / "in.gguf", tmp_path / "bad.gguf", tmp_path / "out.gguf"
    write_atd_gguf(src)
    data = src.read_bytes()
    bad.write_bytes(data[: int(len(data) * keep)])
    assert_one_line_error(export(bad, out), "bad.gguf")
    assert_no_output(out)


def test_not_a_gguf(tmp_path):
    src, out = tmp_path / "junk.gguf", tmp_path / "out.gguf"
    src.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    assert_one_line_error(export(src, out), "junk.gguf", "not a readable GGUF")
    assert_no_output(out)


@pytest.mark.parametrize("bad_byte", [40, 237])  # two of the 13 bytes the encoder never writes
def test_invalid_atd_data(tmp_path, bad_byte):
    src, out = tmp_path / "bad.gguf", tmp_path / "out.gguf"
    write_tiny_gguf(src, bad_byte=bad_byte)
    assert_one_line_error(export(src, out), "blk.0.attn_q.weight", "invalid ATD2 data")
    assert_no_output(out)
    assert_one_line_error(run_cli("inspect", src), "blk.0.attn_q.weight", "ATD2", "canonical")


def test_no_atd_tensors(tmp_path):
    src, out = tmp_path / "stock.gguf", tmp_path / "out.gguf"
    write_tiny_gguf(src, atd=False)
    assert_one_line_error(export(src, out), "no ATD tensors")
    assert_no_output(out)


def test_existing_output(tmp_path):
    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"
    write_atd_gguf(src)
    out.write_bytes(b"keep me")
    assert_one_line_error(export(src, out), "exists", "--force")
    assert out.read_bytes() == b"keep me"
    assert export(src, out, "--force").exit_code == 0
    assert gguf.GGUFReader(out).tensors


def test_big_endian_input(tmp_path):
    src, out = tmp_path / "be.gguf", tmp_path / "out.gguf"
    write_atd_gguf(src, endianess=gguf.GGUFEndian.BIG)
    assert_one_line_error(export(src, out), "big-endian")
    assert_no_output(out)


def test_output_is_input(tmp_path):
    src = tmp_path / "in.gguf"
    write_atd_gguf(src)
    before = src.read_bytes()
    assert_one_line_error(export(src, src, "--force"), "is the input file")
    assert src.read_bytes() == before


def test_exported_file_is_stock_for_modelfile_and_card(tmp_path):
    """modelfile and publish see a stock file (no ATD warning) whose card names its ATD origin."""
    from converter.inspect_gguf import inspect_file
    from converter.modelfile import build_modelfile
    from converter.publish import build_model_card

    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"
    write_atd_gguf(src)
    assert build_modelfile(src).atd_types  # the source warns
    assert export(src, out).exit_code == 0
    result = build_modelfile(out)
    assert not result.atd_types and not any("ATD" in w for w in result.warnings)
    card = build_model_card(inspect_file(out), repo_id="me/x")
    assert "reconstruction of an ATD model" in card and "`atd-gguf export --stock`" in card
    assert "| Q8_0 |" in card  # the size table names the stock type
    assert "Any recent llama.cpp build" in card and "Stock Ollama cannot load" not in card
