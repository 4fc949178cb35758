# `make demo` and `make test` bootstrap .venv from nothing (python3.11 venv + pip, no uv/poetry).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=
# benchmarks/run_all.py options for `make bench`, e.g. BENCH_ARGS=--full or BENCH_ARGS=--resume
BENCH_ARGS ?=
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv demo test bench clean tools

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m crosssim.demo --out $(DEMO_DIR)

# report.html is checked in headless Chromium (tests/test_report.py); install it where apt-get exists.
tools:
	@test -x $(CHROMIUM) || ! command -v apt-get >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

test: $(STAMP) tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache
