"""Choosing how a device's data is staged: ``staging_for(device)`` and a store's per-device ``Stagings``.

- CPU (and any device that is not CUDA): plain torch, no copies beyond today's.
- CUDA with cupy (``kvstore[gpu]``): pinned buffers from the pool, copies on a
  non-blocking cupy stream ordered with torch's current stream by events.
- CUDA without cupy: the same ordering with torch's own pinned memory and
  streams, after one warning that names the extra.

cupy is looked for only when a CUDA device is first staged.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvstore.gpu.cupy_engine import CupyEngine, cupy_pinned_allocator, load_cupy
from kvstore.gpu.engine import CopyEngine
from kvstore.gpu.pool import HostPool
from kvstore.gpu.torch_engine import TorchEngine, torch_pinned_allocator
from kvstore.gpu.transfers import CudaTransfers, PlainTransfers, Transfers
from kvstore.results import LayerKV

__all__ = ["DEFAULT_PINNED_POOL_BYTES", "CudaStaging", "PlainStaging", "Staging", "Stagings", "staging_for"]

logger = logging.getLogger("kvstore")

DEFAULT_PINNED_POOL_BYTES = 1 << 30
"""Pinned host memory a store may hold for staging (allocated on first use, reused after)."""

_NO_CUPY = (
    "cupy is not installed (or cannot use this CUDA driver): GPU staging falls back to torch's pinned memory "
    "and streams; pip install 'kvstore[gpu]' for cupy's exact-size pinned buffers and copy streams"
)


class Staging(ABC):
    """How data moves between host memory and one device; ``transfers()`` starts one call's worth."""

    device: torch.device

    @abstractmethod
    def transfers(self) -> Transfers:
        """The host buffers and copies of one load or save, closed when the call ends."""


class PlainStaging(Staging):
    """The CPU (or another non-CUDA device): plain torch tensors and ``.to``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def transfers(self) -> Transfers:
        return PlainTransfers(self.device)


class CudaStaging(Staging):
    """One CUDA device: ``engine``'s copy stream, host buffers leased from ``pool``."""

    def __init__(self, device: torch.device, engine: CopyEngine, pool: HostPool) -> None:
        self.device = device
        self.engine = engine
        self.pool = pool

    def transfers(self) -> Transfers:
        return CudaTransfers(self.device, self.engine, self.pool)


class Stagings:
    """A store's stagings: one per device, made on first use; the CUDA ones share one pinned pool.

    ``pinned_pool_bytes`` bounds the pool (0 disables pinning: every copy then
    goes through pageable memory). ``load_cupy`` finds cupy (injectable for tests).
    """

    def __init__(
        self,
        pinned_pool_bytes: int = DEFAULT_PINNED_POOL_BYTES,
        *,
        load_cupy: Callable[[], Any | None] = load_cupy,
    ) -> None:
        self._pool_bytes = pinned_pool_bytes
        self._load_cupy = load_cupy
        self._cupy: Any | None = None
        self._backend: str | None = None
        self._by_device: dict[torch.device, Staging] = {}
        self.pool: HostPool | None = None
        """The pinned pool, once a CUDA device has been staged."""

    def for_device(self, device: torch.device | str) -> Staging:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        staging = self._by_device.get(dev)
        if staging is None:
            staging = self._by_device[dev] = self._make(dev)
        return staging

    def for_kv(self, kv: Sequence[LayerKV]) -> Staging:
        """The staging of the device the KV is on (its first tensor's)."""
        return self.for_device(kv[0][0].device if kv else "cpu")

    def cuda_backend(self) -> str:
        """``"cupy"`` or ``"torch"``: what CUDA stagings use. Looks for cupy once, warning when it is missing."""
        if self._backend is None:
            self._cupy = self._load_cupy()
            self._backend = "torch" if self._cupy is None else "cupy"
            if self._cupy is None:
                logger.warning(_NO_CUPY)
        return self._backend

    def clear(self) -> None:
        """Free the pinned buffers cached for reuse (those in use stay)."""
        if self.pool is not None:
            self.pool.clear()

    def _make(self, dev: torch.device) -> Staging:
        if dev.type != "cuda":
            return PlainStaging(dev)
        cupy = self._cupy if self.cuda_backend() == "cupy" else None
        if self.pool is None:
            allocate = torch_pinned_allocator if cupy is None else cupy_pinned_allocator(cupy)
            self.pool = HostPool(self._pool_bytes, allocate)
        engine: CopyEngine = TorchEngine(dev) if cupy is None else CupyEngine(cupy, dev)
        return CudaStaging(dev, engine, self.pool)


def staging_for(device: torch.device | str, *, pinned_pool_bytes: int = DEFAULT_PINNED_POOL_BYTES) -> Staging:
    """A standalone staging for ``device``, with a pinned pool of its own for CUDA.

    A store keeps its own ``Stagings`` (one pool for all its devices); use this
    outside a store, e.g. to stage your own copies.
    """
    return Stagings(pinned_pool_bytes).for_device(device)
