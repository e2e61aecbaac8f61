"""ATD files through llama-cpp-python's `llama_cpp.Llama` (converter/python_api.py, `make python-api`).

The reference is `atd-gguf run` (the patched llama-completion binary): the same file, prompt and
greedy decoding must give the same tokens through the Python bindings.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from atd_models import shared_smollm2_atd3
from converter.errors import AtdError
from converter.python_api import LIB_PATH_ENV, PINNED_VERSION, import_llama_cpp, load
from converter.run import bin_dir, clean_output
from test_convert import run_cli

ROOT = Path(__file__).resolve().parent.parent
N_PREDICT = 24
THREADS = 1  # the CI machine has 2 cores; one thread per process keeps ggml's spinning threads off each other


@pytest.fixture(scope="module")
def atd3_gguf(tmp_path_factory, smollm2_dir) -> Path:
    return shared_smollm2_atd3(tmp_path_factory, smollm2_dir)


@pytest.fixture(scope="module")
def llm(atd3_gguf):
    return load(atd3_gguf, n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS, seed=42)


def _run_cli_text(model: Path, prompt: str, *extra: str) -> str:
    result = run_cli("run", model, "-p", prompt, "-n", str(N_PREDICT), "-t", str(THREADS), *extra)
    assert result.exit_code == 0, result.output
    return result.stdout.rstrip("\n")  # click.echo's newline


def test_bindings_are_the_pinned_version_on_the_patched_library(llm):
    llama_cpp = import_llama_cpp()
    spec = importlib.util.spec_from_file_location("llama_cpp_source", ROOT / "scripts" / "llama_cpp_source.py")
    source = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(source)
    assert llama_cpp.__version__ == PINNED_VERSION == source.SDIST_VERSION
    # installed without its own llama.cpp build: no library inside the package
    assert list((Path(llama_cpp.__file__).parent / "lib").glob("*.so*")) == []
    loaded = {Path(line.split()[-1]) for line in Path("/proc/self/maps").read_text().splitlines()
              if line.rstrip().endswith(".so") or ".so." in line}
    assert (bin_dir() / "libllama.so").resolve() in {p.resolve() for p in loaded if p.name.startswith("libllama")}


@pytest.mark.parametrize("prompt", ["Once upon a time", "def fibonacci(n):\n    if n <"])
def test_greedy_tokens_equal_atd_gguf_run(llm, atd3_gguf, prompt):
    llm.reset()  # no reuse of an earlier prompt's cache: the prompt is evaluated as one batch, as in run
    tokens = []
    for token in llm.generate(llm.tokenize(prompt.encode(), add_bos=True, special=True), temp=0.0, top_k=1):
        tokens.append(token)
        if len(tokens) == N_PREDICT:
            break
    reference = _run_cli_text(atd3_gguf, prompt)
    assert clean_output(llm.detokenize(tokens).decode("utf-8")) == reference
    # token by token: run prints text, whose tokenization is a prefix of ours up to trailing whitespace
    # (run strips it)
    reference_tokens = llm.tokenize(reference.encode(), add_bos=False, special=False)
    assert len(reference_tokens) >= N_PREDICT - 4
    assert tokens[:len(reference_tokens)] == reference_tokens
    assert llm.detokenize(tokens[len(reference_tokens):]).strip() == b""


def test_chat_completion_equals_atd_gguf_run_chat(llm, atd3_gguf):
    llm.reset()
    question = "What is the capital of Germany?"
    answer = llm.create_chat_completion(messages=[{"role": "user", "content": question}], temperature=0.0,
                                        max_tokens=N_PREDICT)["choices"][0]["message"]["content"]
    assert answer.strip() == _run_cli_text(atd3_gguf, question, "--chat")
    assert "Berlin" in answer


def test_load_refuses_bad_files_with_one_line(tmp_path, atd3_gguf):
    with pytest.raises(AtdError, match="no such file"):
        load(tmp_path / "nope.gguf")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model\n")
    with pytest.raises(AtdError, match="not a GGUF file"):
        load(not_gguf)
    # llama.cpp refuses it; the message names the defect, not just "failed to load"
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(atd3_gguf.read_bytes()[: atd3_gguf.stat().st_size // 2])
    with pytest.raises(AtdError, match="not a readable GGUF file .*not within the file") as caught:
        load(truncated)
    assert "\n" not in str(caught.value)


def test_load_without_build_names_make_llama(tmp_path, atd3_gguf, monkeypatch):
    monkeypatch.delenv(LIB_PATH_ENV, raising=False)
    monkeypatch.setenv("ATD_LLAMA_BIN_DIR", str(tmp_path))
    with pytest.raises(AtdError, match="make llama"):
        load(atd3_gguf)
