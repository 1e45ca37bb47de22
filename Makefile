# The README's quick start: `make demo` (the main job) and `make test` (the tests).
# Both create or reuse .venv and install the CPU build of torch and the package first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pyroflows-installed
TORCH_PIN := torch==2.13.0
export OMP_NUM_THREADS ?= 2
# a private compile cache per checkout (a shared /tmp cache breaks parallel runs)
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor

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

# The documentation, warnings as errors (as CI builds it); output in docs/_build/html.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

# Speed side by side with the peers (needs ../shared/bench/peers.py beside the checkout).
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	bash benchmarks/peers.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check $(wildcard pyroflows tests examples benchmarks docs/conf.py)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache docs/_build docs/_autogen
