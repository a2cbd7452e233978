# Entry points for a fresh machine: `make demo` and `make test` (each creates .venv on its own), and
# `make wheel-smoke` (builds the wheel and sdist, installs the wheel into a fresh venv under .smoke/ and runs
# quantkit from an empty folder there: what a user of `pip install quantkit` gets).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test docs-check test-gpu wheel-smoke clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: an unpinned torch from PyPI is the multi-GB CUDA build; 2.13.0 is the version tested.
$(VENV)/.torch: | $(VENV)/bin/python
	$(PIP) torch==2.13.0
	touch $@

$(VENV)/.demo: pyproject.toml $(VENV)/.torch
	$(PIP) -e '.[eval]'
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PIP) -e '.[dev]'
	touch $@

# what the README's first command does: the default export of the bundled model and data into out/ (--force:
# replace the previous demo's output, and nothing else)
demo: $(VENV)/.demo
	$(VENV)/bin/quantkit export --force

test: $(VENV)/.dev
	$(VENV)/bin/pytest -q tests --ignore=tests/docs

# every command of the README's command block and of the --help examples, run as written (about 30 min on 2 cores, measured: CI runs it
# after the suite; tests/docs is not part of `make test`)
docs-check: $(VENV)/.dev
	$(VENV)/bin/pytest -q tests/docs

test-gpu: $(VENV)/.dev
	$(VENV)/bin/pytest -q tests/gpu -rs

wheel-smoke:
	.ci/wheel_smoke.sh $(PYTHON)

clean:
	rm -rf out .pytest_cache .smoke dist build
