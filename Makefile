# Two commands do all set-up on a fresh machine (Python 3.11 + pip):
#   make run    the whole pipeline on this machine (embedded broker)
#   make test   lint, type-check and the full test suite against a real broker
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test test-failover lint bench clean prometheus nginx protos

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"  # the test extra includes `local`, the embedded broker
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

# the gateway tests run deploy/nginx/spendstream.conf in a real NGINX (Debian's package; run unprivileged by the test)
nginx:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends nginx >/dev/null; }

# whole test files on pytest-xdist workers, the slowest kinds first (tests/conftest.py) so that the quick unit files
# fill in at the end. More workers than cores: most tests wait on processes, windows and timeouts
TEST_WORKERS ?= 3
test: lint prometheus nginx
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# the failover tests alone: two workers, one killed mid-stream (also part of `make test`)
test-failover: install
	$(BIN)/pytest -m failover -s

bench: install
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/pricing.py
	$(BIN)/python bench/detect.py
	$(BIN)/python bench/cardinality.py
	$(BIN)/python bench/authz.py
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/export.py
	$(BIN)/python bench/floor.py

# regenerates the checked-in modules of the vendored Envoy ext_authz protos (pipeline/gateway/ext_authz/).
# protoc 31.1 (grpcio-tools 1.74.0) writes gencode 6.31.1, which every protobuf runtime our dependencies
# allow loads (googleapis-common-protos needs >=6.33.5; 7.x too); a newer grpcio-tools would demand a newer
# runtime, so it gets a venv of its own
PROTOC_VENV := .venv-protoc
protos:
	$(PYTHON) -m venv $(PROTOC_VENV)
	$(PROTOC_VENV)/bin/python -m pip install --quiet grpcio-tools==1.74.0 googleapis-common-protos==1.76.0
	$(PROTOC_VENV)/bin/python -m grpc_tools.protoc -I . \
	  -I "$$($(PROTOC_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	  --python_out=. pipeline/gateway/ext_authz/ext_authz.proto

clean:
	rm -rf $(VENV) $(PROTOC_VENV) .venv-focus spendstream-data .pytest_cache .mypy_cache .ruff_cache
