# Two entry points for a fresh machine:
#   make run   - create .venv if missing, install, run the main job on the bundled data
#   make test  - create .venv if missing, install with [dev], run ruff and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint format install install-dev clean bench gpu-check notebook-plots

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

run: $(VENV)/.installed
	$(BIN)/python scripts/main_job.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest tests

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# side-by-side benchmarks (run by hand; results go into the README), peers from the [bench] extra
bench: $(VENV)/.installed-dev
	$(BIN)/python -m pip install -e ".[dev,bench]"
	$(BIN)/python benchmarks/bench_freeze.py
	$(BIN)/python benchmarks/bench_ema.py

gpu-check: $(VENV)/.installed-dev
	bash scripts/gpu_check.sh

# runs notebooks/*.ipynb (outputs not stored) and rewrites their figures docs/*.png for the README
notebook-plots: $(VENV)/.installed-dev
	$(BIN)/python scripts/make_notebook_plots.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache outputs multirun lightning_logs
