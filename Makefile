# The two commands a new machine needs: `make run` and `make test`. Both install into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install run test lint typecheck pytest bench eval clean

# xds-protos ships an old copy of opentelemetry-proto's modules (grpc/grpc#42926), and whichever of the two
# pip installs last owns opentelemetry/proto/: reinstalling opentelemetry-proto puts the current ones back.
OTEL_PROTO_VERSION = $$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')
REPAIR_OTEL_PROTO = $(BIN)/python -m pip install -q --force-reinstall --no-deps "opentelemetry-proto==$(OTEL_PROTO_VERSION)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(REPAIR_OTEL_PROTO)
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/extproc dev $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check extproc tests bench
	$(BIN)/ruff format --check extproc tests bench

typecheck: $(STAMP)
	$(BIN)/mypy extproc

pytest: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(REPAIR_OTEL_PROTO)
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

eval: $(STAMP)
	$(BIN)/python -m bench.eval $(ARGS)
