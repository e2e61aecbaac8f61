#!/usr/bin/env python3
"""Benchmark the ATD numpy reference fit against gguf-py's stock quantizers.

Prints markdown tables of relative RMSE ||W - W^||/||W|| and fit seconds:

* a standard Gaussian (np.random.default_rng(0)), 4096x4096 (or 1024x1024 with --quick),
  for ATD N = 1..4 x {greedy, grid} next to gguf-py's Q4_0, Q5_0, Q8_0, TQ1_0, TQ2_0;
* with --model DIR: every linear weight (q/k/v/o/gate/up/down_proj) of a Hugging Face
  safetensors checkpoint, aggregated per method as sqrt(sum ||W - W^||^2 / sum ||W||^2).

Usage:
    .venv/bin/python scripts/bench_fit.py --quick
    .venv/bin/python scripts/bench_fit.py --model build/fixtures/smollm2-135m-instruct --skip-gaussian
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf  # noqa: E402
import gguf.quants  # noqa: E402
from gguf.utility import SafetensorsLocal  # noqa: E402

import gguf_types as G  # noqa: E402

STOCK = ("Q4_0", "Q5_0", "Q8_0", "TQ1_0", "TQ2_0")
STOCK_NOTES = {"TQ1_0", "TQ2_0"}  # footnote: gguf-py's round(x / max|x|) quantizer
LINEAR_RE = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def machine_info() -> str:
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    cores = os.cpu_count()
    try:
        load = ", load average %.2f" % os.getloadavg()[0]
    except OSError:
        load = ""
    return (f"{model}, {cores} logical CPUs{load}; Python {platform.python_version()}, "
            f"numpy {np.__version__}, gguf-py {getattr(gguf, '__version__', '0.19.0')}")


def stock_status(name: str) -> str | None:
    """None if gguf-py can quantize and dequantize this type, else the reason."""
    qt = gguf.GGMLQuantizationType[name]
    w = np.zeros((1, gguf.GGML_QUANT_SIZES[qt][0]), dtype=np.float32)
    try:
        gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt)
    except NotImplementedError as e:
        return f"not implemented in gguf-py: {e}"
    return None


def atd_methods(planes, methods):
    for n in planes:
        for m in methods:
            yield f"ATD{n} {m}", n, m


def bench_gaussian(size: int, planes, methods) -> list[str]:
    w = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    norm2 = float(np.sum(w.astype(np.float64) ** 2))
    lines = [
        f"### {size}x{size} standard Gaussian (np.random.default_rng(0)), {size * size / 1e6:.1f} M weights",
        "",
        "| method | bpw | rel. RMSE | fit s | M weights/s |",
        "|---|---|---|---|---|",
    ]
    for label, n, m in atd_methods(planes, methods):
        t = G.atd_type_for(n, size)
        t0 = time.perf_counter()
        q = G.quantize(w, t, m)
        dt = time.perf_counter() - t0
        y = G.dequantize(q, t)
        err = float(np.sum((w.astype(np.float64) - y) ** 2))
        name = label.replace(f"ATD{n}", t.name)
        lines.append(f"| {name} | {t.bpw:g} | {np.sqrt(err / norm2):.4f} | {dt:.2f} | {w.size / dt / 1e6:.2f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    for name in STOCK:
        qt = gguf.GGMLQuantizationType[name]
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        reason = stock_status(name)
        if reason:
            lines.append(f"| {name} (gguf-py) | {ts * 8 / bs:g} | n/a | n/a | {reason} |")
            continue
        t0 = time.perf_counter()
        q = gguf.quants.quantize(w, qt)
        dt = time.perf_counter() - t0
        y = gguf.quants.dequantize(q, qt)
        err = float(np.sum((w.astype(np.float64) - y) ** 2))
        note = " *" if name in STOCK_NOTES else ""
        lines.append(f"| {name} (gguf-py){note} | {ts * 8 / bs:g} | {np.sqrt(err / norm2):.4f} | {dt:.2f} | "
                     f"{w.size / dt / 1e6:.2f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    if any(n in STOCK_NOTES for n in STOCK):
        lines += ["", "\\* gguf-py 0.19.0 does implement TQ1_0/TQ2_0 quantization, as d = max|x| per 256 block and "
                  "t = round(x / d): meant for ternary-trained models, not a fit for ordinary weights."]
    return lines


def load_tensor(t) -> np.ndarray:
    raw = t.mmap_bytes()
    if t.dtype == "BF16":
        u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16  # exact bf16 -> fp32
        arr = u.view(np.float32)
    elif t.dtype == "F16":
        arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    elif t.dtype == "F32":
        arr = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    else:
        raise ValueError(f"unsupported safetensors dtype {t.dtype}")
    return arr.reshape(t.shape)


def bench_model(model_dir: Path, planes, methods, max_tensors: int | None) -> list[str]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no *.safetensors in {model_dir}")
    entries = []
    for f in files:
        for name, t in SafetensorsLocal(f).tensors.items():
            if LINEAR_RE.search(name) and len(t.shape) == 2:
                entries.append((name, t))
    entries.sort(key=lambda e: e[0])
    if max_tensors:
        entries = entries[:max_tensors]
    labels = [lbl for lbl, _, _ in atd_methods(planes, methods)] + [f"{s} (gguf-py)" for s in STOCK]
    stats = {lbl: {"err": 0.0, "norm": 0.0, "secs": 0.0, "n": 0, "params": 0, "skipped": 0, "types": set()}
             for lbl in labels}
    usable = {s: stock_status(s) is None for s in STOCK}
    total_params = 0
    for idx, (name, t) in enumerate(entries):
        w = load_tensor(t)
        total_params += w.size
        w64 = w.astype(np.float64)
        norm2 = float(np.sum(w64 * w64))
        print(f"[{idx + 1}/{len(entries)}] {name} {tuple(w.shape)}", file=sys.stderr, flush=True)
        for lbl, n, m in atd_methods(planes, methods):
            st = stats[lbl]
            at = G.atd_type_for(n, w.shape[1])
            if at is None:
                st["skipped"] += 1
                continue
            t0 = time.perf_counter()
            q = G.quantize(w, at, m)
            st["secs"] += time.perf_counter() - t0
            d = w64 - G.dequantize(q, at)
            st["err"] += float(np.sum(d * d))
            st["norm"] += norm2
            st["n"] += 1
            st["params"] += w.size
            st["types"].add(at.name)
        for s in STOCK:
            st = stats[f"{s} (gguf-py)"]
            qt = gguf.GGMLQuantizationType[s]
            if not usable[s] or w.shape[1] % gguf.GGML_QUANT_SIZES[qt][0] != 0:
                st["skipped"] += 1
                continue
            t0 = time.perf_counter()
            q = gguf.quants.quantize(w, qt)
            st["secs"] += time.perf_counter() - t0
            d = w64 - gguf.quants.dequantize(q, qt)
            st["err"] += float(np.sum(d * d))
            st["norm"] += norm2
            st["n"] += 1
            st["params"] += w.size
            st["types"].add(s)
    lines = [
        f"### {model_dir.name}: {len(entries)} linear tensors, {total_params / 1e6:.1f} M weights",
        "",
        "Aggregate relative RMSE = sqrt(sum ||W - W^||^2 / sum ||W||^2) over the tensors the method can encode.",
        "",
        "| method | types used | tensors | skipped (row not a block multiple) | rel. RMSE | fit s | M weights/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for lbl in labels:
        st = stats[lbl]
        if st["n"] == 0:
            lines.append(f"| {lbl} | - | 0 | {st['skipped']} | n/a | n/a | n/a |")
            continue
        rmse = np.sqrt(st["err"] / st["norm"])
        speed = st["params"] / st["secs"] / 1e6 if st["secs"] > 0 else float("nan")
        lines.append(f"| {lbl} | {', '.join(sorted(st['types']))} | {st['n']} | {st['skipped']} | {rmse:.4f} | "
                     f"{st['secs']:.1f} | {speed:.2f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1024x1024 Gaussian instead of 4096x4096")
    ap.add_argument("--size", type=int, default=None, help="Gaussian side length (overrides --quick)")
    ap.add_argument("--model", type=Path, default=None, help="HF safetensors checkpoint directory")
    ap.add_argument("--skip-gaussian", action="store_true", help="only run --model")
    ap.add_argument("--planes", default="1,2,3,4", help="comma separated plane counts (default 1,2,3,4)")
    ap.add_argument("--methods", default="greedy,grid", help="comma separated fit methods (default greedy,grid)")
    ap.add_argument("--max-tensors", type=int, default=None, help="--model: only the first K linear tensors")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown to this file")
    args = ap.parse_args(argv)
    planes = [int(x) for x in args.planes.split(",") if x]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in G.METHODS:
            ap.error(f"unknown method {m}")

    lines = [f"Machine: {machine_info()}", "",
             f"ATD fit defaults: grid with K={G.DEFAULT_CANDIDATES} candidates, {G.DEFAULT_ITERS} alternations.", ""]
    if not args.skip_gaussian:
        size = args.size or (1024 if args.quick else 4096)
        lines += bench_gaussian(size, planes, methods) + [""]
    if args.model is not None:
        lines += bench_model(args.model, planes, methods, args.max_tensors) + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
