"""The store's request limit: admission by priority, then arrival; cancellation never leaks a slot."""

from __future__ import annotations

import asyncio

import pytest

from kvstore.requests import PriorityLimit


async def test_waiters_are_admitted_by_priority_then_arrival() -> None:
    limit = PriorityLimit(1)
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with limit():
            await release.wait()

    async def job(name: str, priority: int) -> None:
        async with limit(priority):
            order.append(name)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    jobs = [asyncio.create_task(job(n, p)) for n, p in [("late-1", 1), ("a-0", 0), ("late-2", 1), ("b-0", 0)]]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *jobs)
    assert order == ["a-0", "b-0", "late-1", "late-2"]


async def test_a_cancelled_waiter_gives_its_slot_on() -> None:
    limit = PriorityLimit(1)
    release = asyncio.Event()
    done: list[str] = []

    async def holder() -> None:
        async with limit():
            await release.wait()

    async def job(name: str) -> None:
        async with limit():
            done.append(name)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    cancelled, waiting = asyncio.create_task(job("cancelled")), asyncio.create_task(job("waiting"))
    await asyncio.sleep(0)
    cancelled.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.gather(first, waiting)
    assert done == ["waiting"]
    async with asyncio.timeout(1):  # every slot is back: two more holders at once would block, one does not
        async with limit():
            pass


async def test_at_most_value_holders_at_once() -> None:
    limit = PriorityLimit(3)
    inside = peak = 0

    async def job(i: int) -> None:
        nonlocal inside, peak
        async with limit(i % 2):
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.001)
            inside -= 1

    await asyncio.gather(*(job(i) for i in range(20)))
    assert peak == 3
