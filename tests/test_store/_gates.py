"""Gated stores for the layer, prefetch and shared-read tests: "in flight" as an observed fact, not a race.

A gated store holds the reads of chosen layers until the test opens their gate;
``wait_held`` waits until a given number of reads are held there. A chunk is one
data object, so a read's layer is the layer its first byte belongs to (a read
from the start of the object, index and header included, is layer 0's): a
layer-pipelined load reads layer 0 first (a local file: with its head, in one
request) and the later layers in one more read, which counts as the read of layer 1.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from kvstore.access import ACCESS_FLUSH_TASK
from kvstore.errors import StoreUnavailableError
from kvstore.formats.layout import parse_chunk_object
from kvstore.formats.shard import parse_head
from kvstore.storage import ObjectStore

__all__ = ["GATE_TIMEOUT", "layer_of", "make_gated", "only_this_task", "wait_held"]

GATE_TIMEOUT = 10  # seconds; only a hang reaches it


def layer_of(data: bytes, start: int) -> int:
    """The layer whose bytes a read of data object ``data`` from ``start`` begins with.

    The layer count is the one whose index (and its crc32c) parses: the test does not need the spec.
    """
    for n in range(1, len(data) // 16):
        try:
            head = parse_head(data, n, len(data))
        except Exception:  # not this layer count
            continue
        return max((layer for layer, span in enumerate(head.spans) if start >= span.offset), default=0)
    raise AssertionError("not a data object")


def make_gated(base: type) -> type:
    """A subclass of the conftest counting store whose layer GETs wait on per-layer gates."""

    class Gated(base):  # type: ignore[misc, valid-type]
        def __init__(self, inner: ObjectStore, gated: Sequence[int] = ()) -> None:
            super().__init__(inner)
            self.gates = {layer: asyncio.Event() for layer in gated}
            self.order: list[int] = []  # layer of every layer GET, in the order issued
            self.fail_layer: int | None = None
            self.held = 0  # GETs waiting at a gate now
            self.changed = asyncio.Event()  # set whenever a GET arrives at a gate

        async def _gate(self, key: str, start: int) -> None:
            parsed = parse_chunk_object(key)
            if parsed is None or parsed.kind != "data":
                return
            layer = layer_of(await self.inner.get(key), start) if start else 0
            self.order.append(layer)
            gate = self.gates.get(layer)
            if gate is not None:
                self.held += 1
                self.changed.set()
                try:
                    await gate.wait()
                finally:
                    self.held -= 1
            if layer == self.fail_layer:
                raise StoreUnavailableError(f"injected failure reading {key}")

        async def get(self, key: str) -> bytes:
            await self._gate(key, 0)
            return await super().get(key)  # type: ignore[no-any-return]

        async def get_range(self, key: str, start: int, end: int) -> bytes:
            await self._gate(key, start)
            return await super().get_range(key, start, end)  # type: ignore[no-any-return]

        async def get_range_into(
            self, key: str, start: int, buffers: Any, *, then: Callable[[int], None] | None = None
        ) -> int:
            await self._gate(key, start)
            return await super().get_range_into(key, start, buffers, then=then)  # type: ignore[no-any-return]

        async def get_planned(self, key: str, head: int, plan: Any, *, then: Any = None) -> tuple[bytes, int]:
            await self._gate(key, 0)
            return await super().get_planned(key, head, plan, then=then)  # type: ignore[no-any-return]

        def open_all(self) -> None:
            for gate in self.gates.values():
                gate.set()

    return Gated


async def wait_held(backend: Any, n: int = 1) -> None:
    """Wait until ``n`` GETs wait at the gates of a gated store."""
    async with asyncio.timeout(GATE_TIMEOUT):
        while backend.held < n:
            backend.changed.clear()
            await backend.changed.wait()


def only_this_task() -> bool:
    """True when no other task is alive: a cancelled load left nothing running behind.

    The store's own access-record flusher (one per store, alive until ``close()``) does not count.
    """
    others = {t for t in asyncio.all_tasks() if t.get_name() != ACCESS_FLUSH_TASK}
    return others == {asyncio.current_task()}
