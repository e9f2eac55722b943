# vlm_adapt: `make help` lists the targets. Every target that runs Python first brings .venv up to date.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline

.DEFAULT_GOAL := help
.PHONY: help install train test test-full test-slurm bench report lint slurm-start slurm-stop clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install vlm_adapt with its pinned dependencies (re-run when stale)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

train: install ## quickstart: CoOp on the shipped Imagenette few-shot pool (ARGS=... adds Hydra overrides)
	$(BIN)/vlm-adapt train experiment=quickstart $(ARGS)

test: install ## fast test suite (CPU, offline, tiny backbone), under 15 minutes on 2 cores
	$(BIN)/python -m pytest -m "not slow" -q $(ARGS)

test-full: install ## every test, including DDP, sweeps and the local Slurm cluster
	bash scripts/slurm/start.sh
	$(BIN)/python -m pytest -q $(ARGS); status=$$?; bash scripts/slurm/stop.sh; exit $$status

test-slurm: install ## the Slurm launcher tests on a local one-node cluster (installs and starts it; needs root)
	bash scripts/slurm/start.sh
	$(BIN)/python -m pytest -q -m slurm $(ARGS); status=$$?; bash scripts/slurm/stop.sh; exit $$status

bench: install ## cost benchmark of every method (ARGS=backbone=vit_b16 bench.num_classes=100 ...)
	$(BIN)/vlm-adapt bench $(ARGS)

report: install ## tables and plots from sweep directories: make report DIRS="outputs/.../multiruns/..."
	$(BIN)/vlm-adapt report $(DIRS)

lint: install ## ruff
	$(BIN)/ruff check vlm_adapt tests experiments

slurm-start: ## install and start a single-node Slurm cluster on loopback (needs root)
	bash scripts/slurm/start.sh

slurm-stop: ## stop the local Slurm daemons
	bash scripts/slurm/stop.sh

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun logs wandb .cache .pytest_cache .ruff_cache
