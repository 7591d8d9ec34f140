# Two entry points on a fresh machine:  make demo   and   make test
# Each creates (or refreshes) the virtual environment from pyproject.toml first.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
# CPU build of torch; installed first so nothing pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: venv demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py kvstore-demo

lint: $(STAMP)
	$(PY) -m ruff check kvstore tests examples benchmarks fuzz
	$(PY) -m ruff format --check kvstore tests examples benchmarks fuzz
	$(PY) -m mypy

# pytest exits 5 when it collects no test: that fails here like any other error.
test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_store.py

clean:
	rm -rf $(VENV) kvstore-demo .pytest_cache .mypy_cache .ruff_cache
