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
IMAGE ?= kaleido:0.1.0
# checkov, the manifest linter of tests/test_k8s.py, in an environment of its own: it pins old networkx and dpath
# that the platform's environment must not get.
LINT_VENV ?= .cache/lint-venv

.PHONY: setup browser run stop test test-fast lint lint-env lock bench gpu-check image release \
	deploy-prod clean

setup: $(VENV)/.installed
	@$(BIN)/kaleido plots-offline >/dev/null  # `dvc plots show` with Vega inlined: no CDN (kaleido/platform/plots.py)

# Headless Chromium, only for the MLflow UI screenshot test (tests/test_e2e.py), so only on `make test`'s path: a
# Debian package, installed when missing and this is root (CI); otherwise that one test is skipped and says why.
# `make run` installs no system package and needs no root.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium for the UI screenshot test (log: .cache/apt-chromium.log)"; mkdir -p .cache; \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
	      >.cache/apt-chromium.log 2>&1 || { tail -20 .cache/apt-chromium.log; exit 1; }; \
	  else echo "note: no chromium and not root: the MLflow UI screenshot test will be skipped"; fi

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m pip install -q "uv==$(UV_VERSION)"
	test -x $(BIN)/python || $(UV) venv -q --python $(PYTHON) $(VENV)
	$(UV) pip sync -q --compile-bytecode --python $(BIN)/python requirements.lock
	$(UV) pip install -q --python $(BIN)/python --no-deps -e .
	touch $@

# The main job: local MLflow + Prefect server + `local` process worker, deploy prefect.yaml, run and watch
# kaleido/full (curate -> version -> train -> register -> evaluate -> gate -> promote) on the embedded default.
# The services this run started stop when it ends (`KEEP=1` keeps them; services you started with
# `kaleido platform up` are never stopped); `make stop` stops them after an interrupted run.
run: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/kaleido platform run $(if $(KEEP),--keep)

stop:
	@test -x $(BIN)/kaleido && $(BIN)/kaleido platform down || true

$(LINT_VENV)/.installed: k8s/lint/requirements.lock
	$(PYTHON) -m pip install -q "uv==$(UV_VERSION)"
	test -x $(LINT_VENV)/bin/python || $(UV) venv -q --python $(PYTHON) $(LINT_VENV)
	$(UV) pip sync -q --python $(LINT_VENV)/bin/python k8s/lint/requirements.lock
	touch $@

lint-env: $(LINT_VENV)/.installed

# Two pytest workers (pytest-xdist), each test file on one of them (--dist loadfile: a file's module fixtures, e.g.
# the shared training run or the registered version, are built once, and tests/test_e2e.py keeps its order). Every
# session fixture (the MLflow and Prefect servers, the tiny models) is per worker. tests/test_threads.py runs the
# kernel, model and data tests again under 1 and 2 threads. PYTEST_WORKERS=0 runs the suite in one process.
PYTEST_WORKERS ?= 2
test: setup browser lint lint-env
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=25

test-fast: setup lint-env
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow"

lint: setup
	$(BIN)/ruff check .

# bitsandbytes (pulled in by pyiqa, never used) is left out: diffusers imports it whenever it is installed,
# and on CPUs with AVX512-BF16 it then warns on every run ("Failed to load CPU gemm_4bit_forward from
# kernels-community"). `uv pip sync` installs exactly the lock, so it stays out.
lock:
	$(UV) pip compile -q requirements.in --python-version 3.11 --no-emit-package bitsandbytes -o requirements.lock

bench: setup
	$(BIN)/python benchmarks/dit_throughput.py

# First run on a lent GPU machine: GPU-only kernel tests, kernel benchmark, 1.3B training step and generation.
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

# The cluster image (Dockerfile): push it where the GPU nodes pull from and name it in params.yaml
# (train.kubernetes.image) and the work pool's `image` variable.
image:
	docker build -t $(IMAGE) --build-arg GIT_REVISION=$$(git rev-parse HEAD) .

# The release step: after pushing the images, pin their digests into the prod overlay (kustomization.yaml, and the
# kaleido image in params.yaml and work-pool-gpu.json): make release DIGESTS="kaleido=sha256:... postgres=sha256:..."
release: setup
	$(BIN)/kaleido release pin $(foreach d,$(DIGESTS),--image $(d))

# Deploy prod only once every image is pinned (`kaleido release check` refuses the all-zero UNRELEASED digests).
deploy-prod: setup
	$(BIN)/kaleido release check --overlay k8s/overlays/prod
	kubectl apply -k k8s/overlays/prod

clean:
	rm -rf artifacts runs .pytest_cache .platform
