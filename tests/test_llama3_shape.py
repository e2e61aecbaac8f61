"""scripts/llama3_shape.py: seeded Llama-3-shaped checkpoints, checked against transformers,
the safetensors library, the original Llama-3 tokenizer and `atd-gguf convert`.

A tiny shape (hidden 64, 2 layers, the real 128256-token vocabulary: ~33 MB) with a small shard
limit, so that the index, a layer split across shards and a tensor alone in its shard all occur.
"""

from __future__ import annotations

import filecmp
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save

from converter.cli import main as atd_main

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "llama3_shape.py"


def _load():
    spec = importlib.util.spec_from_file_location("llama3_shape", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


ls = _load()
mf = ls.mf

TINY = ls.Shape(layers=2, hidden=64, intermediate=192, heads=4, kv_heads=1, head_dim=16)
# embed_tokens (16.4 MB) plus part of layer 0 fill the first shard; lm_head gets a shard of its own
SHARD_LIMIT = 16_500_000


def _build(out: Path, seed: int = 0, shape=TINY) -> Path:
    return ls.ensure_checkpoint(shape, seed=seed, out=out, max_shard_bytes=SHARD_LIMIT)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("a"))


def _shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("model-*.safetensors"))


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in _shards(directory):
        out.update(load_file(shard))
    return out


def _reference_model(config_dir: Path):
    """transformers' own LlamaForCausalLM for this config.json, without weights."""
    from transformers import AutoConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(AutoConfig.from_pretrained(config_dir))


# --------------------------------------------------------------------------- #
# config.json
# --------------------------------------------------------------------------- #


def test_config_as_transformers_reads_it(model_dir: Path):
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    assert c.architectures == ["LlamaForCausalLM"] and c.model_type == "llama"
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 192, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 1, 16)
    assert c.vocab_size == 128256 and c.tie_word_embeddings is False
    assert c.max_position_embeddings == 131072 and c.rms_norm_eps == 1e-5
    assert (c.bos_token_id, c.eos_token_id) == (128000, [128001, 128008, 128009])
    rope = dict(getattr(c, "rope_parameters", None) or c.rope_scaling)
    rope.setdefault("rope_theta", getattr(c, "rope_theta", None))
    assert rope == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def test_full_shape_is_llama3_8b():
    # meta-llama/Llama-3.1-8B's published hyperparameters
    c = ls.hf_config(ls.FULL)
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (4096, 14336, 32)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (32, 8, 128)
    assert c["vocab_size"] == 128256 and c["tie_word_embeddings"] is False
    assert ls.FULL.dir_name(0) == "llama3-8b-shape-L32-s0"
    # 8,030,261,248 parameters: Llama-3.1-8B's count
    assert sum(s.numel for s in ls.tensor_specs(ls.FULL)) == 8_030_261_248


# --------------------------------------------------------------------------- #
# Shards and index
# --------------------------------------------------------------------------- #


def test_index_is_consistent(model_dir: Path):
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = _shards(model_dir)
    k = len(shards)
    assert k >= 3 and [p.name for p in shards] == [f"model-{i:05d}-of-{k:05d}.safetensors" for i in range(1, k + 1)]
    seen: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(shard, "pt") as f:
            data = 0
            for name in f.keys():
                assert name not in seen, f"{name} in two shards"
                seen[name] = shard.name
                sl = f.get_slice(name)
                assert sl.get_dtype() == "BF16"
                data += 2 * int(np.prod(sl.get_shape()))
        assert data <= SHARD_LIMIT
        total += data
    assert index["weight_map"] == seen
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == total
    # the tensors and shapes transformers' LlamaForCausalLM has for this config
    reference = {n: tuple(p.shape) for n, p in _reference_model(model_dir).state_dict().items()}
    got = {n: tuple(t.shape) for n, t in _tensors(model_dir).items()}
    assert got == reference
    assert index["metadata"]["total_parameters"] == sum(int(np.prod(s)) for s in reference.values())


def test_layer_split_across_shards(model_dir: Path):
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    layer0 = {v for n, v in index.items() if n.startswith("model.layers.0.")}
    assert len(layer0) == 2
    assert sum(1 for v in index.values() if v == index["lm_head.weight"]) == 1


def test_shards_are_the_safetensors_librarys_own_bytes(model_dir: Path):
    """Each shard equals what safetensors.torch.save writes for the same tensors."""
    for shard in _shards(model_dir):
        assert save(load_file(shard), metadata={"format": "pt"}) == shard.read_bytes()


def test_single_shard_has_no_index(tmp_path: Path):
    d = ls.ensure_checkpoint(ls.Shape(layers=1, hidden=64, intermediate=64, heads=2, kv_heads=1, head_dim=32),
                             out=tmp_path)
    assert (d / "model.safetensors").is_file() and not (d / "model.safetensors.index.json").exists()


# --------------------------------------------------------------------------- #
# Values
# --------------------------------------------------------------------------- #


def test_bf16_rounding_matches_torch():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(100_000).astype(np.float32) * 0.02,
                        rng.standard_normal(1000).astype(np.float32) * 1e30,
                        # exact ties (low half 0x8000) with even and odd kept LSB, both signs
                        np.array([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x3F80FFFF],
                                 dtype=np.uint32).view(np.float32)])
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ls.bf16_bits(x.copy()), want)


def test_value_statistics(model_dir: Path):
    t = {n: v.float() for n, v in _tensors(model_dir).items()}
    embed = t["model.embed_tokens.weight"]  # 8.2M draws
    assert abs(embed.mean().item()) < 1e-4 and abs(embed.std().item() - 0.02) < 2e-4
    norms = torch.cat([v for n, v in t.items() if n.endswith("norm.weight")])
    assert abs(norms.mean().item() - 1.0) < 0.03 and 0.08 < norms.std().item() < 0.12
    assert not torch.equal(t["model.embed_tokens.weight"], t["lm_head.weight"])  # untied, independent draws


def test_determinism(model_dir: Path, tmp_path: Path):
    again = _build(tmp_path / "same")
    cmp = filecmp.dircmp(model_dir, again)
    assert sorted(cmp.common) == sorted(p.name for p in model_dir.iterdir())
    assert filecmp.cmpfiles(model_dir, again, cmp.common, shallow=False)[0] == sorted(cmp.common)

    other = _build(tmp_path / "other", seed=1)
    for a, b in zip(_shards(model_dir), _shards(other)):
        assert a.read_bytes() != b.read_bytes()
    a, b = _tensors(model_dir), _tensors(other)
    assert all(not torch.equal(a[n], b[n]) for n in a)


def test_tensor_values_do_not_depend_on_layer_count(model_dir: Path, tmp_path: Path):
    one = _tensors(_build(tmp_path, shape=ls.Shape(**{**ls.asdict(TINY), "layers": 1})))
    two = _tensors(model_dir)
    assert set(one) < set(two)
    assert all(torch.equal(one[n], two[n]) for n in one)


# --------------------------------------------------------------------------- #
# Tokenizer, transformers, atd-gguf
# --------------------------------------------------------------------------- #


def test_tokenizer_is_the_real_llama3(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    original = mf.original_llama3_tokenizer(ls.DOWNLOADS)
    assert len(tok) == 128256 and (tok.bos_token_id, tok.eos_token_id) == (128000, 128009)
    text = "Hello world! Größe 1234 你好 <|eot_id|>"
    assert tok.encode(text) == original.encode(text).ids
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date:")
    assert chat.endswith("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_transformers_forward(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[128000, 9906, 1917, 0, 128255]])).logits
    assert tuple(logits.shape) == (1, 5, 128256) and bool(torch.isfinite(logits).all())


def _atd_convert_f16(model_dir: Path, out: Path) -> str:
    result = CliRunner().invoke(atd_main, ["convert", str(model_dir), "-o", str(out), "--outtype", "f16",
                                           "--no-progress"])
    assert result.exit_code == 0, result.output
    return result.output


def test_atd_gguf_convert_f16(model_dir: Path, tmp_path: Path):
    # (it also checks the tokenizer: a vocab it does not recognize as llama-bpe is an error)
    output = _atd_convert_f16(model_dir, tmp_path / "tiny-f16.gguf")
    # 2 x 9 layer tensors, token_embd, output_norm, output, and rope_freqs for the llama3 rope
    assert "22 tensors" in output and (tmp_path / "tiny-f16.gguf").is_file()


def test_row_index_reads_equal_the_full_tensor(model_dir: Path):
    """The size plan's row sample (bf16, rope-permuted attn_q/attn_k with GQA) reads single rows: they
    equal the rows of the whole tensor as the converter writes it (checked against llama.cpp below)."""
    from converter import budget
    from converter.checkpoint import Checkpoint
    from converter.llama import LlamaModel

    rng = np.random.default_rng(0)
    seen = set()
    for source in LlamaModel(Checkpoint(model_dir)).tensors():
        if len(source.shape) != 2:
            continue
        seen.add(source.name.split(".")[-2])
        full = source.load()
        idx = np.concatenate([budget.sample_rows(*source.shape), rng.integers(0, source.shape[0], 7),
                              [source.shape[0] - 1, 0]])
        assert np.array_equal(source.load_row_indices(idx), full[idx]), source.name
        assert np.array_equal(budget.sampled_source_rows(source), full[budget.sample_rows(*source.shape)])
    assert {"attn_q", "attn_k", "attn_v", "ffn_down", "token_embd", "output"} <= seen


@pytest.mark.slow
def test_same_gguf_as_llama_cpp_converter(model_dir: Path, reference_gguf, tmp_path: Path):
    """llama.cpp's convert_hf_to_gguf.py takes the checkpoint too, and writes the same file."""
    from gguf_compare import gguf_differences

    ours = tmp_path / "ours.gguf"
    _atd_convert_f16(model_dir, ours)
    assert gguf_differences(ours, reference_gguf(model_dir, "f16")) == []


# --------------------------------------------------------------------------- #
# Cache, CLI and failures
# --------------------------------------------------------------------------- #

_TINY_ARGS = ["--layers", "2", "--hidden", "64", "--intermediate", "192", "--heads", "4", "--kv-heads", "1",
              "--head-dim", "16", "--max-shard-bytes", str(SHARD_LIMIT)]


def test_cli_prints_the_directory_and_reuses_it(model_dir: Path):
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    proc = subprocess.run([sys.executable, str(SCRIPT), *_TINY_ARGS, "--out", str(model_dir.parent)],
                          capture_output=True, text=True, check=True)
    assert proc.stdout == f"{model_dir}\n"
    assert "reusing" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before
    assert re.fullmatch(r"llama3-shape-h64-i192-a4-kv1-d16-L2-s0-shard16500000", model_dir.name)


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
    assert len(err) == 1, err
    return err[0]


def test_insufficient_disk_space(tmp_path: Path, monkeypatch, capsys):
    class Usage:
        free = 10**6

    monkeypatch.setattr(ls.shutil, "disk_usage", lambda path: Usage)
    assert ls.main([*_TINY_ARGS, "--out", str(tmp_path)]) == 1
    assert _one_error_line(capsys).startswith("llama3_shape: error: not enough free disk space")
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_bad_shape(tmp_path: Path, capsys):
    assert ls.main(["--layers", "1", "--heads", "6", "--kv-heads", "4", "--out", str(tmp_path)]) == 1
    assert "multiple of kv_heads" in _one_error_line(capsys)


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch):
    def boom(path, *args, **kwargs):
        path.write_bytes(b"partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(ls, "write_shard", boom)
    with pytest.raises(RuntimeError, match="boom"):
        _build(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
