# The README's quick start: `make demo` (the main job) and `make test` (the tests).
# Both create or reuse .venv and install the CPU build of torch and the package first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pyroflows-installed
TORCH_PIN := torch==2.13.0
export OMP_NUM_THREADS ?= 2

.PHONY: demo test lint docs bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pyroflows demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check pyroflows tests examples benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
