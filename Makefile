# Two entry points for a fresh machine:
#   make run   - create .venv if missing, install, run the main job on the bundled data
#   make test  - create .venv if missing, install with [dev,docs], run ruff, the strict docs build and
#                the whole test suite (tests/ plus the doctests of lightning_freeze/core)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint docs docs-serve format install install-dev clean bench gpu-check notebook-plots

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

gpu-check: $(VENV)/.installed-dev
	bash scripts/gpu_check.sh

# runs notebooks/*.ipynb (outputs not stored) and rewrites their figures docs/*.png (README and docs site)
notebook-plots: $(VENV)/.installed-dev
	$(BIN)/python scripts/make_notebook_plots.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache outputs multirun lightning_logs
