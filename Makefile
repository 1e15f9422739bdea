# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install raysmooth with its pinned torch/torchvision first if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.raysmooth-installed

.PHONY: install test lint demo bench clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: $(STAMP)
	$(BIN)/raysmooth certify

bench: $(STAMP)
	$(BIN)/python bench/sweep.py

clean-venv:
	rm -rf $(VENV)
