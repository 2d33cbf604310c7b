# Vanishing-gradient study: `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check
# Two dependency groups: runtime (requirements.lock: repro, sweep, ui) and development
# (requirements-dev.lock: tests, lint, browser and PostgreSQL drivers, JAX), each with its stamp.
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# Stages run `python -m pipeline...`: put the project's interpreter first.
export PATH := $(BIN):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2
HOST ?= 127.0.0.1
PORT ?= 5000
PYTEST_ARGS ?=
# Test files run in parallel (pytest-xdist), a whole file per worker, so that a file's
# module fixtures (a Ray cluster, a repro'd study) start once. TEST_JOBS=0: one process.
TEST_JOBS ?= auto
PYTEST := $(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile

.PHONY: help venv venv-dev repro test test-fast lint format ui server bench jax lock clean
BENCH_ARGS ?= --depth 4 --replicates 1 --epochs 4 --rounds 3

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements.lock
	@touch $(STAMP)

# On top of the runtime group, whose pins it must keep (-c).
$(DEV_STAMP): $(STAMP) requirements-dev.lock
	$(PIP) install -c requirements.lock -r requirements-dev.lock
	@touch $(DEV_STAMP)

venv: $(STAMP) ## Create .venv with the runtime dependencies, requirements.lock (no-op when up to date)

venv-dev: $(DEV_STAMP) ## Add the development dependencies, requirements-dev.lock (tests, lint, JAX's CPU build)

repro: $(STAMP) ## Run the whole pipeline (dvc repro), logged to the local MLflow store
	@test -d .dvc || $(BIN)/dvc init --quiet
	@$(BIN)/python -m pipeline.params params.yaml
	$(BIN)/dvc repro

test: $(DEV_STAMP) ## Run the whole test suite (unit, end-to-end, failure paths, PyPI download); TEST_JOBS=
	$(PYTEST) $(PYTEST_ARGS)

test-fast: $(DEV_STAMP) ## Run only the fast unit tests
	$(PYTEST) -m "not slow and not network" $(PYTEST_ARGS)

lint: $(DEV_STAMP) ## Check style with ruff
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/ruff format --check pipeline tests benchmarks

format: $(DEV_STAMP) ## Reformat the code with ruff
	$(BIN)/ruff check --fix pipeline tests benchmarks
	$(BIN)/ruff format pipeline tests benchmarks

ui: $(STAMP) ## Browse the MLflow store in the MLflow UI on 127.0.0.1:5000 (HOST=, PORT=); prints the runs link
	$(BIN)/python -m pipeline.serve ui --host $(HOST) --port $(PORT)

server: $(STAMP) ## MLflow tracking server on 127.0.0.1:5000 (HOST=, PORT=); SQLite and artifacts in mlserver/
	$(BIN)/python -m pipeline.serve server --host $(HOST) --port $(PORT)

bench: $(STAMP) ## Benchmark seed-style Keras fit against the project's trainer (BENCH_ARGS=...)
	@test -f data/processed/train.npz || $(BIN)/dvc repro preprocess
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

jax: $(STAMP) ## JAX for KERAS_BACKEND=jax: its CPU build, with CUDA where nvidia-smi finds a GPU
	$(PIP) install -c requirements.lock -c requirements-dev.lock -r requirements-jax.txt \
		$(if $(shell command -v nvidia-smi),'jax[cuda12]')

# Sweeps on Ray (pipeline/sweep/): one DVC experiment per combination of the -S values (comma lists
# expand to the cartesian product, as with dvc exp run), each one Ray task in a fresh clone that pushes it
# back once, then fetched into the workspace with its outputs; MLflow runs tagged dvc.exp_name and
# pipeline.sweep. RAY_ADDRESS unset: a local Ray instance with JOBS cores (default: all);
# RAY_ADDRESS=host:port: that cluster. Options go in SWEEP too (--step-timeout S ...; docs/sweeps.md).
SWEEP ?= -S 'train.learning_rate=0.05,0.5,1.0'
JOBS ?=
SWEEP_GPUS ?=
BENCH_SWEEP_ARGS ?= --experiments 4
.PHONY: sweep bench-sweep push pull
sweep: $(STAMP) ## Run a sweep of DVC experiments on Ray: local, or RAY_ADDRESS= (SWEEP="-S ...", JOBS=, SWEEP_GPUS=)
	$(BIN)/python -m pipeline.sweep $(SWEEP) --jobs '$(JOBS)' --gpus '$(SWEEP_GPUS)'

bench-sweep: $(STAMP) ## Time one sweep serially (dvc exp run) and on Ray; prints the ratio (BENCH_SWEEP_ARGS=)
	$(BIN)/python benchmarks/sweep.py $(BENCH_SWEEP_ARGS)

# A sweep's report (pipeline/sweep/report.py): sweeps/<id>/ (ignored by git: git add -f keeps it) and one
# MLflow run tagged pipeline.sweep = <id>. make sweep writes it at its end; this target, for an earlier sweep.
SWEEP_ID ?=
.PHONY: sweep-report
sweep-report: $(STAMP) ## Report of an earlier sweep: escape epochs and forecasts in sweeps/<id>/ and MLflow (SWEEP_ID=)
	$(BIN)/python -m pipeline.sweep.report $(SWEEP_ID)

# Data, models and reports in the DVC remote (.dvc/config; default: ../vanishing-gradient-dvc-storage,
# a folder beside the repository): push after `make repro`, pull instead of re-running.
push: $(STAMP) ## Send data, models and reports to the DVC remote (dvc push)
	$(BIN)/dvc push

pull: $(STAMP) ## Fetch data, models and reports from the DVC remote instead of re-running (dvc pull)
	$(BIN)/dvc pull
	$(BIN)/dvc status

lock: ## Regenerate requirements.lock, then requirements-dev.lock (what dev adds; runtime pins kept), in a scratch venv
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet -r requirements.txt
	.venv-lock/bin/pip freeze --exclude-editable > requirements.lock
	.venv-lock/bin/pip install --quiet -c requirements.lock -r requirements-dev.txt
	.venv-lock/bin/pip freeze --exclude-editable | grep -vxFf requirements.lock > requirements-dev.lock
	rm -rf .venv-lock

clean: ## Remove pipeline outputs, the MLflow store and caches (keeps .venv and the DVC cache)
	rm -rf data/raw data/processed results reports published.json dvc_plots mlflow.db mlflow.db-lock mlartifacts .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
