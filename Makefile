# Two entry points: `make serve` (a demo server) and `make test` (the whole check).
# Each needs only Python 3 and make: it creates a virtual environment on first use.
#
# PYTHON picks the interpreter and the environment follows it: `.venv` for the default
# python3, `.venv-3.10` for `make test PYTHON=python3.10`, and so on.
PYTHON ?= python3
PYTHON_NAME := $(notdir $(PYTHON))
VENV ?= $(if $(filter python python3,$(PYTHON_NAME)),.venv,.venv-$(patsubst python%,%,$(PYTHON_NAME)))
BIN := $(VENV)/bin
# What serving needs (the package and uvloop), and what the check needs on top of it.
SERVE_STAMP := $(VENV)/.installed-serve
DEV_STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install serve test lint pytest haproxy bench torture clean

install: $(DEV_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[uvloop]'
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,uvloop]'
	touch $@

serve: $(SERVE_STAMP)
	$(BIN)/gaspar serve examples.demo:handler --host 127.0.0.1 --port 10123

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy gaspar

# The test suite alone (CI runs it on each interpreter; lint runs once).
pytest: $(DEV_STAMP)
	$(BIN)/pytest

# HAProxy for tests/test_haproxy.py: Debian's package, installed only when it is missing and we
# are root (a container, CI); otherwise nothing happens. It never fails the build: without the
# binary that test skips and says why.
haproxy:
	@if command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing haproxy with apt-get"; \
		log=$$(mktemp); \
		if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends haproxy) >"$$log" 2>&1; then \
			tail -n 3 "$$log"; echo "haproxy not installed: tests/test_haproxy.py will skip"; \
		fi; \
		rm -f "$$log"; \
	fi

test: lint haproxy pytest

$(BENCH_STAMP): $(SERVE_STAMP) benchmarks/requirements.txt
	$(BIN)/python -m pip install --quiet -r benchmarks/requirements.txt
	touch $@

# The benchmark suite (about 20 minutes): writes docs/benchmarks.md and docs/benchmarks.png.
bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/suite.py $(BENCH_ARGS)

# The adversarial suite at full size (about 3 minutes): chaos, fuzz, soak, slow clients,
# reload under load. `make test` runs the same checks bounded; the figures each prints
# ("torture: ...") are those of docs/reliability.md. TORTURE_ARGS go to pytest (e.g. -k soak).
torture: $(DEV_STAMP)
	GASPAR_TORTURE=full $(BIN)/pytest -m torture tests/test_torture.py tests/test_fuzz.py $(TORTURE_ARGS)

clean:
	rm -rf .venv .venv-* build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
