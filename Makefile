# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what is missing (DeepSpeed included, with no op compiled:
# the suite runs ZeRO-2/3 on two CPU processes).
#
# Tests come in two tiers (docs/testing.md): `make test` is the default tier (every module's unit
# tests, each stage end to end once, for the edit loop); `make test-slow` is the rest (tests
# marked `slow`); `make test-all` runs both, one after the other, which is what CI (.ci/run) does.
#
# TORCH_SPEC picks the torch build. The default, torch==2.13.0, is the CPU build that this
# project's CPU machines install from a local wheel. On a GPU machine either install your CUDA
# torch into .venv first (then nothing is reinstalled) or run e.g. `make test TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlsi-installed

.PHONY: demo test test-slow test-all install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[test,deepspeed]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vlsi demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --durations=15

test-all: test test-slow

clean:
	rm -rf $(VENV) build src/*.egg-info
