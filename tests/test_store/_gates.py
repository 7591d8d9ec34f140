"""Gated stores for the layer, prefetch and shared-read tests: "in flight" as an observed fact, not a race.

A gated store holds the GETs of chosen layers until the test opens their gate;
``wait_held`` waits until a given number of GETs are held there.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

from kvstore.errors import StoreUnavailableError
from kvstore.storage import ObjectStore

__all__ = ["GATE_TIMEOUT", "layer_of", "make_gated", "only_this_task", "wait_held"]

GATE_TIMEOUT = 10  # seconds; only a hang reaches it

_LAYER = re.compile(r"/c\.(\d+)\.0\.0\.0\.0$")


def layer_of(key: str) -> int | None:
    """The layer of a layer object's key, None for any other object."""
    m = _LAYER.search(key)
    return int(m.group(1)) if m else None


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

        async def _gate(self, key: str) -> None:
            layer = layer_of(key)
            if layer is None:
                return
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
            await self._gate(key)
            return await super().get(key)  # type: ignore[no-any-return]

        async def get_into(self, key: str, buffers: Any, *, then: Any = None) -> int:
            await self._gate(key)
            return await super().get_into(key, buffers, then=then)  # type: ignore[no-any-return]

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
    """True when no other task is alive: a cancelled load left nothing running behind."""
    return asyncio.all_tasks() == {asyncio.current_task()}
