# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install raysmooth with its pinned torch/torchvision first if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.raysmooth-installed

.PHONY: install test lint demo bench gpu-wheels clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -e '.[test]'
	@# pip compiles what it installs on one core; compileall writes the same bytecode on every core. Files no
	@# Python 3 compiles (a few packages ship them) are skipped, as pip skips them.
	$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
		> /dev/null || true
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

# Wheels a GPU machine whose image has torch and timm but not diffusers needs for bench/gpu.sh
# (it installs them from .whl when diffusers is missing): the versions this venv runs.
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download -q --no-deps --dest .whl $$($(BIN)/python -c "import importlib.metadata as m; \
		print(' '.join(f'{p}=={m.version(p)}' for p in ('diffusers', 'importlib_metadata')))")
	@ls .whl

clean-venv:
	rm -rf $(VENV)
