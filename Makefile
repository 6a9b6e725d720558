# Two entry points for a fresh machine:
#   make run   - create .venv if missing, install, run the main job on the bundled data
#   make test  - create .venv if missing, install with [dev,docs], run ruff, the strict docs build and
#                the whole test suite (tests/ plus the doctests of lightning_freeze/core)
# and one for the floors:
#   make test-oldest - create .venv-oldest if missing (Python 3.10 where one is found), install [dev] with
#                the dependencies pinned at their declared floors (constraints/oldest.txt), run the suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the oldest stack: the lowest Python the package declares (3.10), from pyenv or the PATH; without one,
# $(PYTHON) with a warning (the dependency floors are still what is tested)
PYTHON_OLDEST ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) $(shell python3.10 -c 'import sys; print(sys.executable)' 2>/dev/null))
VENV_OLDEST ?= .venv-oldest
BIN_OLDEST := $(VENV_OLDEST)/bin

.PHONY: run test test-oldest lint docs docs-serve format install install-dev clean bench gpu-check notebook-plots

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[dev,docs]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

run: $(VENV)/.installed
	$(BIN)/python scripts/main_job.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the docs site (mkdocs.yml, docs/): strict, so a broken link, page or API reference fails CI
docs: $(VENV)/.installed-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(VENV)/.installed-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# pytest's testpaths (pyproject.toml): tests/ and the doctests of lightning_freeze/core
test: lint docs
	$(BIN)/python -m pytest

# the whole suite on the declared floors (constraints/oldest.txt); dev tools (pytest, timm, ...) are not
# pinned: the newest release that installs beside the floors. pip's cache keeps a rebuild quick.
$(VENV_OLDEST)/.installed-dev: pyproject.toml constraints/oldest.txt
	@if [ -n "$(PYTHON_OLDEST)" ]; then \
		$(PYTHON_OLDEST) -m venv $(VENV_OLDEST); \
	else \
		echo "warning: no Python 3.10 found; .venv-oldest uses $(PYTHON) (set PYTHON_OLDEST=...)" >&2; \
		$(PYTHON) -m venv $(VENV_OLDEST); \
	fi
	$(BIN_OLDEST)/python -m pip install --upgrade pip
	$(BIN_OLDEST)/python -m pip install -c constraints/oldest.txt -e ".[dev]"
	touch $@

test-oldest: $(VENV_OLDEST)/.installed-dev
	$(BIN_OLDEST)/python scripts/check_pins.py constraints/oldest.txt
	$(BIN_OLDEST)/python -m pytest

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# side-by-side benchmarks (run by hand; results go into docs/benchmarks.md), peers from the [bench] extra
bench: $(VENV)/.installed-dev
	$(BIN)/python -m pip install -e ".[dev,bench]"
	$(BIN)/python benchmarks/bench_freeze.py
	$(BIN)/python benchmarks/bench_ema.py
	$(BIN)/python benchmarks/bench_fingerprint.py
	$(BIN)/python benchmarks/bench_diff.py
	$(BIN)/python benchmarks/bench_distributed.py
	$(BIN)/python benchmarks/bench_feature_cache.py

# GPU_PYTHON=python3: a GPU machine's own Python with torch, Lightning (and the package's other needs)
# already installed, run from the checkout (PYTHONPATH); otherwise .venv is created and used
GPU_PYTHON ?=
gpu-check:
	@if [ -n "$(GPU_PYTHON)" ]; then \
		PYTHON="$(GPU_PYTHON)" PYTHONPATH="$(CURDIR):$$PYTHONPATH" bash scripts/gpu_check.sh; \
	else \
		$(MAKE) install-dev && bash scripts/gpu_check.sh; \
	fi

# runs notebooks/*.ipynb (outputs not stored) and rewrites their figures docs/*.png (README and docs site)
notebook-plots: $(VENV)/.installed-dev
	$(BIN)/python scripts/make_notebook_plots.py

clean:
	rm -rf $(VENV) $(VENV_OLDEST) build dist *.egg-info .pytest_cache .ruff_cache outputs multirun lightning_logs
