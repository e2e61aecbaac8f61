#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source: vendor/llama.cpp of the PyPI sdist llama-cpp-python==0.3.36.

The sdist is downloaded with pip (the only network here is the package registries), checked
against a pinned sha256, and unpacked once into build/llama.cpp-src. Prints the source path.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"  # vendors llama.cpp commit 0c1e570 (ggml 0.25.3)
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR_PREFIX = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_sdist(downloads: Path) -> Path:
    sdist = downloads / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not sdist.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", SDIST_NAME,
                        f"{SDIST_NAME}=={SDIST_VERSION}", "-d", str(downloads)],
                       check=True, stdout=subprocess.DEVNULL)
    if sha256_file(sdist) != SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 mismatch; refusing an unpinned llama.cpp source")
    return sdist


def ensure_source(build: Path = ROOT / "build") -> Path:
    """The unpacked pinned llama.cpp tree (idempotent)."""
    dest = build / "llama.cpp-src"
    if (dest / ".complete").is_file():
        return dest
    sdist = fetch_sdist(build / "downloads")
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp-src.", dir=build))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(VENDOR_PREFIX) and "/.git/" not in m.name:
                    m.name = m.name[len(VENDOR_PREFIX):]
                    members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        (tmp / ".complete").write_text(f"{SDIST_NAME}=={SDIST_VERSION}\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=ROOT / "build", help="cache directory (default: build/)")
    print(ensure_source(parser.parse_args().build))


if __name__ == "__main__":
    main()
