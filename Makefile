# Two commands for a newcomer: `make demo` and `make test`. Both install what they need.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist
PROTOS  := $(wildcard proto/fedmae/v1/*.proto)

.PHONY: demo test test-fast lint proto data clean wheels compose-test crash-resume bench bench-quick experiments privacy-eval

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

# Debian's Fashion-MNIST package: the default real data. Installed with apt where we can.
data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist); \
	  else \
	    echo "note: Fashion-MNIST not found at $(FMNIST); run 'sudo apt-get install dataset-fashion-mnist' or pass --data DIR"; \
	  fi; \
	fi

demo: $(STAMP) data
	$(BIN)/fedmae demo --clients 3 --rounds 5

# Everything: the unit and integration tests on one pytest-xdist worker per core, then
# the slow system tests one at a time (processes, kill -9 and restarts, timed answers:
# they stay as reliable on a busy machine as before). Both run even if the first fails.
test: $(STAMP) data
	$(BIN)/python -m pytest -q -n auto --dist worksteal -m "not slow"; fast=$$?; \
	$(BIN)/python -m pytest -q -m slow; slow=$$?; \
	test $$fast = 0 && test $$slow = 0

# Unit and integration tests without the slow system tests (processes, kill -9, demo, compose),
# one pytest-xdist worker per core (worksteal: an idle worker takes tests queued on another).
test-fast: $(STAMP) data
	$(BIN)/python -m pytest -q -n auto --dist worksteal -m "not slow" tests/unit tests/integration

# The docker compose cluster on a real Docker engine, offline (installs docker.io).
compose-test: $(STAMP) data
	$(BIN)/python scripts/compose_test.py

# 10 rounds surviving kill -9 of the aggregator (round 4) and of a client (round 7).
crash-resume: $(STAMP) data
	$(BIN)/python scripts/crash_resume.py

# Speed and memory against same-run baselines: docs/BENCHMARKS.md, benchmarks/results/.
bench: $(STAMP) data
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP) data
	$(BIN)/python -m benchmarks.run --quick

# Federated against centralized MAE, strategies, label skew, many sites, linear probes:
# docs/ML.md and its plots. About 1.5 h on this machine; not in CI. Resumable: a step
# whose result is in experiments-state/ is kept (delete it to run it again).
experiments: $(STAMP) data
	$(BIN)/python -m scripts.experiments

# Differential privacy's cost (utility at ε = 1, 4, 8), membership inference with and
# without it, and one poisoned site of five against every robust rule: docs/PRIVACY.md.
# About 1 h on this machine; not in CI. Resumable: a step whose result is in
# privacy-state/ is kept (delete it to run it again).
privacy-eval: $(STAMP) data
	$(BIN)/python -m scripts.privacy_eval

# Wheels for an offline image build (docker/wheels), from this machine's pip.
wheels: $(STAMP)
	$(BIN)/python scripts/compose_test.py wheels

# Style, and the layering contracts in pyproject.toml ([tool.importlinter]).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Regenerate fedmae/transport/_proto from proto/ (the committed code must match: tests/test_proto.py checks).
proto: $(STAMP)
	$(BIN)/python -m scripts.protogen

clean:
	rm -rf $(VENV) demo-state .pytest_cache
