# Two commands do all the set-up on a fresh clone:
#   make demo   create .venv if needed, then materialize every asset on the offline demo profile
#   make test   create .venv if needed, then run the whole test suite (what CI runs)
# `make init` (run by demo and ui) prepares the Dagster instance at DAGSTER_HOME once, so that
# commands started in parallel afterwards never race to create its databases.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
# Demo sources, tiny models and an empty MLflow store, built once and copied into each new home (settings.py).
export CAR_MAKER_CACHE ?= $(CURDIR)/.car_maker_cache
# Materializations link to their MLflow runs here, where `make mlflow-ui` serves them.
export CAR_MAKER_MLFLOW_UI ?= http://127.0.0.1:5000
# `make mlflow-ui` without MLflow's job runner (eight more processes for its GenAI jobs, which the pipeline does not use).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false

.PHONY: demo init test test-fast lint format ui mlflow-ui venv clean-demo

venv: $(STAMP)

# torch/torchvision first and pinned to the versions the project is tested with: a bare "torch"
# could resolve to a multi-GB CUDA build on machines that only need the CPU one.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# DAGSTER_HOME with the project's dagster.yaml (unless it has one) and its databases, created once.
init: $(STAMP)
	$(BIN)/python -m car_maker_pipeline.orchestration.instance

demo: init
	$(BIN)/python -m car_maker_pipeline.demo

# Two workers (pytest-xdist), a test file per worker at a time so its module fixtures are built once (a few long
# tests sit in classes of their own, which loadscope sends apart), in the order conftest.py gives them, the
# longest first (xdist would otherwise reorder them by their number of tests, and leave a long one for the end);
# then, alone on the machine, the few tests that measure how the pipeline behaves under load (`serial`).
XDIST = -n 2 --dist loadscope --no-loadscope-reorder
# The serial run collects only the files that hold `serial` tests: collecting every file imports the whole stack (15 s).
SERIAL_FILES = $(shell grep -l "mark.serial" car_maker_pipeline_tests/test_*.py)
test: $(STAMP)
	$(BIN)/python -m pytest -ra --durations=25 $(XDIST) -m "not serial"
	$(BIN)/python -m pytest -ra --durations=10 -m serial $(SERIAL_FILES)

# `make lint` fails on a lint error or unformatted file (ruff), an import that climbs a layer or closes a cycle
# (lint-imports), or a dependency imported but not declared, or declared but not imported (deptry); all
# configured in pyproject.toml. `make format` fixes what ruff can.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/deptry car_maker_pipeline
	$(BIN)/deptry car_maker_pipeline_tests bench --ignore DEP002,DEP004

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra $(XDIST) -m "not slow and not serial"

ui: init
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.car_maker_home/mlflow.db --host 127.0.0.1 --port 5000

clean-demo:
	rm -rf .car_maker_home .dagster_home .car_maker_cache
