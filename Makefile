# One-command set-up: every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench lint typecheck clean

$(VENV)/.dev: requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.bench: $(VENV)/.dev requirements-bench.txt
	$(PY) -m pip install -q -r requirements-bench.txt
	touch $@

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check astage tests benchmarks
	$(VENV)/bin/ruff format --check astage tests benchmarks

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy

test: lint typecheck
	$(PY) -m pytest -q

demo: $(VENV)/.dev
	$(PY) -m benchmarks.demo

bench: $(VENV)/.bench
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
