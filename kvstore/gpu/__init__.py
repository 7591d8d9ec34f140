"""Staging KV between host memory and a GPU: pinned buffer pool, copy streams, ordering with torch.

Importing this package imports neither cupy nor anything that touches CUDA;
cupy is imported when a CUDA device is first staged (see ``docs/GPU.md``).
"""

from kvstore.gpu.pool import HostBlock, HostPool, PoolStats, size_class
from kvstore.gpu.staging import (
    DEFAULT_PINNED_POOL_BYTES,
    CudaStaging,
    PlainStaging,
    Staging,
    Stagings,
    staging_for,
)
from kvstore.gpu.transfers import Transfers

__all__ = [
    "DEFAULT_PINNED_POOL_BYTES",
    "CudaStaging",
    "HostBlock",
    "HostPool",
    "PlainStaging",
    "PoolStats",
    "Staging",
    "Stagings",
    "Transfers",
    "size_class",
    "staging_for",
]
