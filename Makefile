# One-command set-up: every target creates the virtual environment it needs.
# Each step prints one line; pip's own output goes to $(VENV)/install.log.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check --no-input

.PHONY: test stress demo bench lint typecheck clean

# pip's whole output goes to $(INSTALL_LOG); when pip fails, the end of the log is printed.
INSTALL_LOG = $(VENV)/install.log
LOGGED = >>$(INSTALL_LOG) 2>&1 || { echo "pip failed; the end of $(INSTALL_LOG):"; tail -n 30 $(INSTALL_LOG); exit 1; }

$(VENV)/.dev: requirements-dev.txt pyproject.toml
	@echo "venv:      $(VENV) ($$($(PYTHON) --version))"
	@$(PYTHON) -m venv $(VENV)
	@: >$(INSTALL_LOG)
	@echo "install:   pip, then requirements-dev.txt (torch $$(grep '^torch==' requirements-dev.txt | cut -d= -f3)); pip's output: $(INSTALL_LOG)"
	@$(PIP) --upgrade pip $(LOGGED)
	@$(PIP) -r requirements-dev.txt $(LOGGED)
	@echo "install:   astage (editable)"
	@$(PIP) --no-deps -e . $(LOGGED)
	@touch $@

$(VENV)/.bench: $(VENV)/.dev requirements-bench.txt
	@echo "install:   requirements-bench.txt; pip's output: $(INSTALL_LOG)"
	@$(PIP) -r requirements-bench.txt $(LOGGED)
	@touch $@

lint: $(VENV)/.dev
	@echo "ruff:      check"
	@$(VENV)/bin/ruff check -q astage tests benchmarks
	@echo "ruff:      format --check"
	@$(VENV)/bin/ruff format -q --check astage tests benchmarks

typecheck: $(VENV)/.dev
	@echo "mypy:      strict over astage, tests and benchmarks (pyproject.toml [tool.mypy])"
	@$(VENV)/bin/mypy

test: lint typecheck
	@echo "pytest:    asyncio, uvloop and trio legs"
	@$(PY) -m pytest -q

# make demo DEMO_ARGS="--backend trio --steps 8": the options of python -m benchmarks.demo --help
DEMO_ARGS ?=
stress: $(VENV)/.dev
	@echo "pytest:    the stress tests (-m stress: 50 kills of a saving process, ...)"
	@$(PY) -m pytest -q -m stress

demo: $(VENV)/.dev
	@echo "demo:      train, checkpoint, kill -9, resume, vs DCP (python -m benchmarks.demo$(if $(DEMO_ARGS), $(DEMO_ARGS)))"
	@$(PY) -m benchmarks.demo $(DEMO_ARGS)

bench: $(VENV)/.bench
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
