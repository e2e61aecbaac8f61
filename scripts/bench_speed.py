#!/usr/bin/env python3
"""llama-bench pp512 / tg128 of ATD next to llama.cpp's stock types, on SmolLM2 and a Llama-3-8B shape.

Two models; per model, llama-bench runs over every file (1 and 2 threads) in --rounds rounds, one after
another, so that a slow spell of a shared machine touches every type alike:

* `smollm2`: the smollm2-135m-continuous fixture (576 wide: the 64-block ATD family except ffn_down);
* `llama3-8b`: a Llama-3-8B-shaped checkpoint from scripts/llama3_shape.py (4096 hidden, 14336 FFN, GQA
  32/8, the real Llama-3 tokenizer, random weights; --layers of the 32, default 8). Speed does not depend
  on the values. Its files all keep token_embd/output in Q8_0 (`atd-gguf convert --embed-type q8_0`,
  `llama-quantize --token-embedding-type q8_0 --output-tensor-type q8_0`).

ATD files come from `atd-gguf convert --planes N`, the stock ones from the patched `llama-quantize` of an
F16 GGUF (deleted afterwards for the 8B shape unless --keep-f16). Files are cached in build/bench-speed.

Token generation reads every weight once per token, so its ceiling is the memory bandwidth divided by
the bytes of weights read per token (all tensors but token_embd, of which one row is read). The script
measures the bandwidth in the same run (a streaming read of a 1 GiB buffer, 1 and 2 threads, best of
5, before and after llama-bench) and reports tg128 as a fraction of that ceiling.

Needs `make llama`. Writes docs/bench-speed.md.

    .venv/bin/python scripts/bench_speed.py                       # both models, 3 rounds of -r 1
    .venv/bin/python scripts/bench_speed.py --models smollm2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gguf

import bench_quality as bq
from bench_convert import cpu_model as cpu_name

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "bench-speed"
sys.path.insert(0, str(ROOT))
import gguf_types  # noqa: E402  (also registers the ATD types with gguf-py's reader)

ATD_PLANES = [1, 2, 3]
STOCK_TYPES = ["Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K", "TQ2_0"]
# the speed issue's "done when": ATD type vs the stock type it must match, per model
PAIRS = {"smollm2": ("ATD3", "Q4_K_M"), "llama3-8b": ("ATD2", "Q4_0")}
SMOLLM2_EXTRA = ["Q8_0"]  # a reference point on the small model

# a streaming read of a large buffer with 1 and 2 threads (GB/s, best of 5 passes)
BANDWIDTH_C = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
typedef struct { const uint64_t * p; size_t n; uint64_t s; } job;
static void * run(void * a) {
    job * j = a; uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i < j->n; i += 8) { s0 += j->p[i]; s1 += j->p[i + 2]; s2 += j->p[i + 4]; s3 += j->p[i + 6]; }
    j->s = s0 + s1 + s2 + s3; return NULL;
}
int main(int argc, char ** argv) {
    const size_t bytes = (size_t)atol(argv[1]) << 20, n = bytes / 8;
    uint64_t * p = aligned_alloc(4096, bytes);
    memset(p, 1, bytes);
    for (int t = 1; t <= 2; ++t) {
        double best = 1e30;
        for (int r = 0; r < 5; ++r) {
            pthread_t th[2]; job j[2]; const double t0 = now();
            for (int i = 0; i < t; ++i) { j[i].p = p + i * (n / t); j[i].n = n / t; pthread_create(&th[i], NULL, run, &j[i]); }
            for (int i = 0; i < t; ++i) pthread_join(th[i], NULL);
            const double dt = now() - t0; if (dt < best) best = dt;
        }
        printf("%d %.2f\n", t, bytes / best / 1e9);
    }
    free(p);
    return 0;
}
"""


def bandwidth() -> dict[int, float]:
    """GB/s of a streaming read with 1 and 2 threads (compiled once into build/bench-speed)."""
    exe = OUT / "bandwidth"
    src = OUT / "bandwidth.c"
    if not exe.is_file() or not src.is_file() or src.read_text() != BANDWIDTH_C:
        OUT.mkdir(parents=True, exist_ok=True)  # the first step of a fresh tree
        src.write_text(BANDWIDTH_C)
        subprocess.run(["gcc", "-O2", "-pthread", str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe), "1024"], capture_output=True, text=True, check=True).stdout
    return {int(t): float(gb) for t, gb in (line.split() for line in out.splitlines())}


def run_quiet(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_speed: {' '.join(cmd[:3])} ... failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")


def build_models(name: str, model_dir: Path, threads: int, stock_extra: list[str], embed_q8_0: bool,
                 keep_f16: bool) -> dict[str, Path]:
    """type -> GGUF in OUT, made once: ATD{N} by atd-gguf convert, stock types by llama-quantize from F16."""
    OUT.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for n in ATD_PLANES:
        path = OUT / f"{name}-ATD{n}.gguf"
        if not path.exists():
            print(f"bench_speed: converting {name} to ATD{n}", file=sys.stderr)
            bq.atd_gguf("convert", str(model_dir), "-o", str(path), "--planes", str(n), "--embed-type", "q8_0",
                        "--no-progress")
        files[f"ATD{n}"] = path
    stock = {qtype: OUT / f"{name}-{qtype}.gguf" for qtype in STOCK_TYPES + stock_extra}
    missing = [q for q, p in stock.items() if not p.exists()]
    if missing:
        f16 = OUT / f"{name}-F16.gguf"
        if not f16.exists():
            print(f"bench_speed: converting {name} to F16", file=sys.stderr)
            bq.atd_gguf("convert", str(model_dir), "-o", str(f16), "--outtype", "f16", "--no-progress")
        quantize = bq.need(bq.BIN / "llama-quantize", "patched llama-quantize")
        embed = ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"] if embed_q8_0 else []
        for qtype in missing:
            print(f"bench_speed: llama-quantize {name} {qtype}", file=sys.stderr)
            run_quiet([str(quantize), *embed, str(f16), str(stock[qtype]), qtype, str(threads)])
        if not keep_f16:
            f16.unlink()  # several GB for the 8B shape; the stock files are what is kept
    files.update(stock)
    return files


def repacked() -> bool:
    """The patched ggml-cpu keeps ATD weights in the r2 layout (66/54 or 18/15 of their bytes) unless
    ATD_REPACK=0 (docs/llama-plugin.md)."""
    return os.environ.get("ATD_REPACK", "1").strip() not in ("0", "")


def bytes_per_token(path: Path) -> int:
    """Weight bytes a generated token reads: every tensor but token_embd (one row of it is read), unless
    the output layer is tied to it (then all of token_embd is read by the output matmul); ATD1..ATD4
    tensors as the runtime holds them (r2: 2 + block/4 bytes per plane and block instead of 2 + ceil(block/5))."""
    tensors = gguf.GGUFReader(path).tensors
    names = {t.name for t in tensors}
    total = 0
    for t in tensors:
        n_bytes = int(t.n_bytes)
        tid = int(t.tensor_type)
        if repacked() and gguf_types.is_atd_type_id(tid):
            at = gguf_types.atd_type(tid)  # r2 block: the scales, then 2 bits per weight (ATD_R2_TYPE_SIZE)
            n_bytes = n_bytes // at.type_size * at.planes * (2 + at.block_size // 4)
        if t.name == "token_embd.weight" and "output.weight" in names:
            total += n_bytes // int(t.shape[-1])  # one row
        else:
            total += n_bytes
    return total


def llama_bench(files: dict[str, Path], threads: list[int], reps: int, rounds: int) -> tuple[dict, list, float]:
    """One llama-bench run over every file per round, the rounds one after another: a slow minute on a
    shared machine then touches every type instead of one. Returns (mean, stddev) over all samples of all
    rounds, the per-round means, and the seconds taken."""
    bench = bq.need(bq.BIN / "llama-bench", "patched llama-bench")
    cmd = [str(bench), "-m", ",".join(str(p) for p in files.values()), "-p", "512", "-n", "128",
           "-t", ",".join(map(str, threads)), "-r", str(reps), "-o", "json"]
    start = time.perf_counter()
    samples: dict[tuple[str, str, int], list[float]] = {}
    per_round: list[dict[tuple[str, str, int], float]] = []
    for _ in range(rounds):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"llama-bench failed: {proc.stderr[-2000:]}")
        this_round = {}
        for r in json.loads(proc.stdout):
            test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
            key = (Path(r["model_filename"]).name, test, int(r["n_threads"]))
            samples.setdefault(key, []).extend(r["samples_ts"])
            this_round[key] = r["avg_ts"]
        per_round.append(this_round)
    speed = {key: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for key, v in samples.items()}
    return speed, per_round, time.perf_counter() - start


def round_ratios(files: dict[str, Path], per_round: list[dict], pair: tuple[str, str], threads: list[int]) -> list[str]:
    """The done-when comparison of the speed issue, round by round: pair[0] / pair[1] for pp512 and tg128."""
    ours, peer = (files[name].name for name in pair)
    lines = []
    for t in threads:
        for test in ("pp512", "tg128"):
            ratios = [r[(ours, test, t)] / r[(peer, test, t)] for r in per_round
                      if (ours, test, t) in r and (peer, test, t) in r]
            if ratios:
                lines.append(f"* {pair[0]} / {pair[1]}, {test}, {t} thread{'s' if t > 1 else ''}, per round: "
                             + ", ".join(f"{x:.2f}" for x in ratios) + f" (lowest {min(ratios):.2f})")
    return lines


def table(title: str, files: dict[str, Path], speed: dict, threads: list[int], bw: dict[int, float]) -> list[str]:
    head = ["type", "bpw (linear)", "file MiB", "linear weights stored as", "MB read / token"]
    for t in threads:
        head += [f"pp512 t/s, {t} thr", f"tg128 t/s, {t} thr", f"tg128 / ceiling, {t} thr"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    for name, path in files.items():
        _, bpw_linear, linear = bq.describe(path)
        per_token = bytes_per_token(path)
        cells = [name, f"{bpw_linear:.3f}", f"{path.stat().st_size / 2**20:.0f}", linear, f"{per_token / 1e6:.0f}"]
        for t in threads:
            pp = speed.get((path.name, "pp512", t), (float("nan"), 0.0))
            tg = speed.get((path.name, "tg128", t), (float("nan"), 0.0))
            ceiling = bw[t] * 1e9 / per_token
            cells += [f"{pp[0]:.1f} ± {pp[1]:.1f}", f"{tg[0]:.2f} ± {tg[1]:.2f}", f"{tg[0] / ceiling:.0%}"]
        rows.append((bpw_linear, "| " + " | ".join(cells) + " |"))
    lines += [row for _, row in sorted(rows, key=lambda r: -r[0])]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", choices=["smollm2", "llama3-8b"], default=["smollm2", "llama3-8b"])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the Llama-3-8B shape (default 8)")
    parser.add_argument("-t", "--threads", default="1,2", help="llama-bench thread counts (default 1,2)")
    parser.add_argument("-r", "--repetitions", type=int, default=1, help="llama-bench -r per round (default 1)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="llama-bench runs over all files, one after another (default 3)")
    parser.add_argument("--keep-f16", action="store_true", help="keep the 8B shape's F16 GGUF")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "bench-speed.md")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    quant_threads = os.cpu_count() or 2

    sections, took = [], {}
    bw_before = bandwidth()
    bws = [bw_before]
    for model in args.models:
        if model == "smollm2":
            files = build_models("smollm2", bq.FIXTURE, quant_threads, SMOLLM2_EXTRA, False, True)
            title = "SmolLM2-135M (`smollm2-135m-continuous`; 576 wide, tied embeddings)"
        else:
            sys.path.insert(0, str(ROOT / "scripts"))
            import llama3_shape

            ckpt = llama3_shape.ensure_checkpoint(llama3_shape.Shape(layers=args.layers))
            files = build_models(f"llama3-8b-L{args.layers}", Path(ckpt), quant_threads, [], True, args.keep_f16)
            title = (f"Llama-3-8B shape, {args.layers} of 32 layers (`scripts/llama3_shape.py --layers {args.layers}`; "
                     "token_embd/output Q8_0 in every file)")
        speed, per_round, took[model] = llama_bench(files, threads, args.repetitions, args.rounds)
        bws.append(bandwidth())
        sections.append((title, files, speed, round_ratios(files, per_round, PAIRS[model], threads)))
    bw = {t: max(b[t] for b in bws) for t in (1, 2)}

    lines = [
        "# Speed: ATD vs llama.cpp's stock types (llama-bench)",
        "",
        f"Generated by `scripts/bench_speed.py`. CPU: {cpu_name()}, {os.cpu_count()} logical CPUs. Patched "
        f"`llama-bench -p 512 -n 128 -t {args.threads} -r {args.repetitions}` over all of a model's files, "
        f"{args.rounds} rounds one after another per model "
        + ", ".join(f"({took[m] / 60:.1f} min)" for m in args.models)
        + ". Tokens/s: mean ± stddev over all samples of all rounds.",
        "",
        "Memory bandwidth, a streaming read of a 1 GiB buffer measured before and after each llama-bench run "
        "(best of 5 passes each): "
        + "; ".join(f"{t} thread{'s' if t > 1 else ''}: " + ", ".join(f"{b[t]:.1f}" for b in bws) + " GB/s"
                    for t in (1, 2))
        + f". **tg128 / ceiling** = tg128 ÷ (best bandwidth ({bw[1]:.1f} / {bw[2]:.1f} GB/s) ÷ the weight "
        "bytes read per token): how close generation runs to the memory limit. "
        + ("ATD weights run repacked to the r2 layout (66/54 or 18/15 of their file bytes, counted so in MB "
           "read / token; docs/llama-plugin.md)." if repacked() else "ATD_REPACK=0: ATD weights run in the file layout."),
        "",
    ]
    for title, files, speed, ratios in sections:
        lines += table(title, files, speed, threads, bw) + [""] + ratios + [""]
    lines += [f"Load average when the run ended: {os.getloadavg()[0]:.1f} (other jobs may have shared the "
              "machine): compare rows within one run, not across runs."]
    args.doc.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
