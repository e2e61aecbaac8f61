#!/usr/bin/env python3
"""KL divergence and perplexity of ATD N=1..3 vs F16, next to llama.cpp's stock quantizations.

All models come from one checkpoint (default: the `smollm2-135m-continuous` fixture, SmolLM2-135M-Instruct
with its Q4_1 weights moved off the Q4_1 grid; `--model build/fixtures/smollm2-135m-instruct` scores the
grid-aligned original, whose rows flag the stock types that hold its values exactly):

* F16 and ATD{N} via `atd-gguf convert`;
* the stock types via the patched `llama-quantize` from the F16 file.

Each model is scored with `llama-perplexity --kl-divergence` against the F16 logits, on English
text from the Debian package `fortunes` (literature, wisdom, people, science…), which is
installed with apt-get if it is missing. The results go to docs/bench-quality.md (other models:
docs/bench-quality-<model>.md).

Needs `make llama`. Example:  .venv/bin/python scripts/bench_quality.py --chunks 20
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "build" / "llama.cpp-patched" / "build" / "bin"
OUT = ROOT / "build" / "bench"
FIXTURE = ROOT / "build" / "fixtures" / "smollm2-135m-continuous"
FORTUNES = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ["literature", "wisdom", "people", "science", "politics", "work", "art", "education", "law"]
# llama-imatrix calibration text: other fortune files, disjoint from the evaluation text
CALIBRATION_FILES = ["songs-poems", "humorists", "miscellaneous", "platitudes"]
CALIBRATION_CHUNKS = 40
# quantized a second time with the same imatrix (ATD: convert --imatrix; stock: llama-quantize --imatrix)
IMATRIX_STOCK_TYPES = ["Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]
# the rungs: an ATD file no larger than each of these stock +imatrix files (convert --target-size)
RUNGS = ["Q4_K_M", "Q3_K_M", "Q2_K"]
ATD_PLANES = [1, 2, 3]
STOCK_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "TQ2_0"]
# Types whose grids hold Q4_1 values (nearly) exactly: biased in their favour on a model whose weights are Q4_1 values
GRID_ALIGNED = {"Q4_1", "Q5_0", "Q5_1", "Q8_0"}
# Relative RMSE of a Q4_1 round trip of the linear weights below which they count as lying on a Q4_1 grid
# (smollm2-135m-instruct: 0.0013, bf16 rounding only; smollm2-135m-continuous: 0.080; a Gaussian: 0.078)
ON_GRID_RMSE = 0.01
sys.path.insert(0, str(ROOT))

import gguf_types  # noqa: E402,F401  (registers the ATD types with gguf-py's reader)


def need(path: Path, what: str) -> Path:
    if not path.exists():
        raise SystemExit(f"bench_quality: {path} missing ({what}); run `make llama` first")
    return path


def fortunes(files: list[str]) -> list[str]:
    """The entries of these fortune files, in order."""
    if not FORTUNES.is_dir():
        if shutil.which("apt-get") and os.geteuid() == 0:
            subprocess.run("apt-get update -qq && apt-get install -y -qq fortunes", shell=True, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not FORTUNES.is_dir():
            raise SystemExit("bench_quality: needs the Debian package 'fortunes' (apt-get install fortunes)")
    text = []
    for file in files:
        for entry in (FORTUNES / file).read_text(errors="replace").split("\n%\n"):
            entry = entry.strip()
            if entry:
                text.append(entry)
    return text


def corpus(out: Path, files: list[str] = FORTUNE_FILES, name: str = "fortunes-en.txt",
           exclude: list[str] | None = None) -> Path:
    """The entries of ``files`` as one text file, minus any that also occur in the files ``exclude``."""
    def key(entry: str) -> str:
        return " ".join(entry.split())

    # some quotes are in several fortune files (fortunes 1.99.1: 17 in both evaluation and calibration files)
    skip = {key(e) for e in fortunes(exclude or [])}
    path = out / name
    path.write_text("\n\n".join(e for e in fortunes(files) if key(e) not in skip) + "\n")
    return path


def atd_gguf(*args: str) -> None:
    subprocess.run([str(ROOT / ".venv" / "bin" / "atd-gguf"), *args], check=True, stdout=subprocess.DEVNULL)


def calibration_text(out: Path) -> Path:
    """The calibration text (llama-imatrix, convert --calibration): fortune files disjoint from the evaluation text."""
    return corpus(out, CALIBRATION_FILES, "fortunes-calibration.txt", exclude=FORTUNE_FILES)


def make_imatrix(f16: Path, out: Path, threads: int) -> Path:
    """llama-imatrix of the F16 model over the calibration text (kept in build/bench)."""
    path = out / f"{f16.stem}.imatrix.gguf"
    if not path.exists():
        text = calibration_text(out)
        subprocess.run([str(need(BIN / "llama-imatrix", "patched llama-imatrix")), "-m", str(f16), "-f", str(text),
                        "-o", str(path), "-c", "512", "--chunks", str(CALIBRATION_CHUNKS), "-t", str(threads)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path


def models(model_dir: Path, out: Path, threads: int) -> dict[str, Path]:
    """name -> GGUF, converted once (kept in build/bench). "+imatrix" names used make_imatrix()."""
    name = model_dir.name
    result = {}
    f16 = out / f"{name}-F16.gguf"
    if not f16.exists():
        atd_gguf("convert", str(model_dir), "-o", str(f16), "--outtype", "f16", "--no-progress")
    result["F16"] = f16
    quantize = need(BIN / "llama-quantize", "patched llama-quantize")

    def atd(n: int, imatrix: Path | None) -> Path:
        path = out / f"{name}-ATD{n}{'-imatrix' if imatrix else ''}.gguf"
        if not path.exists():
            weighting = ["--imatrix", str(imatrix)] if imatrix else []
            atd_gguf("convert", str(model_dir), "-o", str(path), "--planes", str(n), *weighting, "--no-progress")
        return path

    def stock(qtype: str, imatrix: Path | None) -> Path:
        path = out / f"{name}-{qtype}{'-imatrix' if imatrix else ''}.gguf"
        if not path.exists():
            weighting = ["--imatrix", str(imatrix)] if imatrix else []
            subprocess.run([str(quantize), *weighting, str(f16), str(path), qtype, str(threads)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return path

    result.update({f"ATD{n}": atd(n, None) for n in ATD_PLANES})
    result.update({qtype: stock(qtype, None) for qtype in STOCK_TYPES})
    imatrix = make_imatrix(f16, out, threads)
    result.update({f"ATD{n} +imatrix": atd(n, imatrix) for n in ATD_PLANES})
    result.update({f"{qtype} +imatrix": stock(qtype, imatrix) for qtype in IMATRIX_STOCK_TYPES})

    def sized(rung: str, fit: list[str], tag: str) -> Path:
        """ATD planned to the size of the stock rung's +imatrix file."""
        size = result[f"{rung} +imatrix"].stat().st_size
        path = out / f"{name}-ATD@{rung}-{tag}.gguf"
        if not path.exists():
            atd_gguf("convert", str(model_dir), "-o", str(path), "--target-size", str(size), *fit, "--no-progress")
        return path

    calibration = calibration_text(out)
    for rung in RUNGS:
        result[f"ATD@{rung} +imatrix"] = sized(rung, ["--imatrix", str(imatrix)], "imatrix")
        result[f"ATD@{rung} +GPTQ"] = sized(rung, ["--calibration", str(calibration)], "gptq")
        # the plan's sensitivities measured on the calibration text instead of the table
        result[f"ATD@{rung} +GPTQ fisher"] = sized(
            rung, ["--calibration", str(calibration), "--sensitivity", "fisher"], "gptq-fisher")
    return result


LINEAR = re.compile(r"\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


def describe(path: Path) -> tuple[float, float, str]:
    """(bits per weight over all tensors, over the linear weights only, the linear weights' types)."""
    tensors = gguf.GGUFReader(path).tensors
    lin = [t for t in tensors if LINEAR.search(t.name)]

    def bpw(ts) -> float:
        return 8.0 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts)

    return bpw(tensors), bpw(lin), "+".join(sorted({t.tensor_type.name for t in lin}))


def q4_1_round_trip_rmse(weights) -> float:
    """Relative RMSE of a Q4_1 round trip (gguf-py) over float arrays whose rows are multiples of 32."""
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    err2 = ref2 = 0.0
    for w in weights:
        w = np.asarray(w, dtype=np.float32)
        e = gguf.quants.dequantize(gguf.quants.quantize(w, q4_1), q4_1).reshape(w.shape) - w
        err2 += float(np.square(e, dtype=np.float64).sum())
        ref2 += float(np.square(w, dtype=np.float64).sum())
    return (err2 / ref2) ** 0.5


def linear_weights(f16: Path):
    return (t.data for t in gguf.GGUFReader(f16).tensors if LINEAR.search(t.name))


def default_doc(model_dir: Path) -> Path:
    """docs/bench-quality.md for the default fixture, docs/bench-quality-<model>.md for any other."""
    suffix = "" if model_dir.resolve() == FIXTURE.resolve() else f"-{model_dir.resolve().name}"
    return ROOT / "docs" / f"bench-quality{suffix}.md"


def perplexity(args: list[str], log_path: Path, inputs: list[Path]) -> str:
    """llama-perplexity's output; kept in log_path and reused while it is newer than its inputs."""
    if log_path.exists() and all(log_path.stat().st_mtime > p.stat().st_mtime for p in inputs):
        return log_path.read_text()
    proc = subprocess.run([str(need(BIN / "llama-perplexity", "patched llama-perplexity")), *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-perplexity failed: {proc.stderr[-2000:]}")
    log_path.write_text(proc.stdout + proc.stderr)
    return proc.stdout + proc.stderr


def _value(log: str, label: str) -> float:
    m = re.search(rf"^{re.escape(label)}\s*:\s*(-?[\d.]+)", log, re.M)
    if not m:
        raise SystemExit(f"bench_quality: '{label}' not found in llama-perplexity output")
    return float(m.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "--model-dir", dest="model_dir", metavar="DIR", type=Path, default=FIXTURE,
                        help=f"checkpoint directory (default {FIXTURE.relative_to(ROOT)}; the grid-aligned original: "
                             "build/fixtures/smollm2-135m-instruct)")
    parser.add_argument("--chunks", type=int, default=20, help="512-token chunks of the corpus (default 20)")
    parser.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--doc", type=Path, default=None,
                        help="output (default docs/bench-quality.md for the default model, "
                             "docs/bench-quality-<model>.md for others)")
    args = parser.parse_args()
    doc = args.doc or default_doc(args.model_dir)

    out = OUT
    out.mkdir(parents=True, exist_ok=True)
    text = corpus(out)
    files = models(args.model_dir, out, args.threads)
    common = ["-f", str(text), "-c", "512", "--chunks", str(args.chunks), "-t", str(args.threads)]
    base = out / f"{args.model_dir.name}-F16.kld"
    start = time.perf_counter()
    tag = f"ppl{args.chunks}"
    if not base.exists():
        (out / f"{files['F16'].stem}.{tag}.log").unlink(missing_ok=True)
    log = perplexity(["-m", str(files["F16"]), "--kl-divergence-base", str(base), *common],
                     out / f"{files['F16'].stem}.{tag}.log", [files["F16"], text])
    f16_ppl = float(re.search(r"Final estimate: PPL = ([\d.]+)", log).group(1))
    rows = []
    for name, path in files.items():
        bpw, bpw_linear, linear = describe(path)
        if name == "F16":
            rows.append((name, path, bpw, bpw_linear, linear, f16_ppl, 0.0, 0.0, 100.0))
            continue
        log = perplexity(["-m", str(path), "--kl-divergence-base", str(base), "--kl-divergence", *common],
                         out / f"{path.stem}.{tag}.log", [path, base, text])
        rows.append((name, path, bpw, bpw_linear, linear, _value(log, "Mean PPL(Q)"), _value(log, "Mean    KLD"),
                     _value(log, "99.0%   KLD"), float(re.search(r"Same top p:\s*([\d.]+)", log).group(1))))
        print(f"{name:8s} {bpw:6.3f} bpw  PPL {rows[-1][5]:8.3f}  KLD {rows[-1][6]:.4f}", flush=True)
    took = time.perf_counter() - start
    f16_tensors = gguf.GGUFReader(files["F16"]).tensors
    linear_share = (sum(int(t.n_elements) for t in f16_tensors if LINEAR.search(t.name))
                    / sum(int(t.n_elements) for t in f16_tensors))
    grid_rmse = q4_1_round_trip_rmse(linear_weights(files["F16"]))
    gauss_rmse = q4_1_round_trip_rmse([np.random.default_rng(0).standard_normal((576, 1536))])
    on_grid = grid_rmse < ON_GRID_RMSE

    lines = [
        "# Quality: ATD vs llama.cpp's stock types (KL divergence to F16)",
        "",
        f"Model: `{args.model_dir.name}`. Corpus: English text from the Debian package `fortunes` "
        f"({', '.join(FORTUNE_FILES)}), {args.chunks} chunks × 512 tokens. Tool: patched "
        "`llama-perplexity --kl-divergence` against the F16 logits. ATD files come from `atd-gguf convert --planes N`, "
        "stock types from the patched `llama-quantize` (from F16). '+imatrix' rows used an importance matrix "
        f"from `llama-imatrix` on the F16 model over other fortune files ({', '.join(CALIBRATION_FILES)}; "
        f"{CALIBRATION_CHUNKS} chunks × 512 tokens, disjoint from the evaluation text): `atd-gguf convert "
        "--imatrix` for ATD, `llama-quantize --imatrix` for the stock types. 'bpw (all)' counts every tensor, "
        f"'bpw (linear)' only the attention/FFN matrices ({100 * linear_share:.0f} % of the weights; the rest is "
        f"mostly the embedding, Q8_0 in ATD files). Generated by `scripts/bench_quality.py` ({took / 60:.1f} min).",
        "",
        "| type | bpw (all) | bpw (linear) | file MiB | linear weights stored as | PPL | mean KLD | KLD p99 | same top-1 % | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, path, bpw, bpw_linear, linear, ppl, kld, kld99, top in sorted(rows, key=lambda r: -r[3]):
        note = "grid-aligned: biased low" if on_grid and set(linear.split("+")) & GRID_ALIGNED and name != "F16" else ""
        lines.append(f"| {name} | {bpw:.3f} | {bpw_linear:.3f} | {path.stat().st_size / 2**20:.1f} | {linear} | "
                     f"{ppl:.3f} | {kld:.4f} | {kld99:.4f} | {top:.1f} | {note} |")
    by_name = {r[0]: r for r in rows}
    lines += ["", "## The rungs: ATD no larger than each stock +imatrix file", "",
              "'ATD@X' files are `atd-gguf convert --target-size <size of X +imatrix>`: planes per tensor (and the "
              "embedding type) chosen by the size plan, fitted with the imatrix ('+imatrix') or with GPTQ error "
              "feedback on the calibration text ('+GPTQ', `--calibration`, the same fortune files as the imatrix). "
              "The plan weighs each tensor's error by converter.budget's sensitivity table (fitted on SmolLM2-135M, "
              "so in-sample here), or in '+GPTQ fisher' by sensitivities measured on the calibration text "
              "(`--sensitivity fisher`, an empirical-Fisher pass).",
              "", "| rung | stock file | bytes | mean KLD | ATD file | bytes | mean KLD | ATD / stock KLD |",
              "|---|---|---|---|---|---|---|---|"]
    for rung in RUNGS:
        stock = by_name[f"{rung} +imatrix"]
        for fit in ("+imatrix", "+GPTQ", "+GPTQ fisher"):
            atd = by_name[f"ATD@{rung} {fit}"]
            lines.append(f"| {rung} | {stock[0]} | {stock[1].stat().st_size:,} | {stock[6]:.4f} | {atd[0]} | "
                         f"{atd[1].stat().st_size:,} | {atd[6]:.4f} | {atd[6] / stock[6]:.2f} |")
    if on_grid:
        grid_note = (
            "* The linear weights lie on a Q4_1 grid (16 levels per 32 weights; a Q4_1 round trip of them has a "
            f"relative RMSE of {grid_rmse:.4f}, bf16 rounding only): this model was dequantized from a Q4_1 GGUF. "
            "Q4_1, Q5_0/Q5_1 and Q8_0 can store those values almost exactly. Any type whose linear weights land "
            "on them (also through llama-quantize's fallbacks) is biased in its favour and flagged 'grid-aligned'. "
            "ATD's levels (sums of ternary planes) do not line up with that grid.")
    else:
        grid_note = (
            "* The linear weights are not on a Q4_1 grid: a Q4_1 round trip of them has a relative RMSE of "
            f"{grid_rmse:.3f} (of a Gaussian: {gauss_rmse:.3f}), so no stock type stores them exactly.")
        if args.model_dir.resolve().name == FIXTURE.name:
            grid_note += (
                f" `{FIXTURE.name}` is SmolLM2-135M-Instruct from a Q4_1 GGUF with every Q4_1 weight moved uniformly "
                "at random within its quantization bin (scripts/make_fixtures.py); its embedding keeps the GGUF's "
                "Q8_0 values. Results on the grid-aligned original: `--model build/fixtures/smollm2-135m-instruct`.")
    lines += [
        "",
        "Notes:",
        "",
        grid_note,
        "* SmolLM2-135M is 576 wide: 576 is not a multiple of 256, so llama-quantize stores most K-quant and TQ2_0 "
        "tensors in its 32-block fallbacks. The column 'linear weights stored as' shows what each file really "
        "holds. ATD uses its 64-block family there.",
        "* An importance matrix helps ATD more than the stock types (compare each type's '+imatrix' row): "
        "the plane scales are least-squares fits, and the imatrix weights them toward the columns that "
        "matter. Pass `--imatrix` to `atd-gguf convert` for any real use.",
    ]
    doc.write_text("\n".join(lines) + "\n")
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
