"""`atd-gguf run` and the patched loader on files the pinned llama.cpp aborts on or misreads (issue 13:
D7 run/patch side, D9, D10).

Needs the patched build (`make llama`). The hostile files are byte-level rewrites of one small ATD2
model (llama3-tiny, --planes 2): copying a 128k-token vocabulary through gguf-py would take minutes.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

import gguf_types
from converter import model_check
from converter.cli import main
from converter.errors import AtdError

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "build" / "llama.cpp-patched" / "build" / "bin"
V = gguf.GGUFValueType
_SCALAR = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i", V.FLOAT32: "f",
           V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}


# ---- a GGUF rewritten at the byte level ------------------------------------------------------------

class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        self.pos += n
        return self.data[self.pos - n:self.pos].decode("utf-8", errors="surrogateescape")

    def skip_value(self, vtype: int) -> None:
        if vtype == V.STRING:
            self.string()
        elif vtype == V.ARRAY:
            item_type, n = self.take("I"), self.take("Q")
            if item_type in _SCALAR:
                self.pos += n * struct.calcsize(_SCALAR[item_type])
            else:
                for _ in range(n):
                    self.skip_value(item_type)
        else:
            self.pos += struct.calcsize(_SCALAR[vtype])


def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_uint32(value: int) -> bytes:
    return struct.pack("<II", V.UINT32, value)


def kv_string(text: str) -> bytes:
    return struct.pack("<I", V.STRING) + _string(text)


def rewrite_gguf(src: Path, dst: Path, *, kv: dict[str, bytes] | None = None,
                 tensors: dict[str, tuple[int, tuple[int, ...], np.ndarray]] | None = None,
                 alignment: int = 32) -> Path:
    """`src` with metadata entries set (key -> encoded type and value, see kv_uint32) and tensors replaced
    (name -> (ggml type id, shape in ggml order, data)), its data laid out at `alignment`."""
    kv, tensors = dict(kv or {}), tensors or {}
    data = src.read_bytes()
    r = _Reader(data)
    assert r.take("I") == int.from_bytes(b"GGUF", "little") and r.take("I") == 3
    n_tensors, n_kv = r.take("Q"), r.take("Q")
    entries, src_alignment = [], 32
    for _ in range(n_kv):
        start = r.pos
        key = r.string()
        vtype = r.take("I")
        value_start = r.pos - 4
        r.skip_value(vtype)
        if key == "general.alignment":
            src_alignment = struct.unpack_from("<I", data, value_start + 4)[0]
        if key not in kv:
            entries.append(data[start:r.pos])
        else:
            entries.append(_string(key) + kv.pop(key))
    entries += [_string(key) + value for key, value in kv.items()]
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        shape = tuple(r.take("Q") for _ in range(r.take("I")))
        type_id, offset = r.take("I"), r.take("Q")
        infos.append((name, type_id, shape, offset))
    data_start = -(-r.pos // src_alignment) * src_alignment
    blobs = []
    for name, type_id, shape, offset in infos:
        if name in tensors:
            type_id, shape, array = tensors[name]
            blob = np.ascontiguousarray(array).tobytes()
        else:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
            blob = data[data_start + offset:data_start + offset + int(np.prod(shape)) // block * size]
        blobs.append((name, type_id, shape, blob))

    def pad(n: int) -> int:
        return -n % alignment

    header = bytearray(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(entries)) + b"".join(entries))
    offset = 0
    for name, type_id, shape, blob in blobs:
        header += _string(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
        header += struct.pack("<IQ", type_id, offset)
        offset += len(blob) + pad(len(blob))
    with open(dst, "wb") as f:
        f.write(header + bytes(pad(len(header))))
        for *_, blob in blobs:
            f.write(blob + bytes(pad(len(blob))))
    return dst


def patch_bytes(src: Path, dst: Path, offset: int, value: bytes) -> Path:
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(value)
    return dst


def tensor_info(path: Path, name: str):
    from converter.inspect_gguf import read_layout

    return {t.name: t for t in read_layout(path).tensors}[name]


# ---- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_atd2(llama3_dir, tmp_path_factory) -> Path:
    """llama3-tiny as ATD2: n_head 4, n_head_kv 2, head_dim 64, two layers, a 128k vocabulary."""
    if not (BIN / "llama-completion").is_file():
        pytest.fail(f"{BIN}/llama-completion missing: run `make llama` first")
    out = tmp_path_factory.mktemp("runtime_guards") / "tiny-atd2.gguf"
    result = CliRunner().invoke(main, ["convert", str(llama3_dir), "-o", str(out), "--planes", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def _norm_as(path: Path, out: Path, qtype: gguf.GGMLQuantizationType) -> Path:
    norm = tensor_info(path, "blk.0.attn_norm.weight")
    values = np.fromfile(path, dtype=np.float32, count=norm.n_elements, offset=norm.offset).reshape(1, -1)
    encoded = gguf.quants.quantize(values, qtype)
    return rewrite_gguf(path, out, tensors={norm.name: (int(qtype), norm.shape, encoded)})


def _kv_heads_3(path: Path, out: Path) -> Path:
    """n_head 4, n_head_kv 3, with attn_k/attn_v shaped to match (3 heads of 64): llama.cpp loads it and
    then aborts on GGML_ASSERT(ggml_can_mul_mat(k, q)) in the first attention."""
    rng = np.random.default_rng(3)
    tensors = {f"blk.{i}.attn_{kv}.weight": (int(gguf.GGMLQuantizationType.F32), (256, 192),
                                              (rng.standard_normal((192, 256)) * 0.02).astype(np.float32))
               for i in range(2) for kv in "kv"}
    return rewrite_gguf(path, out, kv={"llama.attention.head_count_kv": kv_uint32(3)}, tensors=tensors)


HOSTILE = {  # case -> (make the file, a fragment the one error line must contain)
    "n_head_kv_3": (_kv_heads_3, "head_count 4 is not a multiple of llama.attention.head_count_kv 3"),
    "chat_template": (lambda p, o: rewrite_gguf(p, o, kv={"tokenizer.chat_template": kv_string(
        "{% for m in messages %}{{ m.content ")}), "the chat template tokenizer.chat_template does not parse"),
    "alignment_1": (lambda p, o: rewrite_gguf(p, o, kv={"general.alignment": kv_uint32(1)}, alignment=1),
                    "not a multiple of 32 (general.alignment is 1)"),
    "norm_atd2": (lambda p, o: _norm_as(p, o, gguf_types.gguf_qtype(gguf_types.atd_type("ATD2"))),
                  "tensor 'blk.0.attn_norm.weight' is 1-D but stored as ATD2"),
    "norm_q8_0": (lambda p, o: _norm_as(p, o, gguf.GGMLQuantizationType.Q8_0),
                  "tensor 'blk.0.attn_norm.weight' is 1-D but stored as Q8_0"),
}


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "converter.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def completion(model: Path) -> subprocess.CompletedProcess:
    """The patched llama-completion alone, as `run` starts it, without our checks."""
    return subprocess.run([str(BIN / "llama-completion"), "-m", str(model), "-p", "Hello", "-n", "2", "-c", "256",
                           "-t", "2", "--no-warmup", "-no-cnv", "--simple-io"], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, env={**os.environ, "GGML_NO_BACKTRACE": "1"})


# ---- D7: what llama.cpp aborts on is refused before it runs ------------------------------------------

@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_run_refuses_files_llama_cpp_aborts_on(tiny_atd2, tmp_path, case):
    make, fragment = HOSTILE[case]
    bad = make(tiny_atd2, tmp_path / f"{case}.gguf")
    alone = completion(bad)
    assert alone.returncode != 0, f"{case}: llama-completion ran the file, so it is no hostile case"
    line = assert_one_error_line(cli("run", bad, "-p", "Hello", "-n", "2"), fragment)
    assert "killed" not in line


def test_run_still_runs_the_untouched_model(tiny_atd2, tmp_path):
    """The rewriter and the checks leave a sound file alone: a copy through rewrite_gguf runs."""
    copy = rewrite_gguf(tiny_atd2, tmp_path / "copy.gguf")
    assert copy.read_bytes() == tiny_atd2.read_bytes()
    proc = cli("run", copy, "-p", "Hello", "-n", "2")
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]


@pytest.mark.parametrize("tensor", ["blk.0.attn_norm.weight", "output_norm.weight"])
def test_patched_loader_refuses_atd_outside_matmul(tiny_atd2, tmp_path, tensor):
    """The patch's loader refuses an ATD norm with an error (exit 1) instead of aborting at the first token."""
    info = tensor_info(tiny_atd2, tensor)
    values = np.fromfile(tiny_atd2, dtype=np.float32, count=info.n_elements, offset=info.offset).reshape(1, -1)
    qtype = gguf_types.gguf_qtype(gguf_types.atd_type("ATD2"))
    bad = rewrite_gguf(tiny_atd2, tmp_path / "atd-norm.gguf",
                       tensors={tensor: (int(qtype), info.shape, gguf.quants.quantize(values, qtype))})
    proc = completion(bad)
    assert proc.returncode == 1, f"exit {proc.returncode}: {proc.stderr[-3000:]}"  # not -SIGABRT
    assert f"tensor '{tensor}' is stored as atd2, but llama.cpp uses it in MUL" in proc.stderr, proc.stderr[-3000:]


# ---- D9: invalid ATD data is refused, not run --------------------------------------------------------

ATD2_BLOCK = gguf_types.atd_type("ATD2")
CORRUPT = {  # case -> (offset in a block, bytes): see docs/atd-format.md
    "noncanonical_byte": (2 * ATD2_BLOCK.planes + 3, bytes([40])),  # 40 = ceil(256 v / 243) for no v
    "nan_scale": (0, b"\x00\x7e"),
    "inf_scale": (2, b"\x00\x7c"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_run_refuses_invalid_atd_data(tiny_atd2, tmp_path, case):
    where, value = CORRUPT[case]
    t = tensor_info(tiny_atd2, "blk.1.ffn_up.weight")
    bad = patch_bytes(tiny_atd2, tmp_path / f"{case}.gguf", t.offset + 5 * ATD2_BLOCK.type_size + where, value)
    assert_one_error_line(cli("export", "--stock", bad, "-o", tmp_path / "stock.gguf"), "blk.1.ffn_up.weight")
    assert_one_error_line(cli("run", bad, "-p", "Hello", "-n", "2"),
                          "tensor 'blk.1.ffn_up.weight' has invalid data", "invalid atd2 data")


# ---- D10: the error line is llama.cpp's cause, not its fallout --------------------------------------

def test_run_error_names_the_load_error(tiny_atd2, tmp_path):
    """n_head_kv 1 with attn_k for 2 heads: llama.cpp refuses the shape, then logs "failed to load model"
    and "unable to create context"; the line names the tensor."""
    t = tensor_info(tiny_atd2, "blk.0.attn_k.weight")
    assert t.shape == (256, 128)
    bad = rewrite_gguf(tiny_atd2, tmp_path / "kv1.gguf", kv={"llama.attention.head_count_kv": kv_uint32(1)})
    line = assert_one_error_line(cli("run", bad, "-p", "Hello", "-n", "2"),
                                 "tensor 'blk.0.attn_k.weight' has wrong shape")
    assert "unable to create context" not in line


def test_run_error_names_the_abort(tiny_atd2, tmp_path, monkeypatch):
    """Past the checks, an abort in llama.cpp is reported with its signal and GGML_ABORT's message."""
    from converter import run

    bad = _norm_as(tiny_atd2, tmp_path / "q8-norm.gguf", gguf.GGMLQuantizationType.Q8_0)
    monkeypatch.setattr(run, "check_runnable", lambda path: None, raising=False)  # the checks come first
    with pytest.raises(AtdError) as e:
        run.run(bad, "Hello", n_predict=2, threads=2, ctx_size=256)
    assert "killed by SIGABRT" in str(e.value) and "binary_op: unsupported types" in str(e.value), str(e.value)


GDB_NOISE = "30\t../sysdeps/unix/sysv/linux/wait4.c: No such file or directory.\n#0  0x00007f in wait4 ()\nNo stack.\n"
LOGS = {  # llama.cpp logs as seen in failing runs -> the cause
    "load_error": ("0.00.002.000 I llama_completion: load the model\n"
                   "0.00.787.916 E llama_model_load: error loading model: tensor 'x' data is not within the file "
                   "bounds, model is corrupted or incomplete\n"
                   "0.00.788.152 E llama_model_load_from_file_impl: failed to load model\n"
                   "0.00.788.233 E common_fit_params: encountered an error while trying to fit params to free "
                   "device memory: failed to load model\n"
                   "0.01.362.097 E cmn  common_init_: failed to load model 'm.gguf'\n"
                   "0.01.362.116 E llama_completion: error: unable to create context\n",
                   "tensor 'x' data is not within the file bounds, model is corrupted or incomplete"),
    "abort": ("0.00.003.000 I llama_completion: load the model\n/src/ggml/src/ggml-backend.cpp:2527: "
              "GGML_ASSERT(ptr % TENSOR_ALIGNMENT == 0) failed\n" + GDB_NOISE,
              "GGML_ASSERT(ptr % TENSOR_ALIGNMENT == 0) failed"),
    "exception": ("0.01.167.648 E common_chat_templates_init: error: parser: Parser Error: Expected }}\n"
                  "...{{ m.content\n   ^\n"
                  "0.01.167.651 E common_chat_templates_init: failed to initialize chat template\n" + GDB_NOISE +
                  "terminate called after throwing an instance of 'std::exception'\n  what():  std::exception\n",
                  "common_chat_templates_init: error: parser: Parser Error: Expected }}"),
    "invalid_data": ("ggml_validate_row_data: invalid atd3 data: a non-finite scale\n"
                     "0.00.900.100 E llama_model_loader::load_all_data: tensor 'w' has invalid data\n"
                     "0.00.900.200 E llama_model_load: error loading model: found tensors with invalid data\n",
                     "llama_model_loader::load_all_data: tensor 'w' has invalid data (invalid atd3 data: a "
                     "non-finite scale)"),
    "info_only": ("0.00.100.000 I llama_completion: llama backend init\n0.00.200.000 I generate: n_ctx = 256\n" + GDB_NOISE,
                  "its last log line: generate: n_ctx = 256"),
}


@pytest.mark.parametrize("case", sorted(LOGS))
def test_llama_log_cause(case):
    log, cause = LOGS[case]
    assert model_check.llama_log_cause(log) == cause
    assert model_check.llama_log_cause("") is None


def test_run_killed_without_log_says_so(tmp_path, tiny_atd2, monkeypatch):
    """A binary that dies by a signal and prints nothing: the line says which signal, not "no output"."""
    from converter import run

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "llama-completion").write_text("#!/bin/sh\nkill -SEGV $$\n")
    (fake / "llama-completion").chmod(0o755)
    monkeypatch.setenv("ATD_LLAMA_BIN_DIR", str(fake))
    with pytest.raises(AtdError, match=f"killed by {signal.SIGSEGV.name} on .*: it printed nothing"):
        run.run(tiny_atd2, "Hello", n_predict=2)
