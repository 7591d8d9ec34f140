"""Fixtures of the GC tests."""

from __future__ import annotations

from typing import Any

import pytest
from gc_helpers import run_gc_at


@pytest.fixture
def gc_at() -> Any:
    """``await gc_at(url, options, grace=0, dry_run=False, now=None)`` -> GCReport."""
    return run_gc_at
