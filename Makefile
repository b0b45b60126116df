# Two commands from a fresh clone:
#   make run     the main job (appendix D's final run); pass flags with ARGS="--model tiny --epochs 2"
#   make test    ruff, mypy (enginekit/ and plugins/) and the whole test suite
# Each creates .venv on first use and refreshes it when a pyproject.toml changes.
#
# torch comes from pip's configured index. On a machine without a GPU, ask for the CPU build
# (a plain `torch` from PyPI is the multi-GB CUDA build on Linux):
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
ARGS ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: run test env

run: $(VENV)/.installed
	$(BIN)/python examples/pretrain_verdict.py $(ARGS)

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml examples/enginekit-ema/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]" -e examples/enginekit-ema
	touch $@
