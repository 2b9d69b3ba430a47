# `make demo` trains the tiny MoE on the default corpus; `make test` runs the tests (all of them:
# what CI runs), `make test-fast` all but the slow and distributed ones (under 2 minutes on 2 CPU
# cores), `make lint` the static checks (ruff, mypy on the core, the import contracts).
# Each creates .venv on first use. On a machine without an NVIDIA GPU the install is held to the
# CPU build of torch named in .ci/constraints.txt (an unpinned torch pulls GBs of CUDA wheels);
# override with `make test CONSTRAINTS=` (none) or another file.
# `make test-newest` runs the fast subset again in a second virtualenv, .venv-newest, on the torch
# pinned in .ci/constraints-newest.txt (the newest torch pip installs here; that file says how to refresh it).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,.ci/constraints.txt)
VENV_NEWEST := .venv-newest
CONSTRAINTS_NEWEST ?= .ci/constraints-newest.txt
FAST := -m 'not slow and not distributed'
# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning
# threads made small-tensor training up to 10x slower (measured on 2 busy cores).
export OMP_WAIT_POLICY ?= PASSIVE
# The demo: a few minutes of training on 2 CPU cores; --time-limit caps it on a slower machine.
DEMO_TRAIN ?= --steps 300 --time-limit 240
# The core modules mypy checks (the same list as the import-linter contract "The core imports
# nothing above it" in pyproject.toml); what they import is followed silently.
MYPY_CORE := $(addprefix moe/,$(addsuffix .py,config router capacity dispatch dispatcher scope balance experts \
	layer attention rope model generate mlp norm device shipped_configs extras errors mtp speculative config_checks))

.PHONY: install test test-fast test-newest lint demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	touch $@

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q $(FAST)

# The same install in its own virtualenv, held to the other torch; rebuilt when either file changes.
$(VENV_NEWEST)/.installed: pyproject.toml $(CONSTRAINTS_NEWEST)
	test -d $(VENV_NEWEST) || $(PYTHON) -m venv $(VENV_NEWEST)
	$(VENV_NEWEST)/bin/pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS_NEWEST) -e '.[dev]'
	touch $@

test-newest: $(VENV_NEWEST)/.installed
	$(VENV_NEWEST)/bin/python -c 'import torch; print("torch", torch.__version__)'
	$(VENV_NEWEST)/bin/python -m pytest -q $(FAST)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(MYPY_CORE)
	$(BIN)/lint-imports

demo: install
	$(BIN)/python -m moe train --config tiny --overwrite $(DEMO_TRAIN)
	$(BIN)/python -m moe generate --ckpt runs/tiny --prompt 'def ' --max-new-tokens 300 --temperature 0.8

clean:
	rm -rf $(VENV) $(VENV_NEWEST) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
