# Two entry points on a fresh machine:  make demo   and   make test
# Each creates (or refreshes) the virtual environment from pyproject.toml first.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
# CPU build of torch; installed first so nothing pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# vLLM (CPU build) in a venv of its own: it pins a transformers older than constraints.txt's.
VLLM_VENV  ?= .venv-vllm
VLLM_PY     = $(VLLM_VENV)/bin/python
VLLM_STAMP  = $(VLLM_VENV)/.installed

.PHONY: venv vllm-venv demo test lint bench bench-vllm clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# Installed exactly as pinned (--no-deps): see the header of constraints-vllm.txt for why.
$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "$(TORCH)"
	$(VLLM_PY) -m pip install -q --no-deps -r constraints-vllm.txt
	$(VLLM_PY) -m pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py kvstore-demo

lint: $(STAMP)
	$(PY) -m ruff check kvstore tests examples benchmarks fuzz
	$(PY) -m ruff format --check kvstore tests examples benchmarks fuzz
	$(PY) -m mypy

# pytest exits 5 when it collects no test: that fails here like any other error.
# tests/test_integrations drive vLLM engines in child processes running in $(VLLM_VENV).
test: lint $(VLLM_STAMP)
	KVSTORE_VLLM_PYTHON="$(abspath $(VLLM_PY))" $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_store.py

bench-vllm: $(VLLM_STAMP)
	$(VLLM_PY) benchmarks/bench_vllm.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) kvstore-demo .pytest_cache .mypy_cache .ruff_cache
