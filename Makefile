# Everything runs from .venv (Python >= 3.12, pinned dependencies).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Find a Python >= 3.12: PYTHON=..., python3.13/3.12 on PATH, or pyenv's.
PYTHON ?= $(shell for p in python3.13 python3.12 $$HOME/.pyenv/versions/3.13*/bin/python3 $$HOME/.pyenv/versions/3.12*/bin/python3 /root/.pyenv/versions/3.12*/bin/python3 python3; do \
	  if command -v $$p >/dev/null 2>&1 && PYENV_VERSION= $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then command -v $$p; break; fi; done)

# Codex CLI for the end-to-end tests (tests/test_codex_e2e.py), from npm into .tools/.
CODEX_VERSION := 0.171.0
CODEX_STAMP := .tools/.codex-$(CODEX_VERSION)
CODEX_BIN := .tools/node_modules/.bin/codex

.PHONY: install run test bench lint clean codex

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -n "$(PYTHON)" || { echo "error: Python >= 3.12 not found; install it or run make PYTHON=/path/to/python3.12"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

run: install
	$(PY) -m addon run

codex:
	@if [ ! -x $(CODEX_BIN) ] || [ ! -f $(CODEX_STAMP) ]; then mkdir -p .tools && rm -f .tools/.codex-*; \
	  if command -v npm >/dev/null 2>&1 && npm install --prefix .tools --no-audit --no-fund --silent @openai/codex@$(CODEX_VERSION); \
	  then touch $(CODEX_STAMP); else echo "warning: could not install @openai/codex@$(CODEX_VERSION); Codex tests will be skipped"; fi; fi

test: install codex
	$(PY) -m ruff check addon tests bench
	$(PY) -m mypy
	$(PY) -m pytest $(PYTEST_ARGS)

# Throughput, time to first streamed chunk and memory against plain mitmdump;
# then the soak run (bench/soak.py) when present.
bench: install
	$(PY) bench/bench.py $(BENCH_ARGS)
	$(PY) bench/redis_scenario.py $(REDIS_BENCH_ARGS)
	@if [ -f bench/soak.py ]; then $(PY) bench/soak.py $(SOAK_ARGS); fi

# The same checks as `make test` runs before the suite (the code is formatted by hand, not by ruff format).
lint: install
	$(PY) -m ruff check addon tests bench
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
