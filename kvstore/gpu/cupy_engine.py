"""The cupy backend (``pip install 'kvstore[gpu]'``): pinned buffers and copies on a non-blocking cupy stream.

cupy is imported here only, and only when a CUDA device is first used for
staging: ``import kvstore`` never imports it.

Why cupy when torch can copy too: it pins exactly the bytes asked for (torch's
host allocator rounds every pinned buffer up to a power of two and caches it
outside any budget of ours), and it gives raw ``cudaMemcpyAsync`` on a stream
created with ``cudaStreamNonBlocking``, so a staging copy never serializes with
work on the legacy default stream.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch

from kvstore.gpu.engine import CopyEvent
from kvstore.gpu.pool import Allocator

__all__ = ["CupyEngine", "cupy_pinned_allocator", "load_cupy"]


def load_cupy() -> Any | None:
    """The cupy module, or None when it is not installed or cannot reach a CUDA device."""
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        return None
    try:
        cupy.cuda.runtime.getDeviceCount()
    except RuntimeError:  # CUDARuntimeError: a driver or runtime that does not match this cupy build
        return None
    return cupy


def cupy_pinned_allocator(cupy: Any) -> Allocator:
    """Allocate pinned, portable (usable from every device) host memory as a flat uint8 CPU tensor.

    The tensor views the memory through numpy's buffer protocol (zero copy) and
    keeps the ``PinnedMemory`` alive; ``cudaFreeHost`` runs when the last view goes.
    """
    pinned = cupy.cuda.pinned_memory

    def allocate(nbytes: int) -> torch.Tensor:
        memory = pinned.PinnedMemory(nbytes, cupy.cuda.runtime.hostAllocPortable)
        return torch.from_numpy(np.frombuffer(pinned.PinnedMemoryPointer(memory, 0), dtype=np.uint8, count=nbytes))

    return allocate


class CupyEngine:
    """Copies for one device on a cupy ``Stream(non_blocking=True)``; events block (no spinning) when waited on."""

    def __init__(self, cupy: Any, device: torch.device) -> None:
        if device.index is None:
            raise ValueError("CupyEngine needs a device with an index, e.g. cuda:0")
        self.device = device
        self._cupy = cupy
        self._runtime = cupy.cuda.runtime
        self._index = device.index
        with cupy.cuda.Device(self._index):
            self._stream = cupy.cuda.Stream(non_blocking=True)

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def wait_for(self, stream: torch.cuda.Stream) -> None:
        with self._cupy.cuda.Device(self._index):
            ready = self._event()
            ready.record(self._cupy.cuda.ExternalStream(stream.cuda_stream, self._index))
            self._stream.wait_event(ready)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if dst.nbytes != src.nbytes:
            raise ValueError(f"copy of {src.nbytes} bytes into {dst.nbytes}")
        kind = self._runtime.memcpyHostToDevice if dst.is_cuda else self._runtime.memcpyDeviceToHost
        with self._cupy.cuda.Device(self._index):
            self._runtime.memcpyAsync(dst.data_ptr(), src.data_ptr(), src.nbytes, kind, self._stream.ptr)

    def record(self) -> CopyEvent:
        with self._cupy.cuda.Device(self._index):
            done = self._event()
            done.record(self._stream)
        event: CopyEvent = done
        return event

    def make_wait(self, stream: torch.cuda.Stream, event: CopyEvent) -> None:
        with self._cupy.cuda.Device(self._index):
            self._cupy.cuda.ExternalStream(stream.cuda_stream, self._index).wait_event(event)

    def _event(self) -> Any:
        # block=True: synchronize() sleeps in the driver instead of spinning a CPU core.
        return self._cupy.cuda.Event(block=True, disable_timing=True)
