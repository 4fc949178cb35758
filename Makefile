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
DOCKER ?= docker
DOCKER_IMAGE ?= crosssim:smoke
# `make docker-smoke`: tiny sites (16 images of 32 px each), one round, one local epoch, inside the image
SMOKE_SETS := --set image-size=32 --set batch-size=8 --set local-epochs=1 --set min-count=2 --set augment=false

.PHONY: venv demo test test-faults bench bench-system clean tools docker-smoke

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

# make test: every test but the fault injections (minutes of waiting on Flower's 60 s node-offline detection);
# CI (.ci/run) runs both. PYTEST_ARGS='-m ""' runs everything at once.
test: $(STAMP) tools
	$(BIN)/python -m pytest -m "not faults" $(PYTEST_ARGS)

test-faults: $(STAMP)
	$(BIN)/python -m pytest -m faults $(PYTEST_ARGS)

# make bench: the methods (accuracy, few-shot); make bench-system: round overhead, load and serving (a quiet machine)
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

bench-system: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/run_all.py --system $(BENCH_ARGS)

# Needs a Docker engine (tests/test_docker.py checks docker/ by parsing, without one): builds docker/Dockerfile,
# then in the image: --help, synth, a 1-round simulate of two hospitals, evaluate of the target.
docker-smoke:
	@command -v $(DOCKER) >/dev/null || \
		{ echo "docker-smoke: no Docker engine on this machine (docker not found)"; exit 1; }
	@$(DOCKER) info >/dev/null 2>&1 || \
		{ echo "docker-smoke: no Docker engine on this machine (daemon not reachable)"; exit 1; }
	$(DOCKER) build -f docker/Dockerfile -t $(DOCKER_IMAGE) .
	$(DOCKER) run --rm $(DOCKER_IMAGE) --help >/dev/null
	$(DOCKER) run --rm --shm-size=1g --entrypoint sh $(DOCKER_IMAGE) -ec '\
		crosssim synth /tmp/sites --images-per-site 16 --image-size 32; \
		crosssim simulate --sites /tmp/sites/hospital-a /tmp/sites/hospital-b --rounds 1 --out /tmp/run \
			--cache /tmp/cache $(SMOKE_SETS); \
		crosssim evaluate --checkpoint /tmp/run/final.pt --data /tmp/sites/target --out /tmp/target \
			--cache /tmp/cache --adapt adabn; \
		test -s /tmp/target/metrics.json'
	@echo "docker-smoke: ok ($(DOCKER_IMAGE))"

clean:
	rm -rf runs .pytest_cache
