#!/usr/bin/env python3
"""Build llama.cpp with the ATD types (`make llama`), and a stock build of the same source.

* patched: the pinned source (scripts/llama_cpp_source.py, left untouched) is copied into
  build/llama.cpp-patched/src, llama-patch/atd.patch is applied, and the tree is built in
  build/llama.cpp-patched/build with -DATD_GGML_EXT_DIR=ggml-ext (the ggml-ext sources are
  compiled in place: one source of truth).
* stock: the pristine source itself, built in build/llama.cpp-stock/build (only what the tests
  need: libllama and libggml, which tests link their own small tools against).

Both use the same CPU flags (never GGML_NATIVE: on this machine it compiles AMX code that
faults) and ccache. Every step is idempotent: the copy only rewrites files whose content
changed, so a second run rebuilds nothing. See docs/llama-plugin.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
PATCH = ROOT / "llama-patch" / "atd.patch"
EXT_DIR = ROOT / "ggml-ext"
PATCHED = BUILD / "llama.cpp-patched"
STOCK = BUILD / "llama.cpp-stock"

# Explicit x86 features instead of GGML_NATIVE (which also compiles AMX code: on hosts that list
# AMX but fault on it, every Q4_0/Q8_0 matmul crashes). Each one is switched on only when
# /proc/cpuinfo lists it: e.g. AMD EPYC (Zen 4) has AVX-512 VNNI but not the VEX AVX-VNNI, and
# with GGML_AVX_VNNI=ON ggml's own Q8_0 kernels (llamafile tinyBLAS) die with SIGILL there.
CPU_FEATURES = [  # (ggml option, /proc/cpuinfo flags it needs)
    ("AVX", ["avx"]), ("AVX2", ["avx2"]), ("FMA", ["fma"]), ("F16C", ["f16c"]), ("BMI2", ["bmi2"]),
    ("AVX_VNNI", ["avx_vnni"]),
    ("AVX512", ["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"]),
    ("AVX512_VBMI", ["avx512vbmi"]), ("AVX512_VNNI", ["avx512_vnni"]), ("AVX512_BF16", ["avx512_bf16"]),
]
BASE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_CURL=OFF",
              "-DGGML_CCACHE=ON", "-DLLAMA_BUILD_TESTS=OFF"]
PATCHED_TARGETS = ["llama", "llama-cli", "llama-completion", "llama-server", "llama-perplexity",
                   "llama-bench", "llama-quantize", "llama-imatrix"]
STOCK_TARGETS = ["llama"]  # libllama + libggml*: the tests link their own tools against it


class BuildError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"build_llama: error: {message}")


def log(message: str) -> None:
    print(f"build_llama: {message}", flush=True)


def pristine_source() -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    import llama_cpp_source

    return llama_cpp_source.ensure_source(BUILD)


def cpu_feature_set() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())
    except (OSError, AttributeError):
        return {"avx", "avx2", "fma", "f16c", "bmi2"}  # not Linux: a conservative x86-64-v3 set


def cpu_flags() -> list[str]:
    """-DGGML_NATIVE=OFF plus GGML_<feature>=ON/OFF from this CPU's flags (AMX always off)."""
    have = cpu_feature_set()
    flags = ["-DGGML_NATIVE=OFF"]
    for option, needs in CPU_FEATURES:
        flags.append(f"-DGGML_{option}={'ON' if all(n in have for n in needs) else 'OFF'}")
    return flags


def atd_flags() -> list[str]:
    """The patch's own options: where ggml-ext is, and GFNI for the ATD kernels (ggml has no GFNI option)."""
    return [f"-DATD_GGML_EXT_DIR={EXT_DIR}", f"-DATD_GGML_GFNI={'ON' if 'gfni' in cpu_feature_set() else 'OFF'}"]


def ensure_ccache() -> None:
    """GGML_CCACHE=ON uses ccache when it is on PATH; install it (Debian) if we can, else go on."""
    if shutil.which("ccache"):
        return
    if shutil.which("apt-get") and os.geteuid() == 0:
        log("installing ccache (apt-get)")
        ok = subprocess.run("apt-get update -qq && apt-get install -y -qq ccache", shell=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
        if ok and shutil.which("ccache"):
            return
    log("ccache not available: building without a compiler cache")


def _patched_files(patch: Path) -> list[str]:
    names = []
    for line in patch.read_text().splitlines():
        m = re.match(r"^\+\+\+ b/(\S+)", line)
        if m:
            names.append(m.group(1))
    if not names:
        raise BuildError(f"{patch}: no '+++ b/<file>' lines: not a unified diff")
    return names


def _apply_patch(pristine: Path, patch: Path) -> dict[str, bytes]:
    """The patched content of every file the patch touches, from a scratch copy of pristine files."""
    names = _patched_files(patch)
    with tempfile.TemporaryDirectory(prefix="atd-patch.") as tmp:
        scratch = Path(tmp)
        for name in names:
            if (pristine / name).is_file():
                (scratch / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(pristine / name, scratch / name)
        proc = subprocess.run(["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch",
                               "-r", "-", "-i", str(patch)],
                              cwd=scratch, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(
                f"{patch.relative_to(ROOT)} does not apply to the pinned llama.cpp source {pristine}:\n"
                f"{proc.stdout}{proc.stderr}"
                "(the patch must be made against the pristine tree of scripts/llama_cpp_source.py)")
        return {name: (scratch / name).read_bytes() for name in names}


def sync_patched_tree(pristine: Path, dest: Path) -> int:
    """Make dest = pristine + patch, writing only files whose content differs. Returns #written."""
    patched = _apply_patch(pristine, PATCH)
    expected: set[str] = set()
    written = 0
    for path in sorted(pristine.rglob("*")):
        if path.is_dir() or path.name == ".complete":
            continue
        rel = path.relative_to(pristine).as_posix()
        expected.add(rel)
        target = dest / rel
        content = patched.get(rel)
        if target.is_file() and not target.is_symlink():
            if content is None:
                a, b = path.stat(), target.stat()
                if a.st_size == b.st_size and (a.st_mtime_ns == b.st_mtime_ns or path.read_bytes() == target.read_bytes()):
                    continue
                content = path.read_bytes()
            elif target.read_bytes() == content:
                continue
            target.write_bytes(content)  # new mtime: make rebuilds what depends on it
            shutil.copymode(path, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                target.unlink()
            if content is None:
                shutil.copy2(path, target, follow_symlinks=False)
            else:
                target.write_bytes(content)
                shutil.copymode(path, target)
        written += 1
    for name in set(patched) - expected:  # files the patch creates
        target = dest / name
        if not target.is_file() or target.read_bytes() != patched[name]:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(patched[name])
            written += 1
        expected.add(name)
    for path in sorted(dest.rglob("*"), reverse=True):  # files that are neither pristine nor patched
        rel = path.relative_to(dest).as_posix()
        if path.is_file() and rel not in expected:
            path.unlink()
            written += 1
    return written


def _run_logged(cmd: list[str], log_file, echo: bool) -> None:
    """Run cmd with its output appended to log_file; echo the progress lines ("[ 42%] ...")."""
    log_file.write(f"$ {' '.join(cmd)}\n")
    log_file.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        log_file.write(line)
        if echo and PROGRESS.match(line):
            print(line, end="", flush=True)
    if proc.wait() != 0:
        log_file.flush()
        tail = Path(log_file.name).read_text(errors="replace").splitlines()[-60:]
        raise BuildError(f"{cmd[0]} failed (exit {proc.returncode}); last lines of {log_file.name}:\n"
                         + "\n".join(tail))


PROGRESS = re.compile(r"^\[\s*\d+%\] (Building|Linking)")


def cmake_build(source: Path, build_dir: Path, extra: list[str], targets: list[str], jobs: int) -> float:
    """Configure + build; the full compiler output (gcc 12 warns a lot in ggml's AVX-512 code) goes to
    <build_dir>/build.log, the progress lines to the terminal."""
    start = time.perf_counter()
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "build.log", "w") as log_file:
        _run_logged(["cmake", "-S", str(source), "-B", str(build_dir), *BASE_FLAGS, *cpu_flags(), *extra],
                    log_file, echo=False)
        _run_logged(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *targets],
                    log_file, echo=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["patched", "stock"], help="build one of the two (default both)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()

    for tool in ("cmake", "patch"):
        if shutil.which(tool) is None:
            raise BuildError(f"'{tool}' not found on PATH")
    if not (EXT_DIR / "atd.h").is_file():
        raise BuildError(f"{EXT_DIR}/atd.h missing")
    pristine = pristine_source()
    ensure_ccache()
    log("CPU features: " + " ".join(f[len("-DGGML_"):] for f in cpu_flags() if f.endswith("=ON")))

    if args.only in (None, "patched"):
        src = PATCHED / "src"
        n = sync_patched_tree(pristine, src)
        log(f"{src}: {'up to date' if n == 0 else f'{n} files written'} (pristine + {PATCH.relative_to(ROOT)})")
        took = cmake_build(src, PATCHED / "build", atd_flags(), PATCHED_TARGETS, args.jobs)
        log(f"patched build done in {took:.0f} s: binaries and libllama.so in {PATCHED / 'build' / 'bin'}")
    if args.only in (None, "stock"):
        took = cmake_build(pristine, STOCK / "build", [], STOCK_TARGETS, args.jobs)
        log(f"stock build done in {took:.0f} s: libllama.so in {STOCK / 'build' / 'bin'}")


if __name__ == "__main__":
    main()
