"""Hostile GGUF files on the reading side (issue 13): declared lengths beyond the file (D1), names and
metadata that would drive a terminal (D14), non-finite numbers in `inspect --json` (D13), and the time
and memory `inspect`/`modelfile`/`publish` take on a Llama-3-vocab file (D17)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

import gguf_types
from converter.errors import AtdError
from converter.imatrix import load_imatrix
from converter.inspect_gguf import inspect_file, printable, read_layout

ROOT = Path(__file__).resolve().parent.parent
HUGE = 2**40


def cli(*args, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI in a subprocess with a time limit, so a reader that never returns fails instead of hanging."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "converter.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd or ROOT)


def one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def write_gguf(path: Path, *, name: str = "Tiny", tensor_name: str = "output_norm.weight",
               extra: dict | None = None, atd: bool = True) -> Path:
    """A small llama GGUF with a 1000-token vocabulary (tokens, token types), a chat template, one F32 tensor
    and one ATD2 tensor, written by gguf-py."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(1000)])
    writer.add_token_types([1] * 1000)
    writer.add_chat_template("{% for message in messages %}<|im_start|>{{ message['content'] }}<|im_end|>"
                             "{% endfor %}")
    writer.add_array("test.nested", [[1, 2], [3]])
    for key, value in (extra or {}).items():
        if isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)
    writer.add_tensor(tensor_name, np.linspace(-1, 1, 256, dtype=np.float32))
    if atd:
        t = gguf_types.atd_type("ATD2")
        rng = np.random.default_rng(0)
        blocks = gguf_types.pack_blocks(rng.integers(-1, 2, (8, 2, 256)).astype(np.int8),
                                        rng.standard_normal((8, 2)).astype(np.float16))
        writer.add_tensor("blk.0.attn_q.weight", blocks, raw_dtype=gguf_types.gguf_qtype(t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _key_end(data: bytes, key: str) -> int:
    """The offset just after a metadata key's name."""
    encoded = key.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded)
    return at + 8 + len(encoded)


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt):]


# each: how to make one declared length or count absurd
LENGTH_PATCHES = {
    "array count": lambda d: _patch(d, _key_end(d, "tokenizer.ggml.token_type") + 8, "<Q", HUGE),
    "string array count": lambda d: _patch(d, _key_end(d, "tokenizer.ggml.tokens") + 8, "<Q", HUGE),
    "string in an array": lambda d: _patch(d, _key_end(d, "tokenizer.ggml.tokens") + 16, "<Q", HUGE),
    "nested array count": lambda d: _patch(d, _key_end(d, "test.nested") + 16 + 4, "<Q", HUGE),
    "key length": lambda d: _patch(d, _key_end(d, "general.name") - len("general.name") - 8, "<Q", HUGE),
    "string value length": lambda d: _patch(d, _key_end(d, "general.name") + 4, "<Q", HUGE),
    "metadata count": lambda d: _patch(d, 16, "<Q", HUGE),
    "tensor count": lambda d: _patch(d, 8, "<Q", HUGE),
    "dimension count": lambda d: _patch(d, _key_end(d, "output_norm.weight"), "<I", 2**31),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("hostile") / "tiny.gguf")


@pytest.mark.parametrize("what", sorted(LENGTH_PATCHES))
def test_absurd_lengths_are_refused_at_once(what, tiny, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(LENGTH_PATCHES[what](tiny.read_bytes()))
    start = time.perf_counter()
    with pytest.raises(AtdError, match="not a readable GGUF") as info:
        read_layout(bad)
    assert time.perf_counter() - start < 2
    assert "\n" not in str(info.value)


def test_huge_token_type_array_every_reading_command(tiny, tmp_path):
    """D1: the array length of tokenizer.ggml.token_type set to 2^40 (gguf-py's reader never returns)."""
    bad = tmp_path / "bad.gguf"
    data = LENGTH_PATCHES["array count"](tiny.read_bytes())
    # gguf-py then reads int32 items up to the end of the file and empty ones past it, for ever (with 1-3
    # bytes left over it would fail on a partial item instead): pad the file to whole items
    items_start = _key_end(data, "tokenizer.ggml.token_type") + 4 + 4 + 8
    data += b"\0" * (-(len(data) - items_start) % 4)
    bad.write_bytes(data)
    fragments = ("bad.gguf", "not a readable GGUF", "tokenizer.ggml.token_type", "1,099,511,627,776")
    for args in (["inspect", bad], ["inspect", "--json", bad], ["modelfile", bad],
                 ["export", "--stock", bad, "-o", tmp_path / "out.gguf"],
                 ["publish", bad, "--repo", "me/x", "--dry-run"]):
        one_error_line(cli(*args, timeout=30), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]  # no Modelfile, no export, no temp file


def test_huge_array_in_gguf_imatrix(tmp_path):
    path = tmp_path / "imatrix.gguf"
    writer = gguf.GGUFWriter(path, arch="imatrix")
    writer.add_array("imatrix.datasets", ["calibration.txt"])
    writer.add_array("test.values", [1, 2, 3])  # int32 items: gguf-py reads empty ones past the end for ever
    writer.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 256), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.counts", np.ones((1, 1), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert list(load_imatrix(path)) == ["blk.0.attn_q.weight"]  # the file as written reads
    data = path.read_bytes()
    data = _patch(data, _key_end(data, "test.values") + 8, "<Q", HUGE)
    data += b"\0" * (-(len(data) - _key_end(data, "test.values") - 16) % 4)  # whole items to the end
    path.write_bytes(data)
    code = ("import sys; from converter.imatrix import load_imatrix; from converter.errors import AtdError\n"
            "try:\n    load_imatrix(sys.argv[1])\nexcept AtdError as e:\n    print(e); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "unusable imatrix" in proc.stdout and "test.values" in proc.stdout


def test_scan_agrees_with_gguf_py(tiny):
    """On an intact file the bounded scan sees what gguf-py's reader sees."""
    layout = read_layout(tiny)
    reader = gguf.GGUFReader(tiny)
    assert [(t.name, t.type_id, t.shape, t.offset, t.n_bytes) for t in layout.tensors] == [
        (t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes))
        for t in reader.tensors]
    assert set(layout.metadata) == {k for k in reader.fields if not k.startswith("GGUF.")}
    assert layout.metadata["general.name"] == reader.fields["general.name"].contents()
    assert layout.metadata["tokenizer.ggml.tokens"].count == len(reader.fields["tokenizer.ggml.tokens"].data)


# ---- D13: inspect --json is JSON ----------------------------------------------------------------

def test_inspect_json_has_no_nan_or_infinity(tmp_path):
    model = write_gguf(tmp_path / "nan.gguf", extra={"test.nan": float("nan"), "test.inf": float("inf"),
                                                      "test.ninf": float("-inf"), "test.half": 0.5})
    proc = cli("inspect", "--json", model)
    assert proc.returncode == 0, proc.stderr

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    data = json.loads(proc.stdout, parse_constant=refuse)  # strict JSON: NaN/Infinity are refused
    metadata = data["metadata"]
    assert metadata["test.nan"] is None and metadata["test.inf"] is None and metadata["test.ninf"] is None
    assert metadata["test.half"] == 0.5


# ---- D14: terminal injection ----------------------------------------------------------------------

ESCAPES = "\x1b]0;pwned\x07\x1b[31m\x1b]8;;http://evil\x1b\\"


def test_inspect_escapes_names_and_metadata(tmp_path):
    model = write_gguf(tmp_path / "esc.gguf", tensor_name="evil\x1b[2J\nname",
                       extra={"atd.method": "grid" + ESCAPES + "\nforged line", "atd.planes_note": "\u202eevil"})
    for args in (["inspect", model], ["inspect", "--summary", model]):
        proc = cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout and "\u202e" not in proc.stdout
        assert "forged line" not in proc.stdout.splitlines()[-1:] and not any(
            line.startswith(("forged", "name")) for line in proc.stdout.splitlines())
    table = cli("inspect", model).stdout
    assert "evil\\x1b[2J\\nname" in table  # shown escaped, not dropped
    assert "\\x1b]0;pwned\\x07" in table


def test_inspect_error_line_escapes_tensor_name(tmp_path):
    bad = write_gguf(tmp_path / "bad.gguf", extra={"atd.method": "grid"})
    data = bytearray(bad.read_bytes())
    # rename the ATD tensor to a name with a line break and an escape (same length), then corrupt its data
    at = data.index(b"blk.0.attn_q.weight")
    data[at:at + 19] = b"blk.0\n\x1b[2J_q.weight"
    data[-1] = 0xFF  # the last plane byte of the last block: not a canonical base-3 byte
    bad.write_bytes(bytes(data))
    line = one_error_line(cli("inspect", bad), "holds invalid data")
    assert "\x1b" not in line and "blk.0\\n\\x1b[2J_q.weight" in line


def test_printable():
    assert printable("plain ünï × name") == "plain ünï × name"
    assert printable("a\nb\x1b\x07\u202e\u2028") == "a\\nb\\x1b\\x07\\u202e\\u2028"


# ---- D17: time and memory on a Llama-3 vocabulary -------------------------------------------------

def test_llama3_vocab_file_reads_fast_and_lean(llama3_dir, tmp_path):
    """inspect/modelfile/publish --dry-run on a GGUF with the 128256-token Llama-3 vocabulary: gguf-py's
    reader took about 12 s and 668 MB here; llama.cpp loads such a file in under a second."""
    model = tmp_path / "l3.gguf"
    proc = cli("convert", llama3_dir, "-o", model, "--outtype", "q8_0", "--no-progress", timeout=600)
    assert proc.returncode == 0, proc.stderr
    baseline = _peak_rss(["-c", "import converter.cli, converter.publish, gguf_types"], tmp_path)
    for args in (["inspect", model], ["modelfile", model, "-o", tmp_path / "l3.Modelfile"],
                 ["publish", model, "--repo", "me/l3", "--dry-run"]):
        start = time.perf_counter()
        rss = _peak_rss(["-m", "converter.cli", *map(str, args)], tmp_path)
        elapsed = time.perf_counter() - start
        assert elapsed < 6, (args[0], elapsed)
        assert rss - baseline < 100 * 2**20, (args[0], rss, baseline)


def _peak_rss(args: list[str], cwd: Path) -> int:
    """Peak resident memory (bytes) of a Python subprocess."""
    code = ("import resource, subprocess, sys\n"
            "proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "assert proc.returncode == 0, proc.stderr[-2000:]\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n")
    proc = subprocess.run([sys.executable, "-c", code, sys.executable, *args], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip())
