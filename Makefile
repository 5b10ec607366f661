# mirror: every target creates and uses its own virtual environment in .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: install test lint demo bench-data bench-train bench-metrics clean

install: $(VENV)/.installed

# torch is pinned and installed first: on these machines `pip install torch==2.13.0`
# resolves to a local CPU wheel, while an unpinned torch pulls gigabytes of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m ruff check platform jobs tests bench
	$(PY) -m pytest tests

lint: install
	$(PY) -m ruff check platform jobs tests bench

clean:
	rm -rf $(VENV) build *.egg-info platform/*.egg-info
