"""The ATD types inside llama.cpp (`make llama`: llama-patch/atd.patch + ggml-ext).

Needs the patched build (build/llama.cpp-patched) and the stock one (build/llama.cpp-stock) from
scripts/build_llama.py; without them every test here fails with "run `make llama` first".
The small C tools in tests/llama_plugin/ are compiled against those builds per session.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

import gguf_types
from converter.cli import main
from converter.llama import permute_qk
from test_convert import assert_one_line_error, run_cli
from test_ggml_ext_dot import _cpu_flags

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(__file__).resolve().parent / "llama_plugin"
PATCHED = ROOT / "build" / "llama.cpp-patched"
STOCK = ROOT / "build" / "llama.cpp-stock"
LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
THREADS = "2"
PROMPTS = [  # next tokens that are clear (top-1 leads by > CLEAR_MARGIN) in the ATD3 model
    "The capital of France is",
    "def fibonacci(n):\n    if n <",
    "import numpy as",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2+2 =",
]
# ATD3 in llama.cpp vs transformers (fp32, the same dequantized weights): llama.cpp rounds the
# activations of every matmul to q8_K (256-blocks) / q8_0 (64-blocks), so the logits carry
# quantization noise. Measured on SmolLM2-135M, PROMPTS, every position (logit spread ~50):
#   ATD3  max |dlogit| 2.29, mean 0.29; top-1 agreement 0.89   (stock types in the same harness:
#   Q8_0  max 1.37, mean 0.21;  Q6_K --pure max 3.62, mean 0.35;  F16 max 0.04, mean 0.007)
# A wrong plane, scale or block order gives mean errors of several units. docs/llama-plugin.md.
MAX_ABS_DLOGIT = 4.0
MEAN_ABS_DLOGIT = 0.5
CLEAR_MARGIN = 1.5  # top-1 must agree wherever the reference's top-1 leads top-2 by this much


EXTRA_LIBS = {"atd_mm": ["-lggml-cpu", "-lm"]}  # tools that call ggml-cpu directly


def _build(kind: str) -> Path:
    base = PATCHED if kind == "patched" else STOCK
    bin_dir = base / "build" / "bin"
    if not (bin_dir / "libllama.so").is_file():
        pytest.fail(f"{bin_dir}/libllama.so missing: the {kind} llama.cpp is not built; run `make llama` first")
    return base


def _compile(kind: str, tool: str, out_dir: Path) -> Path:
    base = _build(kind)
    src = base / "src" if kind == "patched" else ROOT / "build" / "llama.cpp-src"
    bin_dir = base / "build" / "bin"
    exe = out_dir / f"{tool}-{kind}"
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to build the test tools"
    subprocess.run([cc, "-O1", "-o", str(exe), str(TOOLS / f"{tool}.c"),
                    f"-I{src / 'include'}", f"-I{src / 'ggml' / 'include'}",
                    f"-L{bin_dir}", f"-Wl,-rpath,{bin_dir}", "-lllama", "-lggml", "-lggml-base",
                    *EXTRA_LIBS.get(tool, [])],
                   check=True, capture_output=True, text=True)
    return exe


@pytest.fixture(scope="session")
def tools(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_tools")
    cache: dict[tuple[str, str], Path] = {}

    def get(kind: str, tool: str) -> Path:
        if (kind, tool) not in cache:
            cache[(kind, tool)] = _compile(kind, tool, out)
        return cache[(kind, tool)]

    return get


def _bin(name: str) -> Path:
    path = _build("patched") / "build" / "bin" / name
    if not path.is_file():
        pytest.fail(f"{path} missing: run `make llama` first")
    return path


def _convert(model_dir: Path, out: Path, *args: str) -> Path:
    result = CliRunner().invoke(main, ["convert", str(model_dir), "-o", str(out), "--no-progress", *args])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def plugin_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("llama_plugin")


@pytest.fixture(scope="session")
def smollm2_f16_gguf(smollm2_dir, plugin_dir):
    return _convert(smollm2_dir, plugin_dir / "smollm2-f16.gguf", "--outtype", "f16")


@pytest.fixture(scope="session")
def smollm2_f32_gguf(smollm2_dir, plugin_dir):
    return _convert(smollm2_dir, plugin_dir / "smollm2-f32.gguf", "--outtype", "f32")


@pytest.fixture(scope="session")
def smollm2_atd3_gguf(smollm2_dir, plugin_dir):
    return _convert(smollm2_dir, plugin_dir / "smollm2-atd3.gguf", "--planes", "3")


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _logits(exe: Path, model: Path, tokens: list[int], out: Path, n_vocab: int) -> np.ndarray:
    proc = subprocess.run([str(exe), str(model), str(out), THREADS, *map(str, tokens)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.fromfile(out, dtype=np.float32).reshape(len(tokens), n_vocab)


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


# ---- a. stock behaviour intact -----------------------------------------------------------------

def test_stock_model_gives_identical_logits(tools, smollm2_f16_gguf, tokenizer, tmp_path):
    """An F16 model runs bit-identically in the stock and the patched llama.cpp."""
    n_vocab = len(tokenizer)
    for i, prompt in enumerate(PROMPTS):
        tokens = tokenizer(prompt)["input_ids"]
        stock = _logits(tools("stock", "atd_logits"), smollm2_f16_gguf, tokens, tmp_path / f"s{i}.f32", n_vocab)
        patched = _logits(tools("patched", "atd_logits"), smollm2_f16_gguf, tokens, tmp_path / f"p{i}.f32", n_vocab)
        assert np.isfinite(stock).all()
        np.testing.assert_array_equal(patched, stock)


# ---- b. tensors: ggml's dequantize == the Python reference ----------------------------------------

# how _synthetic_atd_gguf breaks a tensor: a byte the encoder never writes (40 = ceil(256 v / 243) for
# no v), a code 1 in a padding slot (the last digit of a plane's last byte: digits 1111 1 -> byte 128),
# a non-finite scale
CORRUPTIONS = {
    "noncanonical": lambda data, t: data.__setitem__((2, 2 * t.planes + 3), 40),
    "padding": lambda data, t: data.__setitem__((2, 2 * t.planes + t.plane_bytes - 1), 128),
    "inf_scale": lambda data, t: data.__setitem__((2, slice(0, 2)), np.array([0x00, 0x7C], np.uint8)),
}


def _synthetic_atd_gguf(path: Path, corrupt: str | None = None, how: str = "noncanonical",
                        metadata: dict | None = None) -> dict[str, np.ndarray]:
    """One small tensor of every ATD type (random Gaussian rows), fitted by the reference."""
    rng = np.random.default_rng(7)
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in (metadata or {}).items():
        writer.add_uint32(key, value)
    packed = {}
    for t in gguf_types.ATD_TYPES:
        cols = 3 * t.block_size
        w = rng.standard_normal((5, cols)).astype(np.float32) * 0.02
        w[1, : t.block_size] = 0.0  # an all-zero block
        data = gguf_types.quantize(w, t)
        if corrupt == t.name:
            data = data.copy()
            CORRUPTIONS[how](data, t)
            assert gguf_types.validate_blocks(data, t) is not None
        packed[f"{t.name.lower()}.weight"] = data
        writer.add_tensor(f"{t.name.lower()}.weight", data, raw_dtype=gguf_types.gguf_qtype(t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return packed


def _ggml_dequantize(tools, model: Path, out_dir: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    out_dir.mkdir(exist_ok=True)
    proc = subprocess.run([str(tools("patched", "atd_dequant")), str(model), str(out_dir)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = {}
    for line in proc.stdout.splitlines():
        name, *info = line.split()
        result[name] = (info, np.fromfile(out_dir / f"{name}.f32", dtype=np.float32))
    return result


def _check_dequantized(path: Path, ggml: dict) -> set[str]:
    seen = set()
    for name, tensor in _tensors(path).items():
        if not gguf_types.is_atd_type_id(tensor.tensor_type):
            continue
        t = gguf_types.atd_type(int(tensor.tensor_type))
        info, values = ggml[name]
        type_name, blck, tsize, n, valid = info
        assert (type_name, int(blck), int(tsize)) == (t.name.lower(), t.block_size, t.type_size)
        assert int(n) == tensor.n_elements and valid == "1", (name, info)
        ref = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1)
        assert ref.dtype == np.float32
        # bit for bit (-0.0 vs +0.0 and NaN patterns included)
        np.testing.assert_array_equal(values.view(np.uint32), ref.view(np.uint32), err_msg=name)
        seen.add(t.name)
    return seen


def test_ggml_dequantize_equals_reference_all_types(tools, tmp_path):
    path = tmp_path / "all-types.gguf"
    _synthetic_atd_gguf(path)
    seen = _check_dequantized(path, _ggml_dequantize(tools, path, tmp_path / "out"))
    assert seen == {t.name for t in gguf_types.ATD_TYPES}


def test_ggml_dequantize_equals_reference_model(tools, smollm2_atd3_gguf, tmp_path):
    seen = _check_dequantized(smollm2_atd3_gguf, _ggml_dequantize(tools, smollm2_atd3_gguf, tmp_path / "out"))
    assert seen == {"ATD3", "ATD3_64"}  # 576-wide rows use 64-blocks, ffn_down (1536) 256-blocks


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
@pytest.mark.parametrize("bad_type", ["ATD2_64", "ATD3"])
def test_ggml_validate_rejects_malformed_blocks(tools, tmp_path, how, bad_type):
    path = tmp_path / "bad.gguf"
    _synthetic_atd_gguf(path, corrupt=bad_type, how=how)
    ggml = _ggml_dequantize(tools, path, tmp_path / "out")
    assert {name: info[4] for name, (info, _) in ggml.items()} == {
        f"{t.name.lower()}.weight": "0" if t.name == bad_type else "1" for t in gguf_types.ATD_TYPES}
    # and atd-gguf inspect refuses the file with one line naming the tensor
    assert_one_line_error(run_cli("inspect", path), f"{bad_type.lower()}.weight")


def _v1_gguf(path: Path) -> None:
    """A format-1 ATD file as atd-gguf 0.1 wrote it: ids 200..207, 2-bit trits, atd.format_version 1."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("atd.format_version", 1)
    rng = np.random.default_rng(1)
    tensors = []
    for i, (n, b) in enumerate([(3, 256), (3, 64)]):
        nb = 4
        codes = rng.integers(0, 3, (nb, n, b // 4, 4)).astype(np.uint8)
        qs = (codes[..., 0] | codes[..., 1] << 2 | codes[..., 2] << 4 | codes[..., 3] << 6).reshape(nb, -1)
        d = np.full((nb, n), 0.01, "<f2").view(np.uint8)
        tensors.append(np.concatenate([d, qs], axis=1).reshape(2, -1))
        # gguf-py knows no size for ids 202/206 any more: declare the shape in elements and the bytes
        writer.add_tensor_info(f"blk.0.t{i}.weight", (2, 2 * b), np.dtype(np.float32), tensors[-1].nbytes,
                               raw_dtype=202 + 4 * i)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in tensors:
        writer.write_tensor_data(data)
    writer.close()


def test_format_1_files_are_refused_everywhere(tools, tmp_path):
    """ATD format 1 (ids 200..207) is refused by the patched llama.cpp and by atd-gguf, one line each."""
    path = tmp_path / "v1.gguf"
    _v1_gguf(path)
    proc = subprocess.run([str(tools("patched", "atd_logits")), str(path), str(tmp_path / "x"), THREADS, "1"],
                          capture_output=True, text=True)
    assert proc.returncode > 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"  # > 0: no signal
    assert "ATD format version 1" in proc.stderr and "atd-gguf convert" in proc.stderr, proc.stderr[-2000:]
    for command in (["inspect", path], ["export", "--stock", path, "-o", tmp_path / "out.gguf"],
                    ["modelfile", path, "-o", tmp_path / "Modelfile"]):
        result = run_cli(*command)
        assert_one_line_error(result, "ATD format version 1")
        assert "re-convert" in result.output
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "Modelfile").exists()


# ---- c. model: ATD3 in llama.cpp vs transformers on the dequantized weights ----------------------

def _hf_model_with_gguf_weights(model_dir: Path, gguf_path: Path):
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    tensors = _tensors(gguf_path)

    def weight(name: str) -> np.ndarray:
        t = tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
            [int(d) for d in reversed(t.shape)])

    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads

    def unpermute(w: np.ndarray, heads: int) -> np.ndarray:  # inverse of converter.llama.permute_qk
        out = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        assert np.array_equal(permute_qk(out, heads), w)
        return out

    hf_name = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
    state = {"model.embed_tokens.weight": weight("token_embd.weight")}
    if "output.weight" in tensors:
        state["lm_head.weight"] = weight("output.weight")
    for i in range(config.num_hidden_layers):
        for short, long in hf_name.items():
            w = weight(f"blk.{i}.{short}.weight")
            if short == "attn_q":
                w = unpermute(w, n_head)
            elif short == "attn_k":
                w = unpermute(w, n_kv)
            state[f"model.layers.{i}.{long}.weight"] = w
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in state.items():
            assert params[name].shape == value.shape, name
            params[name].copy_(torch.from_numpy(value))
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def _assert_logits_match(label: str, tokenizer, logits_pair) -> None:
    """logits_pair(i, tokens) -> (ours, reference) for PROMPTS[i]. Top-1 agrees wherever the reference's
    top-1 is clear, agreement >= 0.8 overall, and |dlogit| stays within MAX/MEAN_ABS_DLOGIT."""
    diffs, agree = [], []
    for i, prompt in enumerate(PROMPTS):
        tokens = tokenizer(prompt)["input_ids"]
        ours, ref = logits_pair(i, tokens)
        top2 = np.sort(ref, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > CLEAR_MARGIN
        assert clear[-1], f"{prompt!r}: pick a prompt whose next token is clear"
        np.testing.assert_array_equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear], err_msg=prompt)
        agree.append(ours.argmax(-1) == ref.argmax(-1))
        diffs.append(np.abs(ours - ref).reshape(-1))
    d = np.concatenate(diffs)
    print(f"{label}: max |dlogit| {d.max():.4f}, mean {d.mean():.4f}, "
          f"top-1 agreement {np.concatenate(agree).mean():.3f}")
    assert np.concatenate(agree).mean() >= 0.8
    assert d.max() < MAX_ABS_DLOGIT and d.mean() < MEAN_ABS_DLOGIT


def test_atd3_logits_match_transformers(tools, smollm2_dir, smollm2_atd3_gguf, tokenizer, tmp_path):
    import torch

    model = _hf_model_with_gguf_weights(smollm2_dir, smollm2_atd3_gguf)
    n_vocab = len(tokenizer)

    def pair(i: int, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        ours = _logits(tools("patched", "atd_logits"), smollm2_atd3_gguf, tokens, tmp_path / f"{i}.f32", n_vocab)
        with torch.no_grad():
            return ours, model(torch.tensor([tokens])).logits[0, :, :n_vocab].numpy()

    _assert_logits_match("ATD3 llama.cpp vs transformers", tokenizer, pair)


# ---- d. Python-free quantization: llama-quantize F32 -> ATD3 == atd-gguf convert --planes 3 -------

def test_llama_quantize_matches_converter(smollm2_f32_gguf, smollm2_atd3_gguf, tmp_path):
    out = tmp_path / "smollm2-atd3-llama-quantize.gguf"
    proc = subprocess.run([str(_bin("llama-quantize")), str(smollm2_f32_gguf), str(out), "ATD3", THREADS],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ours, ref = _tensors(out), _tensors(smollm2_atd3_gguf)
    assert set(ours) == set(ref)
    n_linear = 0
    for name, t in ref.items():
        assert ours[name].tensor_type == t.tensor_type, name  # same type policy, embeddings included
        if name.split(".")[-2] in LINEAR:
            assert bytes(ours[name].data) == bytes(t.data), name
            n_linear += 1
    assert n_linear == 7 * 30
    reader = gguf.GGUFReader(out)
    assert reader.get_field("general.file_type").contents() == 1002  # LLAMA_FTYPE_MOSTLY_ATD3
    assert reader.get_field("atd.format_version").contents() == gguf_types.ATD_FORMAT_VERSION


# ---- f. `atd-gguf export --stock`: stock llama.cpp loads the export, its logits match --------------

# Measured on SmolLM2-135M ATD3, PROMPTS, every position: the export in stock llama.cpp vs the ATD
# file in the patched one: Q8_0 max |dlogit| 2.32, mean 0.32, top-1 0.87; F16 max 2.48, mean 0.29,
# top-1 0.90 (the patched runtime's q8_K/q8_0 activations, as in c.). The F16 export vs transformers
# on the ATD weights: max 0.43, mean 0.055 (fp16 activations in the F16 matmuls, q8_0 in the Q8_0
# output layer); a wrong plane or scale gives mean errors of several units.
F16_EXPORT_MEAN_ABS_DLOGIT = 0.1


@pytest.fixture(scope="session")
def smollm2_atd3_exports(smollm2_atd3_gguf, plugin_dir):
    out = {}
    for export_type in ("q8_0", "f16"):
        path = plugin_dir / f"smollm2-atd3-{export_type}.gguf"
        result = run_cli("export", "--stock", smollm2_atd3_gguf, "-o", path, "--type", export_type, "--no-progress")
        assert result.exit_code == 0, result.output
        out[export_type] = path
    return out


@pytest.mark.parametrize("export_type", ["q8_0", "f16"])
def test_stock_export_matches_patched(tools, smollm2_atd3_gguf, smollm2_atd3_exports, tokenizer, tmp_path,
                                      export_type):
    export = smollm2_atd3_exports[export_type]
    assert {int(t.tensor_type) for t in _tensors(export).values()} <= {int(gguf.GGMLQuantizationType.F32),
                                                                        int(gguf.GGMLQuantizationType.F16),
                                                                        int(gguf.GGMLQuantizationType.Q8_0)}
    n_vocab = len(tokenizer)

    def pair(i: int, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return (_logits(tools("stock", "atd_logits"), export, tokens, tmp_path / f"s{i}.f32", n_vocab),
                _logits(tools("patched", "atd_logits"), smollm2_atd3_gguf, tokens, tmp_path / f"a{i}.f32", n_vocab))

    _assert_logits_match(f"{export_type} export (stock) vs ATD3 (patched)", tokenizer, pair)


def test_f16_export_carries_the_atd_weights(tools, smollm2_dir, smollm2_atd3_gguf, smollm2_atd3_exports,
                                            tokenizer, tmp_path):
    """Stock llama.cpp on the F16 export == transformers on the ATD file's dequantized weights."""
    import torch

    model = _hf_model_with_gguf_weights(smollm2_dir, smollm2_atd3_gguf)
    n_vocab = len(tokenizer)
    diffs = []
    for i, prompt in enumerate(PROMPTS):
        tokens = tokenizer(prompt)["input_ids"]
        stock = _logits(tools("stock", "atd_logits"), smollm2_atd3_exports["f16"], tokens, tmp_path / f"{i}.f32",
                        n_vocab)
        with torch.no_grad():
            ref = model(torch.tensor([tokens])).logits[0, :, :n_vocab].numpy()
        np.testing.assert_array_equal(stock.argmax(-1)[-1], ref.argmax(-1)[-1], err_msg=prompt)
        diffs.append(np.abs(stock - ref).reshape(-1))
    d = np.concatenate(diffs)
    print(f"F16 export (stock) vs transformers: max |dlogit| {d.max():.4f}, mean {d.mean():.4f}")
    assert d.mean() < F16_EXPORT_MEAN_ABS_DLOGIT


def test_stock_loads_llama3_export(tools, llama3_dir, plugin_dir, tmp_path):
    """The Llama-3 layout (untied output, GQA, rope_freqs, 128k vocab) too: logits of the ATD2 file
    (patched) and of its Q8_0 export (stock) agree."""
    atd = _convert(llama3_dir, plugin_dir / "llama3-atd2.gguf", "--planes", "2")
    export = plugin_dir / "llama3-atd2-q8_0.gguf"
    result = run_cli("export", "--stock", atd, "-o", export, "--no-progress")
    assert result.exit_code == 0, result.output
    tokens = [128000, 791, 6864, 315, 9822, 374]  # <|begin_of_text|>The capital of France is
    n_vocab = 128256
    stock = _logits(tools("stock", "atd_logits"), export, tokens, tmp_path / "s.f32", n_vocab)
    patched = _logits(tools("patched", "atd_logits"), atd, tokens, tmp_path / "p.f32", n_vocab)
    assert np.isfinite(stock).all()
    spread = patched.std()
    rel = np.abs(stock - patched).mean() / spread
    print(f"llama3-tiny ATD2: mean |dlogit| / logit std {rel:.4f}")
    assert rel < 0.1


def test_llama_quantize_imatrix_matches_converter(smollm2_dir, smollm2_f32_gguf, smollm2_atd3_gguf, tmp_path):
    """A real llama-imatrix file weights the fit the same way in llama-quantize and in convert --imatrix."""
    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))),
                    encoding="utf-8")
    imatrix = tmp_path / "imatrix.gguf"
    proc = subprocess.run([str(_bin("llama-imatrix")), "-m", str(smollm2_f32_gguf), "-f", str(text), "-o",
                           str(imatrix), "-c", "128", "--chunks", "4", "-t", THREADS],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and imatrix.is_file(), proc.stderr[-2000:]
    quantized = tmp_path / "llama-quantize.gguf"
    proc = subprocess.run([str(_bin("llama-quantize")), "--imatrix", str(imatrix), str(smollm2_f32_gguf),
                           str(quantized), "ATD3", THREADS], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    converted = _convert(smollm2_dir, tmp_path / "convert.gguf", "--planes", "3", "--imatrix", str(imatrix))
    ours, ref, plain = _tensors(quantized), _tensors(converted), _tensors(smollm2_atd3_gguf)
    linear = [name for name in ref if name.split(".")[-2] in LINEAR]
    assert len(linear) == 7 * 30
    for name in linear:
        assert bytes(ours[name].data) == bytes(ref[name].data), name
    # the imatrix changed the fit (else this test would only repeat the one above)
    assert sum(bytes(ref[n].data) != bytes(plain[n].data) for n in linear) > 0.9 * len(linear)


# ---- e. bad input ------------------------------------------------------------------------------

def test_stock_rejects_atd(tools, smollm2_atd3_gguf, tmp_path):
    proc = subprocess.run([str(tools("stock", "atd_logits")), str(smollm2_atd3_gguf), str(tmp_path / "x"), THREADS, "1"],
                          capture_output=True, text=True)
    assert proc.returncode > 0
    assert "invalid ggml type 100" in proc.stderr  # "tensor 'blk.0.attn_q.weight' has invalid ggml type 1006"


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_atd_file_fails_cleanly(tools, smollm2_atd3_gguf, tmp_path, keep):
    bad = tmp_path / "truncated.gguf"
    data = smollm2_atd3_gguf.read_bytes()
    bad.write_bytes(data[: int(len(data) * keep)])
    proc = subprocess.run([str(tools("patched", "atd_logits")), str(bad), str(tmp_path / "x"), THREADS, "1"],
                          capture_output=True, text=True)
    assert proc.returncode > 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"  # > 0: no signal
    assert "failed to load" in proc.stderr
    proc = subprocess.run([str(_bin("llama-completion")), "-m", str(bad), "-p", "hi", "-n", "1", "-no-cnv"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode > 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"


def test_run_missing_model_is_one_line(tmp_path):
    assert_one_line_error(run_cli("run", tmp_path / "nope.gguf", "-p", "hi"), "nope.gguf")


def test_run_without_build_is_one_line(tmp_path, smollm2_f16_gguf, monkeypatch):
    monkeypatch.setenv("ATD_LLAMA_BIN_DIR", str(tmp_path))
    assert_one_line_error(run_cli("run", smollm2_f16_gguf, "-p", "hi"), "make llama")


# ---- atd-gguf run ------------------------------------------------------------------------------

def test_run_answers_a_question(smollm2_atd3_gguf):
    _bin("llama-completion")
    # (ATD3 of this Q4_1-derived SmolLM2 says "London" for France, in transformers too)
    result = run_cli("run", smollm2_atd3_gguf, "-p", "What is the capital of Germany?", "-n", "24", "--chat")
    assert result.exit_code == 0, result.output
    assert "Berlin" in result.stdout, result.stdout


def test_run_plain_completion(smollm2_atd3_gguf):
    _bin("llama-completion")
    result = run_cli("run", smollm2_atd3_gguf, "-p", "The capital of France is", "-n", "8")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip(), result.output


# ---- g. the batched ATD kernels inside ggml (ggml-ext/atd-mm.c via the mul_mat hook) ------------------------

MM_ROWS = 37  # not a multiple of the 32-, 16- and 8-row tiles


def _mm_gguf(path: Path) -> None:
    """Every ATD type, 37 rows of 1536 (256-blocks) or 576 (64-blocks, as SmolLM2) weights, fitted."""
    rng = np.random.default_rng(11)
    writer = gguf.GGUFWriter(path, "llama")
    for t in gguf_types.ATD_TYPES:
        cols = 1536 if t.block_size == 256 else 576
        w = rng.standard_normal((MM_ROWS, cols)).astype(np.float32) * 0.02
        writer.add_tensor(f"{t.name.lower()}.weight", gguf_types.quantize(w, t), raw_dtype=gguf_types.gguf_qtype(t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _run_mm(tools, model: Path, name: str, ncols: int, prefix: Path, batched: bool = True):
    import os

    env = dict(os.environ)
    if batched:
        env.pop("ATD_BATCHED_MM", None)
    else:
        env["ATD_BATCHED_MM"] = "0"
    proc = subprocess.run([str(tools("patched", "atd_mm")), str(model), name, str(ncols), THREADS, str(prefix)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = int(proc.stdout.split()[1])
    x = np.fromfile(f"{prefix}.x.f32", dtype=np.float32).reshape(ncols, -1)
    y = np.fromfile(f"{prefix}.y.f32", dtype=np.float32).reshape(ncols, -1)
    return calls, x, y


def test_batched_matmul_in_ggml(tools, tmp_path):
    """A ggml mul_mat of each ATD type by 7 activation rows takes the batched kernels (counted), and stays
    within their stated bound of the one-row vec_dot path (ATD_BATCHED_MM=0): per weight row and activation
    row, sum_b (A_b / 254) sum_e |x_e| with A_b = sum_i |alpha_i| (docs/llama-plugin.md). One activation
    row never takes them; for the 64 family it goes to atd_gemv, bit-equal to vec_dot."""
    model = tmp_path / "mm.gguf"
    _mm_gguf(model)
    tensors = _tensors(model)
    for t in gguf_types.ATD_TYPES:
        name = f"{t.name.lower()}.weight"
        calls, x, y = _run_mm(tools, model, name, 7, tmp_path / "b")
        calls0, x0, y0 = _run_mm(tools, model, name, 7, tmp_path / "v", batched=False)
        assert calls >= 1 and calls0 == 0, (name, calls, calls0)
        assert np.array_equal(x, x0)

        data = np.asarray(tensors[name].data).reshape(MM_ROWS, -1)
        nb = data.shape[1] // t.type_size
        alpha = np.abs(data.reshape(MM_ROWS, nb, t.type_size)[:, :, : 2 * t.planes].copy().view("<f2")
                       .astype(np.float64)).sum(-1)                                     # (rows, nb)
        xb = np.abs(x.astype(np.float64)).reshape(7, nb, t.block_size)
        # the int8 activations differ from x by at most half a step: max|x| / 254 per group
        absq = xb.sum(-1) + t.block_size * xb.max(-1) / 254.0                           # (7, nb)
        bound = (alpha / 254.0) @ absq.T                                                # (rows, 7)
        wdq = gguf_types.dequantize(data, t).astype(np.float64)
        mag = np.abs(wdq) @ np.abs(x.astype(np.float64)).T
        err = np.abs(y.T.astype(np.float64) - y0.T)
        assert (err <= bound * 1.001 + 1e-6 * mag).all(), (name, float((err / bound).max()))
        assert err.max() > 0, name  # the batched result is its own computation, not vec_dot's
        # both paths near the float product (activation quantization: about 1 % of sum |w x|)
        ref = wdq @ x.astype(np.float64).T
        assert (np.abs(y0.T - ref) <= 0.02 * mag + 1e-6).all(), name
        assert (np.abs(y.T - ref) <= 0.02 * mag + bound * 1.001 + 1e-6).all(), name

        calls1, _, y1 = _run_mm(tools, model, name, 1, tmp_path / "g")
        calls1b, _, y1b = _run_mm(tools, model, name, 1, tmp_path / "h", batched=False)
        assert calls1 == 0 and calls1b == 0, name
        np.testing.assert_array_equal(y1.view(np.uint32), y1b.view(np.uint32), err_msg=name)


def test_r2_repack_gives_the_same_logits(tools, smollm2_atd3_gguf, tokenizer, tmp_path):
    """llama.cpp puts the ATD weights in the CPU_ATD_R2 buffer (ggml-ext/atd-repack.cpp) and repacks them as
    they load, at 66/54 (256 family) and 18/15 (64 family) of their bytes. The batched r2 kernels give the
    file layout's bits, so a batch's logits equal those with ATD_REPACK=0. For one token (gemv) the 256
    family gives vec_dot's bits too, but the 64 family's r2 gemv takes other activations (atd.h: scale
    groups of 16 instead of 20), so those logits differ (its kernel ran); against the logits of the same
    weights exported as F16 (llama.cpp's F16 path: no int8 activations) they are about as close as the file
    layout's."""
    import os
    import re

    from converter.export import export_stock

    r2_bytes = 0
    for t in _tensors(smollm2_atd3_gguf).values():
        if gguf_types.is_atd_type_id(int(t.tensor_type)):
            at = gguf_types.atd_type(int(t.tensor_type))
            r2_bytes += int(np.prod(t.shape)) // at.block_size * at.planes * (2 + at.block_size // 4)
    assert r2_bytes > 0
    f16 = export_stock(smollm2_atd3_gguf, tmp_path / "f16.gguf", "f16", progress=False).path
    tokens = tokenizer(PROMPTS[0])["input_ids"]
    errs = []
    for toks in [tokens] + [[t] for t in tokens[:6]]:
        runs = {}
        for repack in ("1", "0"):
            out = tmp_path / f"r2-{repack}-{len(toks)}.f32"
            proc = subprocess.run([str(tools("patched", "atd_logits")), str(smollm2_atd3_gguf), str(out), THREADS,
                                   *map(str, toks)], capture_output=True, text=True,
                                  env=dict(os.environ, ATD_REPACK=repack))
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[repack] = (np.fromfile(out, dtype=np.float32), proc.stderr)
        size = re.search(r"CPU_ATD_R2 model buffer size = +([0-9.]+) MiB", runs["1"][1])
        assert size is not None, runs["1"][1][-3000:]
        assert abs(float(size.group(1)) - r2_bytes / 2**20) < 0.01, (size.group(1), r2_bytes / 2**20)
        assert "CPU_ATD_R2" not in runs["0"][1]
        r2, file = runs["1"][0], runs["0"][0]
        if len(toks) > 1:
            np.testing.assert_array_equal(r2.view(np.uint32), file.view(np.uint32))
            continue
        assert not np.array_equal(r2, file)
        ref = _logits(tools("patched", "atd_logits"), f16, toks, tmp_path / "f16.f32", r2.size).reshape(-1)
        errs.append([float(np.sqrt(np.mean((x - ref) ** 2))) for x in (r2, file)])
    err_r2, err_file = np.mean(errs, axis=0)
    print(f"one token ({len(errs)} tokens), mean rms logit error against F16: r2 {err_r2:.4f}, file layout {err_file:.4f}")
    assert err_r2 <= 1.5 * err_file, errs


def test_patched_ggml_has_the_decoders_this_cpu_has():
    """The patched ggml-cpu is built from /proc/cpuinfo (scripts/build_llama.py): with AVX-512 VNNI + VBMI
    it has the table decoder, and with GFNI too (-DATD_GGML_GFNI=ON: ggml has no GFNI option) the GFNI
    one, the fastest (variant 3); a CPU without them gets neither compiled in."""
    lib = _build("patched") / "build" / "bin" / "libggml-cpu.so"
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not installed")
    flags = _cpu_flags()
    symbols = subprocess.run([nm, str(lib)], capture_output=True, text=True, check=True).stdout
    if "atd_vec_dot_avx512_mul" not in symbols and "avx512_vnni" in flags:
        pytest.skip("libggml-cpu.so has no symbol table (stripped)")
    avx512 = {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512_vnni"} <= flags
    assert ("atd_vec_dot_avx512_lut" in symbols) == (avx512 and "avx512vbmi" in flags)
    assert ("atd_vec_dot_avx512_gfni" in symbols) == (avx512 and {"avx512vbmi", "gfni"} <= flags)
    assert ("atd_gemv256_avx512_gfni" in symbols) == (avx512 and {"avx512vbmi", "gfni"} <= flags)
