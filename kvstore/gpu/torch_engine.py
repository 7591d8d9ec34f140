"""The torch-only backend, used when cupy is missing: pinned tensors and non-blocking copies on a torch stream.

Callers with a CUDA build of torch keep working without ``kvstore[gpu]``; the
copies are ordered exactly as with cupy. What is lost: torch's host allocator
rounds pinned buffers up to a power of two and keeps freed ones in its own
cache, outside the pool's budget.
"""

from __future__ import annotations

from typing import cast

import torch

from kvstore.gpu.engine import CopyEvent

__all__ = ["TorchEngine", "torch_pinned_allocator"]


def torch_pinned_allocator(nbytes: int) -> torch.Tensor:
    """A flat uint8 tensor of pinned host memory from torch's host allocator."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class TorchEngine:
    """Copies for one device on a ``torch.cuda.Stream`` of its own; events are blocking (no spinning)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def wait_for(self, stream: torch.cuda.Stream) -> None:
        self._stream.wait_stream(stream)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self._stream):
            _bytes(dst).copy_(_bytes(src), non_blocking=True)

    def record(self) -> CopyEvent:
        done = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
        done.record(self._stream)
        return done

    def make_wait(self, stream: torch.cuda.Stream, event: CopyEvent) -> None:
        stream.wait_event(cast(torch.cuda.Event, event))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1).view(torch.uint8)
