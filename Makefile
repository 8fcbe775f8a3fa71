# The two commands of the README: `make run` (set up and start) and `make test` (set up and test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
HOST ?= 127.0.0.1

.PHONY: run test sandbox-deps install install-dev lint typecheck unit integration integration-pg openapi bench bench-api wrk clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

# The worker sandbox needs bubblewrap, and its network guard nftables (docs/SANDBOX.md): installed from Debian/Ubuntu packages
# when run as root, else the server says why workers cannot start (or set ORCHESTRATOR_SANDBOX=off).
sandbox-deps:
	@{ command -v bwrap && { command -v nft || [ -x /usr/sbin/nft ]; }; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing bubblewrap and nftables (the worker sandbox and its network guard)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap nftables >/dev/null; \
	  else \
	    echo "install bubblewrap and nftables (apt-get install bubblewrap nftables) or workers will not start"; \
	  fi; }

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## Set up and start API + engine on :$(PORT) with embedded SQLite.
run: install sandbox-deps
	@HOST=$(HOST) PORT=$(PORT) $(BIN)/orchestrator token --hint
	$(BIN)/orchestrator serve --host $(HOST) --port $(PORT)

## Set up and run every check and test (SQLite, then PostgreSQL).
test: install-dev sandbox-deps
	bash scripts/test.sh

lint: install-dev
	$(BIN)/ruff check orchestrator tests scripts bench
	$(BIN)/ruff format --check orchestrator tests scripts bench

typecheck: install-dev
	$(BIN)/mypy orchestrator

openapi: install
	$(BIN)/orchestrator openapi > openapi.json

bench: install-dev
	$(BIN)/python bench/engine.py

## wrk, the native load generator bench/api.py drives (Debian package).
wrk:
	@command -v wrk >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk)

bench-api: install-dev wrk
	$(BIN)/python bench/api.py

clean:
	rm -rf $(VENV) .orchestrator .pytest_cache .mypy_cache .ruff_cache htmlcov
