# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv on its own.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test test-gpu clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build (see ../shared/FACTS.md).
$(VENV)/.torch: | $(VENV)/bin/python
	$(PIP) torch==2.13.0
	touch $@

$(VENV)/.demo: pyproject.toml $(VENV)/.torch
	$(PIP) -e '.[eval]'
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PIP) -e '.[dev]'
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/quantkit export --recipe recipes/trees.yaml --out out/demo --force

test: $(VENV)/.dev
	$(VENV)/bin/pytest -q tests

test-gpu: $(VENV)/.dev
	$(VENV)/bin/pytest -q tests/gpu -rs

clean:
	rm -rf out .pytest_cache
