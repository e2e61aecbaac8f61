# atd-gguf: `make demo` sets up and runs the main job; `make test` runs the tests.
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
BUILD   := build
FIXTURES := $(BUILD)/fixtures
DEMO_MODEL := $(FIXTURES)/smollm2-135m-instruct
STAMP   := $(VENV)/.installed
PYTHON_API_STAMP := $(VENV)/.python-api
# the pinned llama.cpp's sdist (scripts/llama_cpp_source.py downloads it)
LLAMA_CPP_PYTHON_SDIST := $(BUILD)/downloads/llama_cpp_python-0.3.36.tar.gz

.PHONY: install python-api fixtures llama-src llama demo test bench-fit bench-convert clean

$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard ggml-ext/*.c ggml-ext/*.h ggml-ext/build_ffi.py)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# the local CPU wheel: any other torch spec pulls GBs of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	# constraints.txt: the versions the tests last passed with, so a fresh install matches CI
	$(PY) -m pip install -q -c constraints.txt -e ".[reference,test]"
	touch $@

install: $(STAMP)

# llama-cpp-python's bindings without its llama.cpp build (LLAMA_BUILD=OFF): llama_cpp.Llama runs on the
# patched libllama of `make llama` (converter/python_api.py). --no-cache-dir: a cached wheel may bundle a stock build.
$(PYTHON_API_STAMP): $(STAMP) constraints.txt
	$(PY) scripts/llama_cpp_source.py >/dev/null
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PY) -m pip install -q --no-cache-dir -c constraints.txt \
		$(LLAMA_CPP_PYTHON_SDIST)
	touch $@

python-api: $(PYTHON_API_STAMP)

fixtures: llama-src
	$(PY) scripts/make_fixtures.py --out $(FIXTURES)

llama-src: install
	$(PY) scripts/llama_cpp_source.py

# llama.cpp with the ATD types (llama-patch/atd.patch + ggml-ext) and a stock build; docs/llama-plugin.md
llama: llama-src
	$(PY) scripts/build_llama.py

demo: fixtures llama
	$(VENV)/bin/atd-gguf convert $(DEMO_MODEL) -o $(BUILD)/demo-atd3.gguf --planes 3 --force
	$(VENV)/bin/atd-gguf inspect $(BUILD)/demo-atd3.gguf --summary
	$(VENV)/bin/atd-gguf run $(BUILD)/demo-atd3.gguf --chat -n 32 -p "What is the capital of Germany?"

test: fixtures llama python-api
	$(PY) -m pytest -q --durations=15

bench-fit: install
	$(PY) scripts/bench_fit.py

bench-convert: fixtures
	$(PY) scripts/bench_convert.py

clean:
	rm -rf $(BUILD)/demo-*.gguf .pytest_cache
