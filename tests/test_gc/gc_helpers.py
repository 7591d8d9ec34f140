"""Helpers for GC tests: run a GC with a chosen clock, snapshot a store, write garbage by hand.

Imported by module name (tests/ is not a package).
"""

from __future__ import annotations

import time
from typing import Any

from kvstore.formats.access import ACCESS_DIR
from kvstore.gc import GCReport, mark_and_sweep
from kvstore.gc.bulk import open_bulk_ops
from kvstore.storage import ObjectStore, open_object_store


async def run_gc_at(
    url: str,
    options: dict[str, Any] | None,
    *,
    grace: float = 0.0,
    dry_run: bool = False,
    now: float | None = None,
    allow_short_grace: bool = True,
    **kwargs: Any,
) -> GCReport:
    """One GC through the same bulk operations as ``kvstore.gc.run_gc``, with the clock at ``now``.

    ``now`` defaults to a few seconds ahead so objects written by the test count
    as older than a zero grace whatever the backend's timestamp resolution. Tests
    use graces far below ``kvstore.gc.MIN_GRACE`` on purpose, so they accept it
    unless ``allow_short_grace=False``.
    """
    backend = await open_object_store(url, options)
    try:
        async with open_bulk_ops(backend, url, options) as bulk:
            return await mark_and_sweep(
                backend,
                bulk,
                grace=grace,
                dry_run=dry_run,
                now=time.time() + 5 if now is None else now,
                allow_short_grace=allow_short_grace,
                **kwargs,
            )
    finally:
        await backend.close()


async def snapshot(url: str, options: dict[str, Any] | None, prefix: str = "") -> dict[str, bytes]:
    """Every object under ``prefix`` with its bytes; access records only when ``prefix`` is under ``access/``.

    (Every load and save writes access records, and every GC compacts them: the
    chunk GC's tests compare what is left of the rest.)
    """
    backend = await open_object_store(url, options)
    try:
        keys = [
            m.key
            async for m in backend.list(prefix)
            if prefix.startswith(ACCESS_DIR) or not m.key.startswith(ACCESS_DIR + "/")
        ]
        return {k: await backend.get(k) for k in keys}
    finally:
        await backend.close()


async def put_raw(url: str, options: dict[str, Any] | None, objects: dict[str, bytes]) -> None:
    backend: ObjectStore = await open_object_store(url, options)
    try:
        for key, data in objects.items():
            await backend.put(key, data)
    finally:
        await backend.close()
