# Two commands do all set-up on a fresh machine (Python 3.11 + pip):
#   make run    the whole pipeline on this machine (embedded broker)
#   make test   lint, type-check and the full test suite against a real broker
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test test-failover lint bench clean prometheus

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/spendstream run

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# the dashboard tests run every panel's PromQL on a real Prometheus (Debian's package)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
prometheus:
	@command -v prometheus >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

test: lint prometheus
	$(BIN)/pytest

# the failover tests alone: two workers, one killed mid-stream (also part of `make test`)
test-failover: install
	$(BIN)/pytest -m failover -s

bench: install
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/pricing.py
	$(BIN)/python bench/detect.py
	$(BIN)/python bench/cardinality.py
	$(BIN)/python bench/export.py

clean:
	rm -rf $(VENV) .venv-focus spendstream-data .pytest_cache .mypy_cache .ruff_cache
