# Two entry points: `make serve` (a demo server) and `make test` (the whole check).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev,uvloop]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/gaspar serve examples.demo:handler --host 127.0.0.1 --port 10123

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy gaspar

test: lint
	$(BIN)/pytest

$(VENV)/.installed-bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,uvloop,bench]'
	touch $@

# The benchmark suite (about 15 minutes): writes docs/benchmarks.md and docs/benchmarks.png.
bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/suite.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
