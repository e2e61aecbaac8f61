"""`atd-gguf convert --target-size / --bpw / --calibration`: the size plan and the GPTQ fit through the CLI.

Sizes are checked against the file on disk and the types against independent size formulas
(gguf-py's GGML_QUANT_SIZES); the plan's metadata against `inspect`.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

import gguf_types
from test_convert import assert_no_output, assert_one_line_error, run_cli

# an English text long enough for a few calibration chunks of 64 tokens (any text works: the fit only
# needs activations)
CALIBRATION_TEXT = " ".join(
    f"Sentence number {i} says that the {w} river flows past {n} old mills before it reaches the sea."
    for i, (w, n) in enumerate(zip(["quiet", "wide", "cold", "green", "long", "slow"] * 20, range(120))))


def _tensor_bytes(path: Path) -> dict[str, tuple[str, int]]:
    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("which, targets", [("llama3", ["36MB", "40000000", "45.5MB"]),
                                            ("smollm2", ["84.1MiB", "100.6MiB"])])
def test_target_size_is_respected(which, targets, request, tmp_path):
    model = request.getfixturevalue(f"{which}_dir")
    sizes = []
    for target in targets:
        out = tmp_path / f"{target}.gguf"
        result = run_cli("convert", model, "-o", out, "--target-size", target, "--no-progress")
        assert result.exit_code == 0, result.output
        limit = {"MB": 10**6, "MiB": 2**20}
        unit = next((u for u in ("MiB", "MB") if target.endswith(u)), "")
        budget = int(float(target[: len(target) - len(unit)]) * limit.get(unit, 1))
        size = out.stat().st_size
        assert size <= budget, (target, size, budget)
        sizes.append(size)
        info = json.loads(run_cli("inspect", out, "--json").stdout)
        plan = info["plan"]
        assert plan["file_bytes"] == size and plan["budget_bytes"] == budget
        assert plan["tensor_bytes"] == info["n_bytes"] == sum(b for _, b in _tensor_bytes(out).values())
        # every ATD matrix has 1..4 planes of its row length's family; the file says it is a mix or uniform
        planes = set()
        for name, (qtype, nbytes) in _tensor_bytes(out).items():
            if qtype.startswith("ATD") and name.startswith("blk."):
                t = gguf_types.atd_type(qtype)
                planes.add(t.planes)
        file_type = info["metadata"]["general.file_type"]
        assert file_type == (999 + planes.pop() if len(planes) == 1 else 1004)
        assert "ATD plan" in run_cli("inspect", out, "--summary").stdout
    # a larger budget never buys a smaller file
    assert sizes == sorted(sizes)


def test_bpw_is_respected(llama3_dir, tmp_path):
    out = tmp_path / "bpw.gguf"
    result = run_cli("convert", llama3_dir, "-o", out, "--bpw", "4.5", "--no-progress")
    assert result.exit_code == 0, result.output
    tensors = gguf.GGUFReader(out).tensors
    bpw = 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)
    assert 4.0 < bpw <= 4.5


@pytest.mark.parametrize("args, fragment", [
    (["--target-size", "lots"], "invalid size 'lots'"),
    (["--target-size", "-5MB"], "invalid size"),
    (["--target-size", "0"], "at least 1 byte"),
    (["--target-size", "12 parsecs"], "invalid size"),
    (["--target-size", "1MB"], "below the smallest possible file"),
    (["--bpw", "0.5"], "below the smallest possible"),
    (["--bpw", "-1"], "positive"),
    (["--target-size", "40MB", "--planes", "2"], "exactly one of --planes, --target-size and --bpw"),
    (["--target-size", "40MB", "--outtype", "f16"], "exclude"),
    (["--calibration", "nope.txt"], "--calibration needs --planes"),
    (["--planes", "2", "--calibration", "nope.txt"], "no such calibration text file"),
    (["--target-size", "40MB", "--sensitivity", "fisher"], "--sensitivity fisher needs --calibration"),
])
def test_bad_budget_and_calibration_input(llama3_dir, tmp_path, args, fragment):
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", llama3_dir, "-o", out, *args), fragment)
    assert_no_output(out)


@pytest.mark.parametrize("text, fragment", [("", "empty"), ("too short", "tokens")])
def test_unusable_calibration_text(llama3_dir, tmp_path, text, fragment):
    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("convert", llama3_dir, "-o", out, "--planes", "2", "--calibration", calib),
                          fragment)
    assert_no_output(out)


def test_calibrated_conversion(llama3_dir, tmp_path):
    """--calibration: GPTQ-fitted ATD matrices, valid and deterministic, recorded in the metadata; with
    --target-size the calibration's statistics drive the plan."""
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIBRATION_TEXT)
    common = ["--calibration", calib, "--calibration-ctx", "64", "--calibration-chunks", "4", "--no-progress"]
    a, b, plain = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "plain.gguf"
    for out in (a, b):
        result = run_cli("convert", llama3_dir, "-o", out, "--planes", "2", *common)
        assert result.exit_code == 0, result.output
    assert a.read_bytes() == b.read_bytes()
    assert run_cli("convert", llama3_dir, "-o", plain, "--planes", "2", "--no-progress").exit_code == 0
    ours, ref = gguf.GGUFReader(a), _tensor_bytes(plain)
    assert ours.get_field("atd.method").contents() == "gptq"
    assert ours.get_field("atd.calibration").contents() == "calib.txt"
    changed = 0
    for t in ours.tensors:
        assert (t.tensor_type.name, int(t.n_bytes)) == ref[t.name]  # same types and sizes as --planes 2
        if gguf_types.is_atd_type_id(t.tensor_type):
            assert gguf_types.validate_blocks(np.asarray(t.data), int(t.tensor_type)) is None
            changed += bytes(t.data) != bytes(gguf.GGUFReader(plain).get_tensor(
                [x.name for x in gguf.GGUFReader(plain).tensors].index(t.name)).data)
    assert changed == 14  # every matrix refitted by GPTQ
    sized = tmp_path / "sized.gguf"
    result = run_cli("convert", llama3_dir, "-o", sized, "--target-size", "40MB", *common)
    assert result.exit_code == 0, result.output
    assert sized.stat().st_size <= 40_000_000
    assert json.loads(run_cli("inspect", sized, "--json").stdout)["plan"]["budget_bytes"] == 40_000_000
    assert gguf.GGUFReader(sized).get_field("atd.sensitivity").contents() == "table"  # the default
    fisher = tmp_path / "fisher.gguf"
    result = run_cli("convert", llama3_dir, "-o", fisher, "--target-size", "40MB", "--sensitivity", "fisher", *common)
    assert result.exit_code == 0, result.output
    assert fisher.stat().st_size <= 40_000_000
    assert gguf.GGUFReader(fisher).get_field("atd.sensitivity").contents() == "fisher"
