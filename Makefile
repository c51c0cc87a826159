# The two commands a new machine needs: `make run` and `make test`. Both install into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install run test test-fast lint typecheck pytest browser redis-server wrk bench eval soak clean lock proto

# Every install comes from the lock (uv.lock, exported to requirements/*.txt with hashes), through
# requirements/install.sh, which also repairs the opentelemetry-proto files that xds-protos overwrites.
INSTALL_LOCK = PYTHON=$(BIN)/python sh requirements/install.sh
TOOLS_STAMP := $(VENV)/.tools-stamp

$(TOOLS_STAMP): requirements/tools.txt requirements/install.sh
	@echo "Installing the locked dependencies into $(VENV) (once; about half a minute)..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "extproc is \
	  tested on Python 3.11: rm -rf $(VENV), then run make with PYTHON=python3.11"; exit 1; }
	$(INSTALL_LOCK) requirements/tools.txt
	@touch $(TOOLS_STAMP)

$(STAMP): $(TOOLS_STAMP) pyproject.toml requirements/dev.txt
	@echo "Installing requirements/dev.txt (runtime, tests, types, lint) and extproc itself..."
	$(INSTALL_LOCK) requirements/dev.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/extproc dev $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check extproc tests bench
	$(BIN)/ruff format --check extproc tests bench

typecheck: $(STAMP)
	$(BIN)/mypy extproc

# The approval store tests run a real redis-server (tests/redis_fixture.py starts one per test session
# on a free port). When it is not on PATH, Debian's package is installed, once, showing the commands; apt
# waits up to five minutes for another install holding its lock instead of failing at once.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_GET = $(strip $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300)
redis-server:
	@command -v redis-server >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "The tests need redis-server on PATH (Debian: apt-get \
	    install redis-server; macOS: brew install redis)"; exit 1; }; \
	  echo "redis-server is not on PATH; the approval store tests need it. Installing Debian's package:"; \
	  set -x; $(APT_GET) update -qq && $(APT_GET) install -y -qq --no-install-recommends redis-server; }

pytest: $(STAMP) redis-server browser wrk
	$(BIN)/pytest -q $(PYTEST_ARGS)

# The approval page's tests drive a real headless Chromium over the DevTools protocol: Debian's package,
# installed once when it is missing (as root directly, otherwise through sudo).
browser:
	@command -v chromium >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "The tests need chromium on PATH (Debian: apt-get install \
	    chromium)"; exit 1; }; \
	  echo "chromium is not on PATH; the approval page tests need it. Installing Debian's package:"; \
	  set -x; $(APT_GET) update -qq && $(APT_GET) install -y -qq --no-install-recommends chromium; }

# The proxy benchmark drives its load with wrk (a C load generator: a Python client on the same two CPUs
# would measure itself), Debian's package, installed once when it is missing.
wrk:
	@command -v wrk >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "The proxy benchmark needs wrk on PATH (Debian: apt-get \
	    install wrk; macOS: brew install wrk)"; exit 1; }; \
	  echo "wrk is not on PATH; the proxy benchmark needs it. Installing Debian's package:"; \
	  set -x; $(APT_GET) update -qq && $(APT_GET) install -y -qq --no-install-recommends wrk; }

test: lint typecheck pytest

# The quick loop while editing: the tests that start no process (no Envoy, Redis, Chromium or command)
# and are not slow, in a few minutes where `make test` takes much longer. tests/markers.py says how a test
# is marked; `make test` still runs every test.
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "unit and not slow" $(PYTEST_ARGS)

BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP) requirements/bench.txt
	$(INSTALL_LOCK) requirements/bench.txt
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) wrk redis-server
	$(BIN)/python -m bench $(ARGS)

# The Python modules of proto/*.proto, committed beside the code that uses them (the runtime needs no
# compiler); tests/test_proto.py fails when they differ from what this writes.
proto: $(STAMP)
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

# Mixed traffic at a steady rate for 10 minutes (not part of `make test`): latency and memory per minute,
# every unexpected outcome; the exit status says whether the bar held. `make soak ARGS="--minutes 30"`.
soak: $(STAMP)
	$(BIN)/python -m bench.soak $(ARGS)

eval: $(STAMP)
	$(BIN)/python -m bench.eval $(ARGS)

# Refresh the lock: every package to its newest release that pyproject.toml allows (the way upgrades
# arrive), then the exported files the installs read. `make lock LOCK_ARGS=` re-locks after an edit of
# pyproject.toml and keeps the other pins; `LOCK_ARGS="--upgrade-package NAME"` moves one package.
LOCK_ARGS ?= --upgrade
UV_EXPORT = $(BIN)/uv export --quiet --frozen --no-emit-project --no-default-groups
lock: $(TOOLS_STAMP)
	$(BIN)/uv lock --quiet --python $(BIN)/python $(LOCK_ARGS)
	$(UV_EXPORT) --output-file requirements/runtime.txt
	$(UV_EXPORT) --extra dev --output-file requirements/dev.txt
	$(UV_EXPORT) --extra dev --extra bench --output-file requirements/bench.txt
	$(UV_EXPORT) --only-group tools --output-file requirements/tools.txt
