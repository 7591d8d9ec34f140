"""What a CUDA copy backend provides: byte copies on a dedicated stream, ordered with torch's streams by events.

Two backends implement it: cupy (``kvstore[gpu]``) and torch alone (the
fallback). The staging code above them is the same, so both order copies the
same way.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["CopyEngine", "CopyEvent"]


class CopyEvent(Protocol):
    """A point on the copy stream; ``synchronize`` blocks the calling thread until it is reached."""

    def synchronize(self) -> None: ...


class CopyEngine(Protocol):
    """Asynchronous host<->device copies for one CUDA device, on a stream of the engine's own.

    Every method may be called from any thread; ``stream`` arguments are
    torch's current stream captured on the caller's thread (it is thread-local).
    """

    device: torch.device

    def current_stream(self) -> torch.cuda.Stream:
        """Torch's current stream on this device, for the calling thread (where the caller's kernels run)."""
        ...

    def wait_for(self, stream: torch.cuda.Stream) -> None:
        """Make later copies wait for the work queued on ``stream`` so far (the KV's producers, a reused block)."""
        ...

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue a copy of ``src``'s bytes into ``dst`` (both contiguous, same size; one on the device)."""
        ...

    def record(self) -> CopyEvent:
        """An event after every copy queued so far."""
        ...

    def make_wait(self, stream: torch.cuda.Stream, event: CopyEvent) -> None:
        """Make later work on ``stream`` wait for ``event`` (before a copied tensor is handed out)."""
        ...
