"""Waiting in tests for a state the library reaches off the loop (a copy's completion callback, held reads)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["until"]


async def until(done: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a test's bound
    """Return once ``done()`` is true. Tests may poll such states; the library never does."""
    for _ in range(int(timeout / 0.01)):
        if done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached within {timeout} s")
