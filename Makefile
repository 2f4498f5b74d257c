# FairDRO bundle: the README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# the stamp changes whenever a requirements file changes, so `make` reinstalls only then
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt constraints.txt | md5sum | cut -c1-12)

DEMO_DIR ?= demo
DEMO_CASES ?= 60
DEMO_EPOCHS ?= 12
DEMO_SEED ?= 0
BUNDLE_RUN := $(PY) -m monai.bundle run

.PHONY: help setup demo test lint format clean-demo

help:
	@echo "make demo   - set up .venv, generate the synthetic cohort, train FairDRO, evaluate, infer"
	@echo "make test   - set up .venv and run the test suite (pytest) and lint"
	@echo "make lint   - ruff check + format check"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet --upgrade "pip>=25"
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

demo: setup
	@echo "== 1/2 synthetic cohort -> $(DEMO_DIR)/data"
	$(PY) bundle/scripts/synthetic.py --out $(DEMO_DIR)/data --n-cases $(DEMO_CASES) --seed $(DEMO_SEED)
	@echo "== 2/2 training FairDRO for $(DEMO_EPOCHS) epochs -> $(DEMO_DIR)/run"
	$(BUNDLE_RUN) training --config_file bundle/configs/train.json --dataset_dir $(DEMO_DIR)/data \
		--output_dir $(abspath $(DEMO_DIR))/run --ckpt_dir $(abspath $(DEMO_DIR))/run/models \
		--epochs $(DEMO_EPOCHS) --seed $(DEMO_SEED)
	@echo
	@echo "Outputs:"
	@echo "  cohort:           $(DEMO_DIR)/data/datalist.json"
	@echo "  trained model:    $(DEMO_DIR)/run/models/model.pt"
	@echo "  TensorBoard logs: $(DEMO_DIR)/run"

test: setup lint
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check bundle tests bench
	$(PY) -m ruff format --check bundle tests bench

format: setup
	$(PY) -m ruff check --fix bundle tests bench
	$(PY) -m ruff format bundle tests bench

clean-demo:
	rm -rf $(DEMO_DIR)
