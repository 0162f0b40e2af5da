# zscir — `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# where torch/torchvision come from: empty = PyPI's default build; e.g. https://download.pytorch.org/whl/cpu
# (CPU only) or https://download.pytorch.org/whl/cu121 (another CUDA): make setup TORCH_INDEX_URL=...
TORCH_INDEX_URL ?=

export WANDB_SILENT := true

.PHONY: help setup demo test test-fast lint format bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  %-10s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install zscir with its dev extras (quick when already done)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(if $(TORCH_INDEX_URL),$(BIN)/python -m pip install --quiet torch torchvision --index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: setup  ## synthetic world -> tiny CLIP -> every method trained + evaluated -> outputs/demo/results.md
	$(BIN)/python -m zscir.cli.demo

test: setup  ## the whole test suite (slow tests included, as CI runs it)
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup  ## skip tests marked slow
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup  ## ruff lint + format check + import contracts (layers, no cycles)
	$(BIN)/ruff check src tests experiments
	$(BIN)/ruff format --check src tests experiments
	$(BIN)/lint-imports  # the layer order of docs/architecture.md (pyproject.toml [tool.importlinter])

format: setup  ## apply ruff formatting and safe fixes
	$(BIN)/ruff check --fix src tests experiments
	$(BIN)/ruff format src tests experiments

bench: setup  ## speed/memory of each hot path vs its baseline -> experiments/bench/results.json
	$(BIN)/python -m experiments.bench.run_all

clean:  ## remove generated outputs (keeps .venv and data/)
	rm -rf outputs multirun .pytest_cache .ruff_cache
