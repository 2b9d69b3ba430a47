# `make demo` trains the tiny MoE on the default corpus; `make test` runs the tests.
# Both create .venv on first use. On a machine without an NVIDIA GPU the install is held to the
# CPU build of torch named in .ci/constraints.txt (an unpinned torch pulls GBs of CUDA wheels);
# override with `make test CONSTRAINTS=` (none) or another file.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,.ci/constraints.txt)

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	touch $@

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/python -m moe inspect configs/tiny.yaml

clean:
	rm -rf $(VENV) .pytest_cache
