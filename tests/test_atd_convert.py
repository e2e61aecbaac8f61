"""`atd-gguf convert --planes N` output: types, sizes, gguf-py readback, determinism, bad input."""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open

import gguf_types
from converter.cli import main
from converter.imatrix import write_legacy_imatrix
from converter.llama import permute_qk
from test_convert import assert_no_output, assert_one_line_error, run_cli

LINEAR = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


@pytest.fixture(scope="session")
def smollm2_atd3(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("atd") / "smollm2-atd3.gguf"
    result = CliRunner().invoke(main, ["convert", str(smollm2_dir), "-o", str(out), "--planes", "3",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def llama3_atd3(llama3_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("atd") / "llama3-atd3.gguf"
    assert run_cli("convert", llama3_dir, "-o", out, "--planes", "3", "--no-progress").exit_code == 0
    return out


def hf_tensor(model_dir, name: str) -> np.ndarray:
    index = model_dir / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(model_dir / shard, framework="pt") as f:  # torch reads bf16 independently of us
        return f.get_tensor(name).float().numpy()


def expected_type(name: str, shape: list[int], planes: int) -> str:
    cols = shape[0]  # gguf-py lists ggml order: ne0 (row length) first
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return "F32"
    if LINEAR.match(name):
        if cols % 256 == 0:
            return f"ATD{planes}"
        return f"ATD{planes}_64" if cols % 64 == 0 else "Q8_0"
    return "Q8_0"


@pytest.mark.parametrize("which", ["smollm2", "llama3"])
def test_inspect_describes_atd_file(which, request):
    path = request.getfixturevalue(f"{which}_atd3")
    result = run_cli("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    reader = gguf.GGUFReader(path)
    assert [t["name"] for t in info["tensors"]] == [t.name for t in reader.tensors]
    n_atd = 0
    for t in info["tensors"]:
        assert t["type"] == expected_type(t["name"], t["shape"], 3), t
        if t["type"].startswith("ATD"):
            n_atd += 1
            # format 2: N fp16 scales + N planes of ceil(B / 5) base-3 bytes
            block, per_block = (256, (2 + 52) * 3) if t["type"] == "ATD3" else (64, (2 + 13) * 3)
            rows = int(np.prod(t["shape"][1:]))
            assert t["n_bytes"] == rows * t["shape"][0] // block * per_block
            assert t["bpw"] == pytest.approx(8 * per_block / block)
    assert n_atd == 7 * reader.fields["llama.block_count"].contents()
    assert info["n_bytes"] == sum(t["n_bytes"] for t in info["tensors"])
    data_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    assert info["n_bytes"] == data_bytes <= info["file_size"]
    assert info["metadata"]["atd.planes"] == 3 and info["metadata"]["atd.method"] == "grid"
    assert info["metadata"]["general.file_type"] == 1002  # 1000 + N - 1, like the type ids
    assert info["metadata"]["atd.format_version"] == 2
    table = run_cli("inspect", path, "--summary").stdout
    assert "ATD3" in table and "total" in table


def test_gguf_readback_dequantizes_to_reference(smollm2_dir, smollm2_atd3, monkeypatch):
    # the converter fits in C; the reference values come from the numpy reference fit
    monkeypatch.setenv("ATD_NO_NATIVE", "1")
    assert not gguf_types.native_available()
    reader = gguf.GGUFReader(smollm2_atd3)
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, hf_name in [("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
                               ("blk.3.ffn_up.weight", "model.layers.3.mlp.up_proj.weight"),
                               ("blk.7.attn_v.weight", "model.layers.7.self_attn.v_proj.weight")]:
        t = tensors[gguf_name]
        source = hf_tensor(smollm2_dir, hf_name)
        atype = gguf_types.atd_type(int(t.tensor_type))
        reference = gguf_types.dequantize(gguf_types.quantize(source, atype), atype)
        ours = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert ours.shape == source.shape
        assert np.array_equal(ours, reference)
        rel = np.linalg.norm(ours - source) / np.linalg.norm(source)
        assert rel < 0.1, (gguf_name, rel)


def test_deterministic(llama3_dir, llama3_atd3, tmp_path):
    again = tmp_path / "again.gguf"
    assert run_cli("convert", llama3_dir, "-o", again, "--planes", "3", "--no-progress").exit_code == 0
    assert again.read_bytes() == llama3_atd3.read_bytes()


def test_more_planes_fit_better(llama3_dir, tmp_path):
    """Format 2 on a Llama-shaped Gaussian model (llama3-tiny: N(0, 0.02) weights, rows of 256 and 768):
    the linear weights take <= 3.4 bpw with 2 planes and <= 5.1 with 3, at the fit's Gaussian errors
    (relative RMSE <= 0.173 and <= 0.065, docs/bench-fit.md), and every ATD type id is >= 400."""
    hf_names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
    config = json.loads((llama3_dir / "config.json").read_text())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    errors, bpw = {}, {}
    for planes in (1, 2, 3, 4):
        out = tmp_path / f"p{planes}.gguf"
        assert run_cli("convert", llama3_dir, "-o", out, "--planes", planes, "--embed-type", "f16",
                       "--no-progress").exit_code == 0
        err2 = ref2 = 0.0
        nbytes = nparams = 0
        for t in gguf.GGUFReader(out).tensors:
            if not LINEAR.match(t.name):
                continue
            assert t.tensor_type.name == f"ATD{planes}" and int(t.tensor_type) >= 400
            layer, kind = t.name.split(".")[1:3]
            source = hf_tensor(llama3_dir, f"model.layers.{layer}.{hf_names[kind]}.weight")
            if kind in ("attn_q", "attn_k"):  # llama.cpp's rope row order
                source = permute_qk(source, heads[kind])
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            err2 += float(np.square(values - source, dtype=np.float64).sum())
            ref2 += float(np.square(source, dtype=np.float64).sum())
            nbytes += int(t.n_bytes)
            nparams += int(t.n_elements)
        errors[planes] = (err2 / ref2) ** 0.5
        bpw[planes] = 8 * nbytes / nparams
    assert [errors[n] for n in (1, 2, 3, 4)] == sorted(errors.values(), reverse=True), errors
    assert bpw[2] <= 3.4 and bpw[3] <= 5.1, bpw
    assert errors[2] <= 0.173 and errors[3] <= 0.065, errors


def test_imatrix_weights_the_fit(llama3_dir, tmp_path):
    rng = np.random.default_rng(1)
    names = [f"blk.{b}.{k}.weight" for b in range(2)
             for k in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")]
    entries = {n: rng.gamma(0.5, size=256).astype(np.float32) for n in names}
    entries.update({f"blk.{b}.attn_output.weight": np.ones(256, np.float32) for b in range(2)})
    entries.update({f"blk.{b}.ffn_down.weight": np.ones(768, np.float32) for b in range(2)})
    imatrix = tmp_path / "imatrix.dat"
    write_legacy_imatrix(imatrix, entries)
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    common = ("--planes", "2", "--embed-type", "f16", "--no-progress")
    assert run_cli("convert", llama3_dir, "-o", plain, *common).exit_code == 0
    result = run_cli("convert", llama3_dir, "-o", weighted, *common, "--imatrix", imatrix)
    assert result.exit_code == 0, result.output
    source = hf_tensor(llama3_dir, "model.layers.0.mlp.gate_proj.weight")
    h = entries["blk.0.ffn_gate.weight"]
    errs = {}
    for label, path in (("plain", plain), ("weighted", weighted)):
        r = gguf.GGUFReader(path)
        t = next(t for t in r.tensors if t.name == "blk.0.ffn_gate.weight")
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        errs[label] = float(np.sum(h * (values - source) ** 2))
        if label == "weighted":
            assert r.fields["atd.imatrix"].contents() == "imatrix.dat"
    assert errs["weighted"] < 0.97 * errs["plain"], errs


@pytest.mark.parametrize("planes", ["0", "5"])
def test_planes_out_of_range(llama3_dir, tmp_path, planes):
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", llama3_dir, "-o", out, "--planes", planes), "--planes must be 1..4")
    assert_no_output(out)


def test_outtype_and_planes_exclude_each_other(llama3_dir, tmp_path):
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", llama3_dir, "-o", out, "--planes", "2", "--outtype", "f16"),
                          "exclude")
    assert_no_output(out)


def test_nan_weights_rejected_for_atd(llama3_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in llama3_dir.iterdir():
        if f.is_file():
            (model / f.name).write_bytes(f.read_bytes())
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.q_proj.weight"
    from gguf.utility import SafetensorsLocal
    with SafetensorsLocal(model / index[name]) as tensors:
        rng = tensors[name].data_range
    with open(model / index[name], "r+b") as f:  # a bf16 +Inf (0x7f80)
        f.seek(rng.offset + 64)
        f.write(b"\x80\x7f")
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", model, "-o", out, "--planes", "2"), "NaN or Inf", "blk.0.attn_q")
    assert_no_output(out)


def _unusable_imatrices(tmp_path):
    garbage = tmp_path / "garbage.dat"
    garbage.write_bytes(b"\x07\x00\x00\x00not an imatrix at all")
    wrong_len = tmp_path / "wrong_len.dat"
    write_legacy_imatrix(wrong_len, {"blk.0.attn_q.weight": np.ones(100, np.float32)})
    other_model = tmp_path / "other.dat"
    write_legacy_imatrix(other_model, {"blk.99.attn_q.weight": np.ones(256, np.float32)})
    negative = tmp_path / "negative.dat"
    write_legacy_imatrix(negative, {"blk.0.attn_q.weight": -np.ones(256, np.float32)})
    return {"missing": (tmp_path / "nope.dat", "no such imatrix"), "garbage": (garbage, "unusable imatrix"),
            "wrong_len": (wrong_len, "100 values"), "other_model": (other_model, "no entry matches"),
            "negative": (negative, "negative")}


@pytest.mark.parametrize("case", ["missing", "garbage", "wrong_len", "other_model", "negative"])
def test_unusable_imatrix(llama3_dir, tmp_path, case):
    path, fragment = _unusable_imatrices(tmp_path)[case]
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", llama3_dir, "-o", out, "--planes", "2", "--imatrix", path), fragment)
    assert_no_output(out)
