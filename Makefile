# The two commands of the README: `make demo` and `make test`. Each creates .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck unit install install-dev bench reliability clean collector jaeger \
	dev-stack

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/otel-zenml-analytics demo

lint: install-dev
	$(BIN)/ruff check otel_zenml_analytics tests bench

typecheck: install-dev
	$(BIN)/mypy

# The integration tests run the real Collector and Jaeger: build them first (once; the
# binaries are cached outside the repo, see scripts/build-collector and build-jaeger).
unit: install-dev collector jaeger
	$(BIN)/python -m pytest $(PYTEST_ARGS)

collector:
	scripts/build-collector

jaeger:
	scripts/build-jaeger

dev-stack: install collector jaeger
	OTEL_ZENML_ANALYTICS_BIN=$(BIN)/otel-zenml-analytics scripts/dev-stack

test: lint typecheck unit

# Every scenario of issue 5, ours against segment-analytics-python (6 to 9 minutes on 2
# cores, with the machine's load): writes bench/results.md and bench/results.png.
# BENCH_ARGS=--spool adds the delivery run with a spool (about a minute more).
# `python -m bench.run --tiny` is the seconds-long version `make test` runs.
bench: install-dev
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Every fault of issue 6 at full size (about 6 minutes): writes bench/reliability.md.
# RELIABILITY_ARGS=--quick runs the sizes of tests/test_faults.py and writes nothing.
reliability: install-dev collector
	$(BIN)/python -m bench.reliability $(RELIABILITY_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
