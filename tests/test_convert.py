"""`atd-gguf convert` to stock types equals llama.cpp's own converter, and bad input fails cleanly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from converter.cli import main
from gguf_compare import gguf_differences

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ["smollm2-135m-instruct", "llama3-tiny"]


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_no_output(path: Path) -> None:
    assert not path.exists()
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
    assert leftovers == []


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("fixture", FIXTURES)
def test_matches_llama_cpp_converter(fixture, outtype, fixture_dirs, reference_gguf, tmp_path):
    model = fixture_dirs[fixture]
    ours = tmp_path / "ours.gguf"
    result = run_cli("convert", model, "-o", ours, "--outtype", outtype, "--no-progress")
    assert result.exit_code == 0, result.output
    reference = reference_gguf(model, outtype)
    assert gguf_differences(ours, reference) == []
    # the comparison itself must see the tensors and keys it claims to compare
    reader = gguf.GGUFReader(ours)
    assert len(reader.tensors) > 10 and "tokenizer.ggml.tokens" in reader.fields


def test_llama3_specifics(llama3_dir, tmp_path):
    out = tmp_path / "l3.gguf"
    assert run_cli("convert", llama3_dir, "-o", out, "--no-progress").exit_code == 0
    reader = gguf.GGUFReader(out)
    names = [t.name for t in reader.tensors]
    config = json.loads((llama3_dir / "config.json").read_text())
    assert names[0] == "rope_freqs.weight"
    assert "output.weight" in names  # untied lm_head
    assert reader.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert reader.fields["llama.rope.freq_base"].contents() == config.get("rope_theta", 500000.0)
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() in (128001, 128008, 128009)
    # Q rows are permuted from HF's rotate-half order into GGML's interleaved order
    from safetensors import safe_open
    index = json.loads((llama3_dir / "model.safetensors.index.json").read_text())["weight_map"]
    hf_name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(llama3_dir / index[hf_name], framework="pt") as f:  # torch reads bf16 independently
        hf_q = f.get_tensor(hf_name).float().numpy()
    ours_q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    q = np.asarray(ours_q.data).view(np.float16).astype(np.float32).reshape(hf_q.shape)
    head_dim, n_head = config["head_dim"], config["num_attention_heads"]
    hf_heads = hf_q.reshape(n_head, 2, head_dim // 2, -1)
    expected = hf_heads.astype(np.float16).astype(np.float32)
    interleaved = q.reshape(n_head, head_dim // 2, 2, -1)
    assert np.array_equal(interleaved[:, :, 0], expected[:, 0])
    assert np.array_equal(interleaved[:, :, 1], expected[:, 1])


def test_smollm2_tied_embeddings(smollm2_dir, tmp_path):
    out = tmp_path / "s.gguf"
    assert run_cli("convert", smollm2_dir, "-o", out, "--outtype", "q8_0", "--no-progress").exit_code == 0
    reader = gguf.GGUFReader(out)
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert names["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


# ---- bad input ---------------------------------------------------------------------------------

@pytest.fixture
def llama3_copy(llama3_dir, tmp_path) -> Path:
    """A writable copy of the Llama-3 fixture (hard links for the big shards)."""
    dst = tmp_path / "model"
    dst.mkdir()
    for f in llama3_dir.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def test_missing_directory(tmp_path):
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", tmp_path / "nope", "-o", out), "no such directory")
    assert_no_output(out)


def test_non_llama_architecture(llama3_copy, tmp_path):
    config = json.loads((llama3_copy / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (llama3_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", llama3_copy, "-o", out), "unsupported architecture", "GPT2LMHeadModel")
    assert_no_output(out)


def test_truncated_safetensors(llama3_copy, tmp_path):
    shard = sorted(llama3_copy.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", llama3_copy, "-o", out), "truncated", shard.name)
    assert_no_output(out)


def test_corrupt_safetensors_header(llama3_copy, tmp_path):
    shard = sorted(llama3_copy.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage inside the JSON header
    shard.write_bytes(bytes(data))
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", llama3_copy, "-o", out), "corrupt", shard.name)
    assert_no_output(out)


def test_config_and_weights_disagree(llama3_copy, tmp_path):
    config = json.loads((llama3_copy / "config.json").read_text())
    config["intermediate_size"] += 256
    (llama3_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", llama3_copy, "-o", out), "disagree")
    assert_no_output(out)


def test_nan_weights_leave_no_output(llama3_copy, tmp_path):
    index = json.loads((llama3_copy / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    shard = llama3_copy / index[name]
    from gguf.utility import SafetensorsLocal
    with SafetensorsLocal(shard) as tensors:
        rng = tensors[name].data_range
    with open(shard, "r+b") as f:  # a bf16 NaN (0x7fc0) in the middle of the tensor
        f.seek(rng.offset + rng.size // 2 & ~1)
        f.write(b"\xc0\x7f")
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", llama3_copy, "-o", out), "NaN", "blk.1.ffn_down.weight")
    assert_no_output(out)


def test_existing_output_needs_force(llama3_dir, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    assert_one_line_error(run_cli("convert", llama3_dir, "-o", out), "exists", "--force")
    assert out.read_bytes() == b"keep me"
    assert run_cli("convert", llama3_dir, "-o", out, "--force", "--no-progress").exit_code == 0
    assert gguf.GGUFReader(out).tensors


def test_verbose_shows_traceback(tmp_path):
    result = CliRunner().invoke(main, ["-v", "convert", str(tmp_path / "nope"), "-o", str(tmp_path / "o.gguf")])
    assert result.exit_code != 0 and result.exception is not None


def test_offline_repo_id(tmp_path):
    # a subprocess: huggingface_hub reads HF_HUB_OFFLINE when it is first imported
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = tmp_path / "o.gguf"
    proc = subprocess.run([sys.executable, "-m", "converter.cli", "convert", "some-org/some-model", "-o", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "some-org/some-model" in lines[0], proc.stderr
    assert "offline" in lines[0]
    assert_no_output(out)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_f16_and_f32_checkpoints_match_llama_cpp(dtype, llama3_dir, reference_gguf, tmp_path):
    """The same model stored in f16 / f32 (single file) converts exactly like llama.cpp does."""
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / f"llama3-tiny-{dtype}"
    model.mkdir()
    tensors = {}
    for shard in sorted(llama3_dir.glob("model-*.safetensors")):
        tensors.update({k: v.to(getattr(torch, dtype)) for k, v in load_file(shard).items()})
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    for f in llama3_dir.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json":
            shutil.copy(f, model / f.name)
    ours = tmp_path / "ours.gguf"
    result = run_cli("convert", model, "-o", ours, "--outtype", "f16", "--no-progress")
    assert result.exit_code == 0, result.output
    assert gguf_differences(ours, reference_gguf(model, "f16")) == []


# ---- tokenizers saved by transformers 5 ----------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_transformers5_dir(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2 with its tokenizer re-saved by transformers 5 (add_bos_token=False): tokenizer_config.json
    without add_bos_token, and a TemplateProcessing post-processor whose single sequence is just [A]."""
    import transformers
    from transformers import AutoTokenizer

    assert int(transformers.__version__.split(".")[0]) >= 5, transformers.__version__
    model = tmp_path_factory.mktemp("smollm2-transformers5")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        try:
            os.link(smollm2_dir / name, model / name)
        except OSError:
            shutil.copy(smollm2_dir / name, model / name)
    AutoTokenizer.from_pretrained(smollm2_dir, add_bos_token=False).save_pretrained(model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    post = json.loads((model / "tokenizer.json").read_text())["post_processor"]
    assert "add_bos_token" not in config
    assert post["type"] == "TemplateProcessing" and post["single"] == [{"Sequence": {"id": "A", "type_id": 0}}]
    return model


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_transformers5_tokenizer_matches_llama_cpp(outtype, smollm2_transformers5_dir, reference_gguf, tmp_path):
    ours = tmp_path / "ours.gguf"
    result = run_cli("convert", smollm2_transformers5_dir, "-o", ours, "--outtype", outtype, "--no-progress")
    assert result.exit_code == 0, result.output
    reference = reference_gguf(smollm2_transformers5_dir, outtype)
    assert gguf_differences(ours, reference) == []
    # the key this checkpoint is about is there, as llama.cpp writes it
    assert gguf.GGUFReader(reference).fields["tokenizer.ggml.add_bos_token"].contents() is False
