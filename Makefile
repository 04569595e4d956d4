# model-sandbox: `make demo` and `make test` do all the set-up on a fresh Debian machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help venv engine browser image demo test test-unit lint docs clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@# bytecode now, as a wheel's install does: an editable install compiles on first import, or
	@# never where PYTHONDONTWRITEBYTECODE is set, and every new process then pays ~0.1 s
	$(BIN)/python -m compileall -q sandbox policies
	touch $@

venv: $(STAMP) ## create .venv and install the package with its dev tools

engine: ## install and start a Docker engine if none is reachable (Debian, root)
	@scripts/ensure-docker.sh

browser: ## install Debian's chromium for the HTML report's browser test unless one is there (root)
	@scripts/ensure-chromium.sh

image: venv engine ## build the worker image (offline) and the bwrap runner's root filesystem, unless up to date
	$(BIN)/model-sandbox image build --runner docker
	$(BIN)/model-sandbox image build --runner bwrap

demo: image ## convert a benign and a hostile checkpoint that the demo generates
	$(BIN)/python examples/demo.py

# The suite runs in TEST_JOBS processes (pytest-xdist), then the tests
# marked `serial` alone on the engine (they kill processes that own containers). Exit code 5 of a
# part: PYTEST_ARGS selected none of its tests.
TEST_JOBS ?= 2

test: image browser ## the whole suite, container tests included (TEST_JOBS=2 processes, then the serial tests)
	$(BIN)/python -m pytest -n $(TEST_JOBS) -m "not serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-unit: venv ## tests that need no Docker engine
	$(BIN)/python -m pytest tests/unit tests/property $(PYTEST_ARGS)

lint: venv ## ruff (lint and format check) and mypy --strict (the tests too)
	$(BIN)/ruff check sandbox tests examples benchmarks
	$(BIN)/ruff format --check sandbox tests examples benchmarks
	$(BIN)/mypy sandbox tests

docs: venv ## regenerate docs/rules.md from the rule table (sandbox/rules.toml)
	$(BIN)/python -m sandbox._rules > docs/rules.md

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
