"""cffi (API mode) builder for gguf_types._atd_c: every ggml-ext/*.c file, compiled at install time.

setup.py names it as `cffi_modules=["ggml-ext/build_ffi.py:ffibuilder"]`; it can also be run
directly (`python ggml-ext/build_ffi.py`) to build the module in place next to gguf_types/.
The same .c files compile unchanged into the patched llama.cpp (with ATD_IN_GGML defined).
"""

from __future__ import annotations

import glob
import os
import shlex
import subprocess

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def header_cdef() -> str:
    """atd.h's declarations for cffi: the C preprocessor expands its macros (which cffi cannot parse)."""
    cc = shlex.split(os.environ.get("CC") or "cc")
    result = subprocess.run([*cc, "-E", "-P", "-DATD_CFFI_CDEF", "-x", "c", os.path.join(HERE, "atd.h")],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"preprocessing ggml-ext/atd.h failed:\n{result.stderr}")
    # the static asserts expand to lone semicolons
    lines = result.stdout.splitlines()
    return "\n".join(line for line in lines if line.strip() not in ("", ";") and not line.startswith("#"))


# exactness: no FMA contraction, no fast-math; no -march=native (the wheel must run anywhere;
# the SIMD paths are chosen at run time)
EXTRA_COMPILE_ARGS = ["-std=gnu11", "-O3", "-ffp-contract=off", "-fno-fast-math", "-pthread"]


def _sources(relative: bool) -> list[str]:
    # setuptools (pip) wants them relative to the project root; a direct build wants absolute paths
    found = sorted(glob.glob(os.path.join(HERE, "*.c")))
    return [os.path.relpath(p, ROOT) for p in found] if relative else found


def make_builder(relative_sources: bool) -> FFI:
    builder = FFI()
    builder.cdef(header_cdef())
    builder.set_source(
        "gguf_types._atd_c",
        '#include "atd.h"\n',
        sources=_sources(relative_sources),
        include_dirs=[HERE],
        extra_compile_args=EXTRA_COMPILE_ARGS,
        extra_link_args=["-pthread"],
        libraries=["pthread"],
    )
    return builder


ffibuilder = make_builder(relative_sources=os.getcwd() == ROOT)

if __name__ == "__main__":
    import shutil

    so = make_builder(relative_sources=False).compile(tmpdir=os.path.join(ROOT, "build", "cffi"), verbose=True)
    shutil.copy2(so, os.path.join(ROOT, "gguf_types", os.path.basename(so)))
