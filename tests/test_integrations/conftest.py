"""Where the vLLM environment is: the tests drive real vLLM engines in child processes that run in it.

vLLM pins a transformers older than the development environment's, so it lives in a
venv of its own (``make vllm-venv``: ``.venv-vllm``; ``KVSTORE_VLLM_PYTHON`` overrides).
Without it the engine tests are skipped, except in CI (``CI=true``), where a missing
vLLM environment is a failure: CI must run them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    python = Path(os.environ.get("KVSTORE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
    if python.exists():
        return python
    message = f"no vLLM environment at {python} (make vllm-venv, or set KVSTORE_VLLM_PYTHON)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message + ": CI must run the vLLM tests")
    pytest.skip(message)
