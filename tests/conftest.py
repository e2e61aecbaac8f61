"""Shared pytest fixtures: the built checkpoints, the pinned llama.cpp source, cached GGUFs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def llama_cpp_src() -> Path:
    return _load_script("llama_cpp_source").ensure_source()


@pytest.fixture(scope="session")
def fixture_dirs(llama_cpp_src) -> dict[str, Path]:
    return _load_script("make_fixtures").build_fixtures(ROOT / "build" / "fixtures", llama_cpp=llama_cpp_src)


@pytest.fixture(scope="session")
def smollm2_dir(fixture_dirs) -> Path:
    return fixture_dirs["smollm2-135m-instruct"]


@pytest.fixture(scope="session")
def llama3_dir(fixture_dirs) -> Path:
    return fixture_dirs["llama3-tiny"]


@pytest.fixture(scope="session")
def smollm2_continuous_dir(fixture_dirs) -> Path:
    """SmolLM2 with each Q4_1 weight moved uniformly within its bin (not on any stock grid)."""
    return fixture_dirs["smollm2-135m-continuous"]


@pytest.fixture(scope="session")
def reference_gguf(llama_cpp_src, tmp_path_factory):
    """llama.cpp's convert_hf_to_gguf.py output for (model dir, outtype), cached per session."""
    cache: dict[tuple[Path, str], Path] = {}
    out_dir = tmp_path_factory.mktemp("reference")

    def convert(model: Path, outtype: str) -> Path:
        key = (model, outtype)
        if key not in cache:
            out = out_dir / f"{model.name}-{outtype}.gguf"
            env = dict(os.environ, NO_LOCAL_GGUF="")  # the script puts its own gguf-py first
            env.pop("NO_LOCAL_GGUF")
            subprocess.run([sys.executable, str(llama_cpp_src / "convert_hf_to_gguf.py"), str(model),
                            "--outfile", str(out), "--outtype", outtype],
                           check=True, capture_output=True, env=env)
            cache[key] = out
        return cache[key]

    return convert
