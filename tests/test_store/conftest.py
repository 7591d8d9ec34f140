"""Fixtures shared by the store tests (the backends and KV helpers come from tests/conftest.py)."""

from __future__ import annotations

import pytest
from _gates import make_gated


@pytest.fixture
def gated_store(counting_store: type) -> type:
    """``gated_store(inner, gated=(layers...))``: GETs of those layers wait for ``.gates[layer].set()``."""
    return make_gated(counting_store)
