# Kaleido platform. `make run`: set up and run the main job; `make test`: set up and run the tests.
# Everything installs from the package registry into .venv with the exact versions of requirements.lock.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
UV_VERSION := 0.13.9
UV := $(PYTHON) -m uv
BIN := $(VENV)/bin
SAMPLES := artifacts/samples
PROMPT := "An astronaut plays with a cat next to a cup of coffee on a table"

.PHONY: setup run test test-fast lint lock bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m pip install -q "uv==$(UV_VERSION)"
	test -x $(BIN)/python || $(UV) venv -q --python $(PYTHON) $(VENV)
	$(UV) pip install -q --compile-bytecode --python $(BIN)/python -r requirements.lock
	$(UV) pip install -q --python $(BIN)/python --no-deps -e .
	touch $@

# The main job: the richest end-to-end path that exists (grows into the full Prefect flow).
run: setup
	$(BIN)/kaleido init-tiny
	$(BIN)/kaleido samples $(SAMPLES)
	$(BIN)/kaleido generate --prompt $(PROMPT) \
		--ref $(SAMPLES)/astronaut.png --ref $(SAMPLES)/chelsea.png --ref $(SAMPLES)/coffee.png \
		--out artifacts/generated/sample.mp4

test: setup lint
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

lock:
	$(UV) pip compile -q requirements.in --python-version 3.11 -o requirements.lock

bench: setup
	$(BIN)/python benchmarks/dit_throughput.py

clean:
	rm -rf artifacts runs .pytest_cache
