"""ATD files through llama-cpp-python's `llama_cpp.Llama`, on the patched libllama.

llama-cpp-python is installed without its own llama.cpp build (`make python-api`: the pinned
sdist with CMAKE_ARGS=-DLLAMA_BUILD=OFF) and binds with ctypes to whatever libllama the
LLAMA_CPP_LIB_PATH directory holds when `llama_cpp` is first imported. `load()` points that
variable at the patched build before the import, so the returned `Llama` runs ATD tensors:

    from converter.python_api import load
    llm = load("model-atd3.gguf", n_ctx=2048)
    llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], temperature=0)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import AtdError
from .model_check import check_runnable, explain_load_failure
from .run import bin_dir

# The bindings are generated for one llama.h; they must match the pinned llama.cpp
# (scripts/llama_cpp_source.py SDIST_VERSION), or calls go through mismatched structs.
PINNED_VERSION = "0.3.36"
LIB_PATH_ENV = "LLAMA_CPP_LIB_PATH"
MTMD_LIB_ENV = "MTMD_CPP_LIB"  # llama-cpp-python's multimodal helper library, built next to libllama
INSTALL_HINT = "run `make python-api` (llama-cpp-python 0.3.36 without a second llama.cpp build)"


def library_dir() -> Path:
    """The directory with the patched libllama.so: LLAMA_CPP_LIB_PATH if set, else the patched build."""
    override = os.environ.get(LIB_PATH_ENV)
    directory = Path(override or bin_dir())
    if not (directory / "libllama.so").is_file():
        if override:
            raise AtdError(f"{LIB_PATH_ENV}={override} holds no libllama.so: point it at the patched build "
                           f"({bin_dir()}) or unset it")
        raise AtdError(f"the patched llama.cpp is not built ({directory / 'libllama.so'} missing): "
                       "run `make llama` first")
    return directory


def import_llama_cpp():
    """Import `llama_cpp` bound to the patched libllama; returns the module."""
    directory = library_dir()
    already = sys.modules.get("llama_cpp.llama_cpp")
    if already is not None:
        # the library is loaded once per process: a stock one cannot read ATD tensors
        loaded = Path(getattr(already, "_base_path", "")).resolve()
        if loaded != directory.resolve():
            raise AtdError(f"llama_cpp was imported with the libllama in {loaded}, not the patched one in "
                           f"{directory}; it loads once per process: call load() before importing llama_cpp, or start "
                           f"Python with {LIB_PATH_ENV}={directory}")
    os.environ[LIB_PATH_ENV] = str(directory)
    os.environ.setdefault(MTMD_LIB_ENV, str(directory))
    try:
        import llama_cpp
    except ModuleNotFoundError as e:
        if e.name != "llama_cpp":
            raise
        raise AtdError(f"llama-cpp-python is not installed: {INSTALL_HINT}") from None
    except (OSError, RuntimeError) as e:
        raise AtdError(f"llama-cpp-python could not load {directory / 'libllama.so'}: {e}") from None
    if llama_cpp.__version__ != PINNED_VERSION:
        raise AtdError(f"llama-cpp-python {llama_cpp.__version__} is installed, but the patched llama.cpp is "
                       f"the one of {PINNED_VERSION}: {INSTALL_HINT}")
    return llama_cpp


def load(model: str | Path, **llama_options):
    """A `llama_cpp.Llama` on MODEL (an ATD or stock GGUF) running in the patched libllama.

    llama_options go to `Llama(...)` (n_ctx, n_threads, seed, chat_format, ...). Defaults that
    differ from Llama's: verbose=False (llama.cpp's load log stays off stderr) and flash_attn=True,
    what llama.cpp's own tools pick on CPU ("auto"), so greedy output equals `atd-gguf run`'s.
    """
    model = Path(model)
    check_runnable(model)  # what libllama would abort on, refused in one line
    llama_cpp = import_llama_cpp()
    llama_options.setdefault("verbose", False)
    llama_options.setdefault("flash_attn", True)
    try:
        return llama_cpp.Llama(model_path=str(model), **llama_options)
    except ValueError as e:  # llama_cpp's "Failed to load model from file"
        raise explain_load_failure(model, "llama.cpp", str(e)) from None
