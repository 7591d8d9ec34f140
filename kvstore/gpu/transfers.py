"""One load's or one save's staging: the host memory it leases and the copies that use it.

A ``Transfers`` is made per call by its device's ``Staging`` and closed when
the call ends (``async with``, or ``aclose`` in a ``finally``). Closing waits,
off the event loop, for every copy it issued and only then gives the host
buffers back to the pool, so a buffer is never reused while a copy still
reads or writes it; a cancelled close leaves that to a callback that runs when
the copies complete.

Ordering with torch (the KV's producers and consumers run on torch's current
stream, captured on the calling thread):

- device to host: an event on torch's current stream, waited on by the copy
  stream, so the copy reads the KV only after the kernels queued before the
  call (those that wrote it) have run;
- host to device: the destination is allocated by torch's caching allocator on
  the current stream, so the copy first waits for that stream (the block may be
  in use by earlier kernels), and the current stream then waits on the copy's
  event before the tensor is handed out: the caller can use it at once.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from kvstore._workers import in_worker
from kvstore.gpu.engine import CopyEngine, CopyEvent
from kvstore.gpu.pool import HostBlock, HostPool, tensor_nbytes
from kvstore.results import LayerKV
from kvstore.tensors import host_copy, host_kv

__all__ = ["CudaTransfers", "PlainTransfers", "Transfers"]


class Transfers(ABC):
    """The host buffers and copies of one call between host memory and ``device``."""

    device: torch.device

    @abstractmethod
    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous host tensor to fill (pinned for CUDA when the pool has room); valid until ``aclose``."""

    @abstractmethod
    def to_device(self, tensors: Sequence[torch.Tensor], *, copy: bool = False) -> list[torch.Tensor]:
        """Copies of host ``tensors`` on ``device``, usable at once on torch's current stream.

        On the CPU the tensors themselves come back unless ``copy``; on CUDA they
        are always new device tensors (the copy may still be running on the copy
        stream, which torch's current stream waits for).
        """

    @abstractmethod
    async def to_host(
        self, kv: Sequence[LayerKV], start: int = 0, stop: int | None = None, *, copy: bool = False
    ) -> list[LayerKV]:
        """Contiguous host tokens ``[start:stop]`` of every layer, complete when this returns.

        CPU tensors come back as views unless ``copy`` (as ``host_kv``); tensors
        on this CUDA device are copied into leased, pinned buffers, valid until
        ``aclose``.
        """

    @abstractmethod
    async def aclose(self, *, reuse: bool = True) -> None:
        """Wait for the copies issued, then give the host buffers back (reused, unless ``reuse`` is false).

        ``reuse=False`` is for buffers a cancelled read may still be writing into.
        """

    @abstractmethod
    def release(self, *, reuse: bool = True) -> None:
        """Give the buffers back now, without waiting: only once every copy issued has completed.

        For a caller that already awaited its copies (``to_host`` returned) and
        ends where it cannot await, e.g. in a finalizer.
        """

    @abstractmethod
    def abandon(self) -> None:
        """Give the buffers' bytes back to the budget without reusing them (from ``__del__``: no loop to wait on)."""

    async def __aenter__(self) -> Transfers:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # A call that failed or was cancelled may have left a worker thread using the buffers: never reuse them.
        await self.aclose(reuse=exc_type is None)


class PlainTransfers(Transfers):
    """Plain torch for the CPU (and any non-CUDA device): no pool, no copies beyond ``.to``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def to_device(self, tensors: Sequence[torch.Tensor], *, copy: bool = False) -> list[torch.Tensor]:
        if copy:
            return [t.clone().to(self.device) for t in tensors]
        return [t.to(self.device) for t in tensors]

    async def to_host(
        self, kv: Sequence[LayerKV], start: int = 0, stop: int | None = None, *, copy: bool = False
    ) -> list[LayerKV]:
        return await in_worker(host_kv, kv, start, stop, copy=copy)

    async def aclose(self, *, reuse: bool = True) -> None:
        return None

    def release(self, *, reuse: bool = True) -> None:
        return None

    def abandon(self) -> None:
        return None


class CudaTransfers(Transfers):
    """Copies through ``engine``'s stream, via pinned buffers leased from ``pool``."""

    def __init__(self, device: torch.device, engine: CopyEngine, pool: HostPool) -> None:
        self.device = device
        self._engine = engine
        self._pool = pool
        self._blocks: list[HostBlock] = []
        self._keep: list[torch.Tensor] = []  # tensors a copy in flight reads: alive until it completes
        self._last: CopyEvent | None = None  # after the last host-to-device copy issued
        self._running: list[asyncio.Future[None]] = []  # device-to-host copies, waited on in worker threads
        self._closed = False

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._lease(shape, dtype)[0]

    def to_device(self, tensors: Sequence[torch.Tensor], *, copy: bool = False) -> list[torch.Tensor]:
        if all(t.device == self.device for t in tensors):
            return [t.clone() if copy else t for t in tensors]
        stream = self._engine.current_stream()
        srcs = [t.contiguous() for t in tensors]
        out = [torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in srcs]
        self._engine.wait_for(stream)  # torch may have handed out blocks still used by earlier kernels
        for dst, src in zip(out, srcs, strict=True):
            if src.numel():
                self._engine.copy(dst, src)
        done = self._engine.record()
        self._engine.make_wait(stream, done)
        self._keep.extend(srcs)
        self._last = done
        return out

    async def to_host(
        self, kv: Sequence[LayerKV], start: int = 0, stop: int | None = None, *, copy: bool = False
    ) -> list[LayerKV]:
        flat = [t[start:stop].detach() for pair in kv for t in pair]
        out: list[torch.Tensor | None] = [None] * len(flat)
        mine = [i for i, t in enumerate(flat) if t.device == self.device]
        if mine:
            stream = self._engine.current_stream()
            srcs = [flat[i].contiguous() for i in mine]  # queued on torch's stream, so before the event below
            leases = [self._lease(tuple(s.shape), s.dtype) for s in srcs]
            self._keep.extend(srcs)
            self._engine.wait_for(stream)
            engine = self._engine

            def issue() -> CopyEvent:
                for (dst, _), src in zip(leases, srcs, strict=True):
                    if src.numel():
                        engine.copy(dst, src)
                return engine.record()

            loop = asyncio.get_running_loop()
            if all(block.pinned for _, block in leases):  # asynchronous: issue here, wait in a worker
                fut = loop.run_in_executor(None, issue().synchronize)
            else:  # a copy into pageable memory blocks its thread until done: issue it in a worker too
                fut = loop.run_in_executor(None, lambda: issue().synchronize())
            self._running.append(fut)
            await asyncio.shield(fut)  # cancelled: the buffers stay leased until aclose sees the copy done
            for i, (dst, _) in zip(mine, leases, strict=True):
                out[i] = dst
        others = [i for i, t in enumerate(flat) if t.device != self.device]
        if others:  # another device than this staging's: a plain copy, as without staging
            copies = await in_worker(lambda: [host_copy(flat[i], copy=copy) for i in others])
            for i, t in zip(others, copies, strict=True):
                out[i] = t
        host = [t for t in out if t is not None]
        assert len(host) == len(flat)  # every tensor is on this device or another
        return [(host[2 * i], host[2 * i + 1]) for i in range(len(kv))]

    async def aclose(self, *, reuse: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        waits = list(self._running)
        if self._last is not None:
            waits.append(asyncio.get_running_loop().run_in_executor(None, self._last.synchronize))
        if not waits:
            self._give_back(reuse)
            return
        copies = asyncio.gather(*waits, return_exceptions=True)
        copies.add_done_callback(lambda _: self._give_back(reuse))  # runs even if this close is cancelled
        outcomes = await asyncio.shield(copies)
        self._give_back(reuse)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    def release(self, *, reuse: bool = True) -> None:
        if self._last is not None or not all(f.done() for f in self._running):
            raise RuntimeError("copies are still in flight: await aclose() instead")
        self._closed = True
        self._give_back(reuse)

    def abandon(self) -> None:
        if self._closed:
            return  # closed, or a cancelled close whose callback gives the buffers back
        self._closed = True
        if self._blocks:
            self._engine.record().synchronize()  # no loop to wait on here; a layer's copy takes milliseconds
        self._give_back(False)

    def _lease(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, HostBlock]:
        if self._closed:
            raise RuntimeError("these transfers are closed")
        block = self._pool.acquire(tensor_nbytes(shape, dtype))
        self._blocks.append(block)
        return block.view(shape, dtype), block

    def _give_back(self, reuse: bool) -> None:
        blocks, self._blocks = self._blocks, []
        self._keep = []
        self._running = []
        self._last = None
        for block in blocks:
            if reuse:
                self._pool.release(block)
            else:
                self._pool.discard(block)
