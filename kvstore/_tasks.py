"""Structured fan-out: run awaitables in a TaskGroup and surface a plain exception."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")

__all__ = ["both", "run_all", "task_group"]


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def run_all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Await all concurrently; if any fails, cancel the rest and raise the first real error.

    Callers catch kvstore's exceptions, not ExceptionGroups; the group is kept as
    the raised exception's ``__cause__`` so no failure is hidden.
    """
    tasks: list[asyncio.Task[T]] = []
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_as_coro(a)) for a in awaitables]
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        first = next((e for e in leaves if not isinstance(e, asyncio.CancelledError)), leaves[0])
        raise first from group
    return [t.result() for t in tasks]


async def both(first: Awaitable[T], second: Awaitable[U]) -> tuple[T, U]:
    """``run_all`` of two awaitables of different types: both results, or the first real error (the other cancelled)."""
    async with task_group() as tg:
        a, b = tg.create_task(_as_coro(first)), tg.create_task(_as_coro(second))
    return a.result(), b.result()


async def _as_coro(aw: Awaitable[T]) -> T:
    return await aw


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """An ``asyncio.TaskGroup`` that raises its first real error instead of an ExceptionGroup.

    For streaming fan-out (tasks created while a listing is consumed), where
    ``run_all`` does not fit; the group stays attached as ``__cause__``.
    """
    try:
        async with asyncio.TaskGroup() as tg:
            yield tg
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        first = next((e for e in leaves if not isinstance(e, asyncio.CancelledError)), leaves[0])
        raise first from group
