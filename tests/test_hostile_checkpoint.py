"""Hostile checkpoints and outputs (issue 13: D2-D5, D7, D8, D11, D12, D17, D18 on the convert side):
each case gets one clear error line and leaves nothing behind, or converts as documented."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import save_file

import gguf_types
from converter import fsutil
from converter.checkpoint import Checkpoint
from converter.cli import main
from converter.convert import ConvertOptions, convert
from converter.errors import AtdError
from converter.llama import LlamaModel, LlamaParams

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def run_cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and not lines[0].startswith("error: error:"), lines[0]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_no_output(path: Path) -> None:
    assert not path.exists()
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")] == []


def tiny_tensors(n_embd: int = 64, n_vocab: int = 128256, dtype=np.float16) -> dict[str, np.ndarray]:
    """A one-layer Llama (tied embeddings) with the Llama-3 fixture's vocabulary size."""
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (n_vocab, n_embd), "model.norm.weight": (n_embd,),
              "model.layers.0.input_layernorm.weight": (n_embd,),
              "model.layers.0.post_attention_layernorm.weight": (n_embd,),
              "model.layers.0.self_attn.q_proj.weight": (n_embd, n_embd),
              "model.layers.0.self_attn.k_proj.weight": (n_embd // 2, n_embd),
              "model.layers.0.self_attn.v_proj.weight": (n_embd // 2, n_embd),
              "model.layers.0.self_attn.o_proj.weight": (n_embd, n_embd),
              "model.layers.0.mlp.gate_proj.weight": (256, n_embd),
              "model.layers.0.mlp.up_proj.weight": (256, n_embd),
              "model.layers.0.mlp.down_proj.weight": (n_embd, 256)}
    return {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype) for name, shape in shapes.items()}


def tiny_config(n_embd: int = 64, **changes) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": n_embd,
              "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": n_embd // 2,
              "num_hidden_layers": 1, "vocab_size": 128256, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True}
    config.update(changes)
    return config


def make_model(directory: Path, llama3_dir: Path | None = None, tensors: dict | None = None,
               config: dict | None = None, n_embd: int = 64) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or tiny_config(n_embd)))
    if llama3_dir is not None:
        for name in TOKENIZER_FILES:
            shutil.copy(llama3_dir / name, directory / name)
    save_file(tensors if tensors is not None else tiny_tensors(n_embd), directory / "model.safetensors",
              metadata={"format": "pt"})
    return directory


@pytest.fixture
def tiny_model(tmp_path, llama3_dir) -> Path:
    return make_model(tmp_path / "model", llama3_dir)


def write_raw_safetensors(path: Path, header: object, data: bytes = b"", raw_header: bytes | None = None) -> Path:
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def checkpoint_error(directory: Path) -> str:
    with pytest.raises(AtdError) as failure:
        Checkpoint(directory)
    return str(failure.value)


@pytest.fixture
def bare_dir(tmp_path) -> Path:
    """A checkpoint directory with a config.json only (for Checkpoint-level header tests)."""
    directory = tmp_path / "bare"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(tiny_config()))
    return directory


# ---- D2: shard paths stay inside the checkpoint directory ---------------------------------------

def write_index(directory: Path, weight_map: dict[str, str]) -> None:
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "dotdot-inside"])
def test_index_shard_outside_the_directory_is_refused(tmp_path, escape):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file({"w": np.ones((2, 2), np.float32)}, outside / "evil.safetensors")
    model = tmp_path / "m"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(tiny_config()))
    part = {"absolute": str(outside / "evil.safetensors"), "dotdot": "../elsewhere/evil.safetensors",
            "dotdot-inside": "sub/../../elsewhere/evil.safetensors"}[escape]
    write_index(model, {"w": part})
    message = checkpoint_error(model)
    assert "inside the checkpoint directory" in message and "evil" in message


def test_index_shard_through_a_symlinked_directory_is_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file({"w": np.ones((2, 2), np.float32)}, outside / "evil.safetensors")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny_config()))
    (model / "sub").symlink_to(outside, target_is_directory=True)
    write_index(model, {"w": "sub/evil.safetensors"})
    assert "outside the checkpoint directory" in checkpoint_error(model)


def test_etc_passwd_as_shard_leaks_nothing(tmp_path, bare_dir):
    write_index(bare_dir, {"w": "/etc/passwd"})
    message = checkpoint_error(bare_dir)
    assert "/etc/passwd" in message and "absolute" in message
    # a local file that is not safetensors: the error must not quote its first 8 bytes
    secret = b"SECRET=hunter2 and more text to make a long file" * 4
    (bare_dir / "model.safetensors.index.json").unlink()
    (bare_dir / "model.safetensors").write_bytes(secret)
    message = checkpoint_error(bare_dir)
    assert "corrupt safetensors header" in message
    assert str(int.from_bytes(secret[:8], "little")) not in message and "hunter2" not in message


def test_hf_cache_layout_with_symlinked_shards_converts(tmp_path, llama3_dir):
    """The Hub cache: snapshots/REV/NAME are symlinks into blobs/ (outside the snapshot directory)."""
    cache = tmp_path / "models--org--tiny"
    blobs, snapshot = cache / "blobs", cache / "snapshots" / "abc123"
    staged = make_model(tmp_path / "staged", llama3_dir)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(staged.iterdir())):
        blob = blobs / f"blob{i}"
        shutil.move(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    write_index(snapshot, {name: "model.safetensors" for name in tiny_tensors()})
    out = tmp_path / "o.gguf"
    result = run_cli("convert", snapshot, "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert len(gguf.GGUFReader(out).tensors) == 11


# ---- D3: absurd config values never reach allocation -------------------------------------------

def model_error_in_bounded_subprocess(model: Path) -> str:
    """LlamaModel(Checkpoint(model))'s error, in a child limited to 3 GB and 120 s: without the checks,
    these cases allocate without bound."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30));"
            "from pathlib import Path; from converter.checkpoint import Checkpoint;"
            "from converter.llama import LlamaModel; from converter.errors import AtdError\n"
            f"try: LlamaModel(Checkpoint(Path({str(model)!r})))\n"
            "except AtdError as e: print(e)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert time.monotonic() - start < 30
    return proc.stdout


@pytest.mark.parametrize("layers", [100_000, 10**9])
def test_absurd_layer_count_fails_fast(tmp_path, layers):
    model = make_model(tmp_path / "m", config=tiny_config(num_hidden_layers=layers))
    assert "num_hidden_layers" in model_error_in_bounded_subprocess(model)


def test_one_far_layer_index_does_not_size_the_model(tmp_path):
    """A single tensor of layer 16777215 must not make the converter build 16.7M layers' name tables."""
    tensors = tiny_tensors()
    tensors["model.layers.16777215.input_layernorm.weight"] = tensors["model.norm.weight"].copy()
    model = make_model(tmp_path / "m", tensors=tensors, config=tiny_config(num_hidden_layers=1 << 24))
    assert "num_hidden_layers" in model_error_in_bounded_subprocess(model)


# ---- D4: safetensors byte ranges are validated like the format requires ------------------------

def _entry(offsets, shape=(2, 2), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header, data, fragment", [
    ({"a": _entry([-1000, -984])}, bytes(16), "data_offsets"),
    ({"a": _entry([0, 16]), "b": _entry([8, 24])}, bytes(24), "overlaps"),
    ({"a": _entry([0, 16]), "b": _entry([16, 32])}, bytes(24), "truncated"),
    ({"a": _entry([0, 16])}, bytes(40), "after the last tensor"),
    ({"a": _entry([8, 24])}, bytes(24), "gap"),
    ({"a": _entry([0, 0], shape=(2**56, 256))}, b"", "does not match its shape"),
    ({"a": _entry([0, 16], shape=(2, "2"))}, bytes(16), "shape"),
    ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0]}}, bytes(16), "data_offsets"),
    ([1, 2, 3], b"", "expected a JSON object, found a JSON list"),
])
def test_invalid_byte_ranges(bare_dir, header, data, fragment):
    write_raw_safetensors(bare_dir / "model.safetensors", header, data)
    message = checkpoint_error(bare_dir)
    assert fragment in message and "model.safetensors" in message, message


def test_duplicate_json_key_in_header(bare_dir):
    raw = (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
           b' "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}')
    write_raw_safetensors(bare_dir / "model.safetensors", None, bytes(16), raw_header=raw)
    assert "'a' appears twice" in checkpoint_error(bare_dir)


def test_deeply_nested_header_is_a_clear_error(bare_dir):
    write_raw_safetensors(bare_dir / "model.safetensors", None, raw_header=b"[" * 100_000 + b"]" * 100_000)
    assert "nested too deeply" in checkpoint_error(bare_dir)


def test_tensor_in_two_shards(bare_dir):
    save_file({"w": np.ones(2, np.float32)}, bare_dir / "model-00001-of-00002.safetensors")
    save_file({"w": np.zeros(2, np.float32)}, bare_dir / "model-00002-of-00002.safetensors")
    assert "appears in two shards" in checkpoint_error(bare_dir)


def test_list_header_through_the_cli(tiny_model, tmp_path):
    write_raw_safetensors(tiny_model / "model.safetensors", [1, 2])
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", tiny_model, "-o", out), "JSON list")
    assert_no_output(out)


# ---- D5: never overwrite an input, never replace a non-regular file ------------------------------

@pytest.mark.parametrize("victim", ["config.json", "tokenizer.json", "model.safetensors"])
def test_output_onto_an_input_file_is_refused(tiny_model, victim):
    before = (tiny_model / victim).read_bytes()
    result = run_cli("convert", tiny_model, "-o", tiny_model / victim, "--force", "--no-progress")
    assert_one_line_error(result, "is the input file")
    assert (tiny_model / victim).read_bytes() == before


def test_output_onto_an_extra_input_is_refused(tiny_model, tmp_path):
    extra = tmp_path / "imatrix.dat"
    extra.write_bytes(b"keep")
    with pytest.raises(AtdError, match="is the input file"):
        convert(tiny_model, extra, ConvertOptions(force=True, progress=False, input_files=(extra,)))
    assert extra.read_bytes() == b"keep"


def test_force_refuses_non_regular_files(tiny_model, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert_one_line_error(run_cli("convert", tiny_model, "-o", fifo, "--force", "--no-progress"),
                          "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert_one_line_error(run_cli("export", "--stock", tmp_path / "any.gguf", "-o", fifo, "--force"),
                          "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


# ---- D7: nothing the runtime aborts on ----------------------------------------------------------

def test_heads_not_a_multiple_of_kv_heads():
    with pytest.raises(AtdError, match=r"num_attention_heads \(4\) is not a multiple of num_key_value_heads \(3\)"):
        LlamaParams.from_config(tiny_config(n_embd=256, num_attention_heads=4, num_key_value_heads=3, head_dim=64))


def test_unparsable_chat_template_is_refused(tiny_model, tmp_path):
    path = tiny_model / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }"
    path.write_text(json.dumps(config))
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", tiny_model, "-o", out, "--no-progress"), "chat template")
    assert_no_output(out)


def test_norms_never_leave_f32(tiny_model, tmp_path):
    out = tmp_path / "o.gguf"
    everything_q8 = ConvertOptions(choose_type=lambda name, shape: QT.Q8_0, progress=False)
    with pytest.raises(AtdError, match="must stay F32"):
        convert(tiny_model, out, everything_q8)
    assert_no_output(out)
    from converter.atd_policy import AtdOptions

    policy = AtdOptions(planes=2)
    for source in LlamaModel(Checkpoint(tiny_model)).tensors():
        if source.name.endswith("_norm.weight"):
            assert policy.choose(source.name, source.shape) == QT.F32


def test_export_never_writes_a_tiny_alignment(tmp_path):
    src, out = tmp_path / "a1.gguf", tmp_path / "out.gguf"
    atype = gguf_types.atd_type("ATD2")
    trits = np.zeros((4, 2, atype.block_size), dtype=np.int8)
    block = gguf_types.pack_blocks(trits, np.full((4, 2), 0.01, dtype=np.float16)).reshape(4, -1)
    writer = gguf.GGUFWriter(src, "llama")
    writer.add_custom_alignment(1)
    writer.add_tensor("blk.0.ffn_up.weight", block, raw_dtype=gguf_types.gguf_qtype(atype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run_cli("export", "--stock", src, "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(out)
    field = reader.get_field(gguf.Keys.General.ALIGNMENT)
    assert field is None or int(field.contents()) >= 32
    assert reader.data_offset % 32 == 0


# ---- D8: values out of range -------------------------------------------------------------------

@pytest.fixture
def huge_weight_model(tmp_path, llama3_dir):
    def make(value: float) -> Path:
        tensors = tiny_tensors()
        down = tensors["model.layers.0.mlp.down_proj.weight"].astype(np.float32)
        down[3, 5] = value
        tensors["model.layers.0.mlp.down_proj.weight"] = down
        return make_model(tmp_path / f"m{value:g}", llama3_dir, tensors=tensors)
    return make


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_out_of_range_weight_is_refused_by_name(huge_weight_model, tmp_path, outtype):
    model = huge_weight_model(1e30)
    out = tmp_path / "o.gguf"
    proc = subprocess.run([sys.executable, "-m", "converter.cli", "convert", str(model), "-o", str(out),
                           "--outtype", outtype, "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr  # no numpy warning either
    assert "blk.0.ffn_down.weight" in lines[0] and outtype.upper() in lines[0]
    assert_no_output(out)
    assert run_cli("convert", model, "-o", out, "--outtype", "f32", "--no-progress").exit_code == 0


@pytest.mark.parametrize("value, fallback", [(4e6, "Q8_0"), (1e30, "F32")])
def test_planes_keep_an_overflowing_tensor_in_a_stock_type(huge_weight_model, tmp_path, value, fallback):
    """docs/atd-format.md §7: a tensor whose plane scales overflow fp16 stays in a stock type."""
    model = huge_weight_model(value)
    out = tmp_path / "o.gguf"
    result = run_cli("convert", model, "-o", out, "--planes", "2", "--no-progress")
    assert result.exit_code == 0, result.output
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"].name == fallback
    assert gguf_types.is_atd_type_id(types["blk.0.ffn_up.weight"])


# ---- D11: every terminating signal cleans up; stale temps of dead writers go --------------------

# converts with a pause after the first tensor, so the signal arrives while the temp file is open
_SLOW_CONVERT = """
import sys, time
import converter.convert as c
write = c._TensorData.write
def slow_write(self, *args):
    write(self, *args)
    time.sleep(60)
c._TensorData.write = slow_write
from converter.cli import main
sys.argv = ["atd-gguf", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGTERM])
def test_terminating_signals_leave_no_temp_file(tiny_model, tmp_path, signum):
    out = tmp_path / "o.gguf"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, "convert", str(tiny_model), "-o", str(out),
                             "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    temp = None
    while temp is None or temp.stat().st_size < 4096:  # header and first tensor written
        temp = next((p for p in tmp_path.iterdir() if p.name.startswith(".o.gguf.")), None)
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.05)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert stderr.strip() == "error: terminated"
    assert_no_output(out)


def test_stale_temps_of_dead_writers_are_removed(tiny_model, tmp_path):
    out = tmp_path / "o.gguf"
    stale = tmp_path / ".o.gguf.abcd_123.tmp"      # a SIGKILLed writer's temp
    locked = tmp_path / ".o.gguf.live1234.tmp"     # a live writer's (flock held)
    fresh = tmp_path / ".o.gguf.new12345.tmp"      # younger than this process: maybe not locked yet
    other = tmp_path / ".p.gguf.abcd1234.tmp"      # another output's
    odd = tmp_path / ".o.gguf.abc.tmp"             # not our naming pattern
    old = time.time() - 3600
    for path in (stale, locked, other, odd):
        path.write_bytes(b"partial")
        os.utime(path, (old, old))
    fresh.write_bytes(b"partial")
    os.utime(fresh, (time.time() + 60, time.time() + 60))
    with open(locked, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert run_cli("convert", tiny_model, "-o", out, "--no-progress").exit_code == 0
    assert not stale.exists()
    assert locked.exists() and fresh.exists() and other.exists() and odd.exists()


# ---- D12: the final rename never replaces a file that appeared meanwhile ------------------------

def test_concurrent_writer_does_not_get_overwritten(tmp_path):
    out = tmp_path / "o.gguf"
    with pytest.raises(AtdError, match="created by another process"):
        with fsutil.atomic_output(out, force=False) as tmp:
            tmp.write_bytes(b"ours")
            out.write_bytes(b"theirs")  # the other conversion finished first
    assert out.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["o.gguf"]
    with fsutil.atomic_output(out, force=True) as tmp:
        tmp.write_bytes(b"ours")
    assert out.read_bytes() == b"ours"


# ---- D17: memory is bounded by a chunk, not the largest tensor ---------------------------------

_MEASURE_TENSOR_PHASE = """
import sys
import converter.convert as c
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
def peak():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
state = {}
write = c._TensorData.write
def measured_write(self, *args):
    if not state:
        state["base"] = rss()
        open("/proc/self/clear_refs", "w").write("5")  # restart VmHWM from now
    write(self, *args)
c._TensorData.write = measured_write
c.convert(sys.argv[1], sys.argv[2], c.ConvertOptions(outtype=sys.argv[3], progress=False))
print(peak() - state["base"])
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_peak_memory_is_below_the_largest_tensor(tmp_path, llama3_dir, outtype):
    n_embd = 512  # token_embd: 128256 x 512 = 65.7M weights, 131 MB as f16 in the checkpoint
    model = make_model(tmp_path / "m", llama3_dir, n_embd=n_embd)
    largest = 128256 * n_embd * 2
    # big allocations straight from mmap, so freed memory is not reused unseen
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-c", _MEASURE_TENSOR_PHASE, str(model), str(tmp_path / "o.gguf"),
                           outtype], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-800:]
    extra = int(proc.stdout.split()[-1])
    assert extra < largest / 2, f"tensor phase peaked {extra / 2**20:.0f} MiB above its start"


# ---- D18: diagnoses, not exception names --------------------------------------------------------

@pytest.mark.parametrize("changes, key", [
    ({"hidden_size": 256.7}, "hidden_size"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"intermediate_size": "big"}, "intermediate_size"),
    ({"vocab_size": True}, "vocab_size"),
    ({"rope_scaling": [1, 2]}, "rope"),
])
def test_invalid_config_values_name_the_key(changes, key):
    with pytest.raises(AtdError) as failure:
        LlamaParams.from_config(tiny_config(**changes))
    assert key in str(failure.value) and str(failure.value).startswith("config.json")


def test_invalid_config_value_through_the_cli(tiny_model, tmp_path):
    (tiny_model / "config.json").write_text(json.dumps(tiny_config(num_attention_heads=0)))
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", tiny_model, "-o", out), "num_attention_heads")
    assert_no_output(out)


def test_deeply_nested_config_is_a_clear_error(tiny_model, tmp_path):
    (tiny_model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", tiny_model, "-o", out), "config.json", "nested too deeply")


def test_missing_shard_message_without_an_index(bare_dir):
    (bare_dir / "model.safetensors").symlink_to(bare_dir / "gone.safetensors")
    message = checkpoint_error(bare_dir)
    assert "index" not in message and "not a regular file" in message


def test_temp_file_is_synced_and_chmodded_through_its_descriptor(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    monkeypatch.setattr(fsutil.os, "chmod", lambda *a, **k: pytest.fail("chmod by name follows symlinks"))
    out = tmp_path / "o.gguf"
    umask = os.umask(0o022)
    try:
        with fsutil.atomic_output(out, force=False) as tmp:
            tmp.write_bytes(b"data")
            assert tmp.stat().st_mode & 0o777 == 0o644  # already while writing: fchmod on the fd
    finally:
        os.umask(umask)
    assert out.read_bytes() == b"data"
    assert len(synced) >= 2  # the file before the rename, the directory after it

