#!/usr/bin/env python3
"""Benchmark: conversion time and peak RSS of `atd-gguf convert` next to llama.cpp's converter.

Each run is a fresh subprocess; peak RSS is the child's ru_maxrss from wait4. Both converters
run on the same fixtures in the same session, so the ratios are what to quote on a noisy machine.
Prints a markdown table (paste it into docs/bench-convert.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from llama_cpp_source import ensure_source  # noqa: E402

FIXTURES = ROOT / "build" / "fixtures"


def measure(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", nargs="*", default=["smollm2-135m-instruct", "llama3-tiny"])
    parser.add_argument("--outtypes", nargs="*", default=["f16", "q8_0"])
    parser.add_argument("--planes", nargs="*", type=int, default=[3], help="ATD runs (ours only)")
    args = parser.parse_args()
    llama_cpp = ensure_source()
    atd = [sys.executable, "-m", "converter.cli", "convert"]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}\n")
    print("| fixture | output | llama.cpp s | llama.cpp peak RSS MiB | atd-gguf s | atd-gguf peak RSS MiB "
          "| time ratio | RSS ratio |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.fixtures:
            model = FIXTURES / name
            for outtype in args.outtypes:
                ref_s, ref_rss = measure([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(model),
                                          "--outfile", f"{tmp}/ref.gguf", "--outtype", outtype])
                our_s, our_rss = measure(atd + [str(model), "-o", f"{tmp}/ours.gguf", "--outtype", outtype,
                                                "--force", "--no-progress"])
                print(f"| {name} | {outtype} | {ref_s:.1f} | {ref_rss:.0f} | {our_s:.1f} | {our_rss:.0f} "
                      f"| {our_s / ref_s:.2f} | {our_rss / ref_rss:.2f} |", flush=True)
            for planes in args.planes:
                our_s, our_rss = measure(atd + [str(model), "-o", f"{tmp}/atd.gguf", "--planes", str(planes),
                                                "--force", "--no-progress"])
                print(f"| {name} | ATD N={planes} | – | – | {our_s:.1f} | {our_rss:.0f} | – | – |", flush=True)


if __name__ == "__main__":
    main()
