# Two commands do all the set-up on a fresh machine: `make run` (the compare CLI on the default model and the
# shipped sample image) and `make test` (the test suite). Both create the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
# The torch / torchvision pair this project's machines carry on disk (torchvision: the Qwen and InternVL processors
# need it); any torch >= 2.4 works for users.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Empty = the newest transformers that pyproject allows; CI also runs the suite with TRANSFORMERS=5.17.0.
TRANSFORMERS ?=
EXTRAS ?= dev,kernels,train,calibrate

BIN := $(VENV)/bin
STAMP := $(VENV)/.vtprune-installed

.PHONY: run test lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]" $(if $(TRANSFORMERS),"transformers==$(TRANSFORMERS)")
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/vtprune compare --methods all --keep 0.11

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .venv-* build dist *.egg-info
