"""CudaTransfers' ordering and buffer lifetimes with a fake copy engine on the ``meta`` device (runs without CUDA).

The fake records the engine calls in order; its events complete when the test
opens ``gate``, so "a copy in flight" is a fact the test controls, not a race.
Values are not moved (``meta`` tensors have none): the bit-exact checks are in
the CUDA tests.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch
from _gpu_wait import until

from kvstore.gpu.pool import HostPool
from kvstore.gpu.transfers import CudaTransfers

META = torch.device("meta")
STREAM = "torch-current-stream"


class FakeEvent:
    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate

    def synchronize(self) -> None:
        assert self.gate.wait(10), "the test never completed the copy"


class FakeEngine:
    device = META

    def __init__(self) -> None:
        self.log: list[Any] = []
        self.gate = threading.Event()
        self.gate.set()
        self.recorded = threading.Event()

    def current_stream(self) -> Any:
        return STREAM

    def wait_for(self, stream: Any) -> None:
        self.log.append(("wait_for", stream))

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        assert dst.nbytes == src.nbytes
        assert dst.is_contiguous()
        assert src.is_contiguous()
        self.log.append(("copy", dst.device.type, src.device.type, dst.nbytes))

    def record(self) -> FakeEvent:
        self.log.append("record")
        self.recorded.set()
        return FakeEvent(self.gate)

    def make_wait(self, stream: Any, event: Any) -> None:
        self.log.append(("make_wait", stream))


def setup() -> tuple[FakeEngine, HostPool]:
    return FakeEngine(), HostPool(64 << 20, lambda n: torch.empty(n, dtype=torch.uint8), pinned=True)


def meta_kv(
    layers: int = 2, tokens: int = 8, dtype: torch.dtype = torch.bfloat16
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.empty(tokens, 2, 4, dtype=dtype, device=META),) * 2 for _ in range(layers)]


async def test_to_host_waits_for_torchs_stream_then_copies_into_leased_buffers() -> None:
    engine, pool = setup()
    kv = meta_kv(tokens=8)
    async with CudaTransfers(META, engine, pool) as transfers:
        host = await transfers.to_host(kv, 2, 6)
        assert [(k.shape, k.device.type, k.dtype) for k, _ in host] == [((4, 2, 4), "cpu", torch.bfloat16)] * 2
        assert engine.log[0] == ("wait_for", STREAM)  # the KV's producers first
        assert engine.log[1:-1] == [("copy", "cpu", "meta", 4 * 2 * 4 * 2)] * 4
        assert engine.log[-1] == "record"
        assert pool.stats().in_use_bytes > 0
    s = pool.stats()
    assert s.in_use_bytes == 0
    assert s.cached_bytes == s.allocated_bytes > 0


async def test_buffers_are_reused_across_calls() -> None:
    engine, pool = setup()
    for _ in range(3):
        async with CudaTransfers(META, engine, pool) as transfers:
            await transfers.to_host(meta_kv())
    s = pool.stats()
    assert s.allocations == 4
    assert s.reuses == 8


async def test_to_device_orders_the_copy_between_torchs_stream_and_its_consumers() -> None:
    engine, pool = setup()
    transfers = CudaTransfers(META, engine, pool)
    host = transfers.host_empty((3, 2, 4), torch.float16)
    out = transfers.to_device([host, host])
    assert [(t.device, t.shape, t.dtype) for t in out] == [(META, (3, 2, 4), torch.float16)] * 2
    assert engine.log == [
        ("wait_for", STREAM),  # the destination block may still be in use on torch's stream
        ("copy", "meta", "cpu", 48),
        ("copy", "meta", "cpu", 48),
        "record",
        ("make_wait", STREAM),  # torch's stream waits for the copy before the tensor is used
    ]
    with pytest.raises(RuntimeError, match="in flight"):
        transfers.release()  # a host-to-device copy may still read the buffer
    await transfers.aclose()
    assert pool.stats().in_use_bytes == 0


async def test_a_cancelled_call_gives_its_buffers_back_once_the_copy_completes() -> None:
    engine, pool = setup()
    engine.gate.clear()  # the device-to-host copy does not complete until the test says so

    async def save() -> None:
        async with CudaTransfers(META, engine, pool) as transfers:
            await transfers.to_host(meta_kv())

    task = asyncio.create_task(save())
    await asyncio.to_thread(engine.recorded.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # its clean-up waits for the copy, off the loop
    assert pool.stats().in_use_bytes > 0  # the copy may still write into them
    engine.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    s = pool.stats()
    assert s.in_use_bytes == s.allocated_bytes == s.cached_bytes == 0  # given back, never reused


async def test_cancelling_the_clean_up_too_leaves_the_buffers_to_the_copy_completing() -> None:
    engine, pool = setup()
    engine.gate.clear()
    transfers = CudaTransfers(META, engine, pool)
    task = asyncio.create_task(transfers.to_host(meta_kv()))
    await asyncio.to_thread(engine.recorded.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    closing = asyncio.create_task(transfers.aclose())
    await asyncio.sleep(0.05)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert pool.stats().in_use_bytes > 0
    engine.gate.set()
    await until(lambda: pool.stats().in_use_bytes == 0)
    assert pool.stats().cached_bytes > 0  # aclose() meant reuse, and the copy is done


async def test_a_failed_call_does_not_reuse_its_buffers() -> None:
    engine, pool = setup()

    async def failing_save() -> None:
        async with CudaTransfers(META, engine, pool) as transfers:
            await transfers.to_host(meta_kv())
            raise KeyError("the upload failed")

    with pytest.raises(KeyError):
        await failing_save()
    s = pool.stats()
    assert s.in_use_bytes == s.cached_bytes == 0


async def test_tensors_on_another_device_are_copied_plainly() -> None:
    engine, pool = setup()
    cpu = torch.arange(16, dtype=torch.float32).view(4, 2, 2)
    async with CudaTransfers(META, engine, pool) as transfers:
        host = await transfers.to_host([(cpu, cpu)], copy=True)
    assert engine.log == []
    assert pool.stats().allocations == 0
    assert torch.equal(host[0][0], cpu)
    assert host[0][0].data_ptr() != cpu.data_ptr()


def test_abandon_waits_for_the_copies_and_never_reuses() -> None:
    engine, pool = setup()
    transfers = CudaTransfers(META, engine, pool)
    transfers.to_device([transfers.host_empty((2, 2), torch.float32)])
    transfers.abandon()
    assert engine.log[-1] == "record"  # a final event, synchronized before the buffers go
    s = pool.stats()
    assert s.in_use_bytes == s.allocated_bytes == 0
    with pytest.raises(RuntimeError, match="closed"):
        transfers.host_empty((1,), torch.float32)
